"""Resilience (issue 4 §8, DESIGN.md guarantees 8 and 10) against a private redis-server on a
spare port that the tests kill, pause, restart empty, fill with junk, hide behind a closed
port, a black hole or an error-answering server, and lock with a password.

Every fault test prints one line `[reliability] {...}` (run with -s) and, when
TC_RELIABILITY_OUT names a file, appends the same JSON to it; docs/reliability.md is
written from those lines."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.db import connection

import tiered_cache
from tests import coherence_tasks as ct
from tests.cache_fixtures import counters, reader_paused_after_read
from tests.processes import wait_for
from tests.redis_fixtures import RedisEnv
from tests.redis_server import RedisServer, free_port
from tests.testapp.factories import FlowFactory, UserFactory
from tests.testapp.models import Flow, User
from tiered_cache.breaker import breaker
from tiered_cache.bus import bus
from tiered_cache.conf import conf
from tiered_cache.models import PendingInvalidation
from tiered_cache.registry import first_model_cache
from tiered_cache.tiers import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)

T = "tests.coherence_tasks."
LABEL = ct.LABEL  # the model's invalidation group (outbox rows, L1)
MODEL = ct.MODEL
# A read or a write may wait for one connect and one reply before the breaker or the bus
# steps in; the tests allow a generous multiple of that on a loaded 2-core machine.
READ_BOUND = 1.0


def report(fault: str, **figures: Any) -> None:
    line = {"fault": fault, **figures}
    print(f"\n[reliability] {json.dumps(line, sort_keys=True)}")
    out = os.environ.get("TC_RELIABILITY_OUT")
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")


def sleep_until(t: float) -> None:
    while (left := t - time.monotonic()) > 0:
        time.sleep(min(left, 0.05))


def outbox() -> int:
    return PendingInvalidation.objects.count()


def data_key(pk: int) -> str:
    mc = first_model_cache(Flow)
    assert mc is not None
    return mc.key(mc.pk_lookup, (pk,))


# -- a row cached, Redis paused, the row saved, Redis resumed -------------------------------


def test_paused_redis_a_write_meanwhile_is_seen_by_a_process_that_never_saw_it(
    own_redis: RedisEnv,
) -> None:
    server = own_redis.server
    flow = FlowFactory(current_step=1)
    b = own_redis.worker("b")
    probe = UserFactory()
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1  # L1 + L2 here
    redis_tier.wait_for_fills()
    assert b.call(T + "warm", [flow.pk]) == 1  # B's L1
    warmed = time.monotonic()  # B's last heartbeat was sent before this
    User.objects.get_cached(pk=probe.pk)
    redis_tier.wait_for_fills()
    assert server.client().exists(data_key(flow.pk))  # the old row sits in L2

    server.pause()
    try:
        t0 = time.monotonic()
        obj = Flow.objects.get(pk=flow.pk)
        obj.current_step = 2
        obj.save()  # Redis cannot take the invalidation: it goes to the outbox
        save_s = time.monotonic() - t0
        pending = outbox()
        # The documented bound on a silent Redis: B trusts its L1 until BUS_TRUST_WINDOW
        # after its last answered heartbeat, and not a moment longer.
        time.sleep(max(0.0, warmed + conf.BUS_TRUST_WINDOW - time.monotonic()))
        during = b.call(T + "read", flow.pk)  # B's trust lapsed: the database
        mine = Flow.objects.get_cached(pk=flow.pk).current_step
    finally:
        server.resume()
    resumed = time.monotonic()

    after = b.call(T + "read", flow.pk)
    back = b.call(T + "until_l2_hit", probe.pk, resumed + 10)
    assert wait_for(lambda: outbox() == 0, 10)
    tiered_cache.clear_local()
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 2
    report(
        "paused, row saved, resumed",
        save_during_pause_ms=round(save_s * 1000, 1),
        outbox_rows=pending,
        read_during_pause=during[0],
        read_after_resume=after[0],
        l2_serves_again_after_s=None if back is None else round(back - resumed, 3),
        breaker_recovery_time_s=conf.BREAKER_RECOVERY_TIME,
    )
    assert pending >= 1
    assert save_s < READ_BOUND
    assert mine == 2 and during[0] == 2 and after[0] == 2
    assert back is not None and back - resumed <= conf.BREAKER_RECOVERY_TIME


# -- stampede --------------------------------------------------------------------------


def test_twenty_threads_and_a_second_process_missing_one_cold_key_read_the_database_at_most_twice(
    own_redis: RedisEnv,
) -> None:
    flow = FlowFactory(current_step=7)
    b = own_redis.worker("b")
    b.call(T + "wait_trusted")
    assert ct.wait_trusted()
    ct.reset_for_test()
    at = time.monotonic() + 1.0
    b.send(T + "read_at", flow.pk, at)
    got: list[Any] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            sleep_until(at - 0.005)
            while time.monotonic() < at:
                pass
            got.append(Flow.objects.get_cached(pk=flow.pk).current_step)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=one) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    other = b.result(30)
    mine = counters(Flow)
    reads = mine["misses"] + other["stats"]["misses"]
    report(
        "stampede: 20 threads + 1 process, one cold key",
        database_reads=reads,
        this_process=mine,
        other_process={k: other["stats"][k] for k in ("misses", "l2_hits", "l1_hits", "fills")},
    )
    assert not errors
    assert got == [7] * 20 and other["value"][0] == 7
    assert reads <= 2


# -- writes during an outage --------------------------------------------------------------


def test_writes_during_an_outage_are_applied_before_l2_is_read_again(
    own_redis: RedisEnv,
) -> None:
    """Redis unreachable with its data kept (a partition): the stale row stays in L2 all
    along, so only the outbox stands between it and the next reader."""
    server = own_redis.server
    flow = FlowFactory(current_step=1)
    b = own_redis.worker("b")
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1
    redis_tier.wait_for_fills()
    assert b.call(T + "warm", [flow.pk]) == 1
    before = b.call(T + "bus_info")

    server.hide()
    try:
        ct.write_one(flow.pk, "save")
        ct.write_one(flow.pk, "update")
        pending = outbox()
        during = b.call(T + "read", flow.pk)
        assert server.client().exists(data_key(flow.pk))  # the old row is still in L2
    finally:
        server.unhide()
    info = b.call(T + "wait_reconnected", before["reconnects"])
    left_when_trusted = b.call(T + "outbox_count")
    after = b.call(T + "read", flow.pk)
    by_lookup = b.call(T + "read_by_session", flow.tenant_id, flow.session_id)
    st = b.call(T + "stats")
    report(
        "partition with data kept, 2 writes meanwhile",
        outbox_rows=pending,
        outbox_rows_when_b_trusted_again=left_when_trusted,
        read_during=during[0],
        read_after=after[0],
        b_l2_hits=st["l2_hits"],
    )
    assert pending >= 1
    assert info["trusted"]
    assert left_when_trusted == 0
    assert during[0] == 3 and after[0] == 3 and by_lookup[0] == 3
    tiered_cache.clear_local()
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 3


def test_a_write_only_this_process_could_not_deliver_is_not_served_stale(
    own_redis: RedisEnv,
) -> None:
    """Redis is fine for everyone but the writer, whose breaker is open (three timeouts a
    moment ago). Its invalidation goes to the outbox; other processes' buses stay live and
    nobody loses trust, yet nobody may serve the old row for long: not the writer once
    its breaker lets it back to L2 (read-your-writes), not the other processes."""
    flow = FlowFactory(current_step=1)
    b = own_redis.worker("b")
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1
    redis_tier.wait_for_fills()
    assert b.call(T + "warm", [flow.pk]) == 1
    assert ct.open_breaker() == "open"

    ct.write_one(flow.pk, "save")
    written = time.monotonic()
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 2
    seen = wait_for(lambda: b.call(T + "read", flow.pk)[0] == 2, 5)
    b_after = time.monotonic() - written
    # Past the recovery time the breaker lets this process read L2 again.
    sleep_until(written + conf.BREAKER_RECOVERY_TIME + 0.1)
    tiered_cache.clear_local()
    mine = Flow.objects.get_cached(pk=flow.pk).current_step
    report(
        "only the writer cannot reach Redis (its breaker open)",
        other_process_saw_write_after_s=round(b_after, 3) if seen else None,
        writer_reads_after_recovery=mine,
        outbox_left=outbox(),
    )
    assert seen, "the other process kept serving the old row"
    assert mine == 2, "the writer read its own old row back from L2"


def test_an_outbox_longer_than_one_drain_batch_is_applied_whole_before_trust(
    own_redis: RedisEnv,
) -> None:
    """1,201 undelivered invalidations (as many writers leave in a long outage), the one
    of our row last: when Redis is back, the row must not be served stale from L2. Only B
    drains (this process's listener is stopped), so what B trusts is what B drained."""
    server = own_redis.server
    flow = FlowFactory(current_step=1)
    b = own_redis.worker("b")
    assert b.call(T + "warm", [flow.pk]) == 1
    before = b.call(T + "bus_info")
    mc = first_model_cache(Flow)
    assert mc is not None
    bus.stop()
    server.hide()
    try:
        # As writers would leave them: their rows changed, the invalidations not delivered.
        PendingInvalidation.objects.bulk_create(
            [
                PendingInvalidation(model_label=LABEL, rows=[mc.row_id_of(10**9 + i)])
                for i in range(1200)
            ]
            + [PendingInvalidation(model_label=LABEL, rows=[mc.row_id_of(flow.pk)])]
        )
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {Flow._meta.db_table} SET current_step = 2 WHERE id = %s",
                [flow.pk],
            )
        assert server.client().exists(data_key(flow.pk))  # the old row is in L2
    finally:
        server.unhide()
    info = b.call(T + "wait_reconnected", before["reconnects"])
    after = b.call(T + "read", flow.pk)
    left = b.call(T + "outbox_count")
    report("outbox of 1,201 entries", read_after=after[0], outbox_left_when_trusted=left)
    assert info["trusted"]
    assert after[0] == 2
    assert left == 0


@contextmanager
def outbox_refused() -> Iterator[None]:
    """The database refuses every new outbox row (a constraint no row meets), as one that
    fails right after the write's commit would."""
    table = connection.ops.quote_name(PendingInvalidation._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"ALTER TABLE {table} ADD CONSTRAINT tc_refused CHECK (false) NOT VALID")
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"ALTER TABLE {table} DROP CONSTRAINT tc_refused")


@contextmanager
def cut_off(settings: Any, own_redis: RedisEnv) -> Iterator[None]:
    """Only this process is cut off from Redis (its cache points at a closed port) until
    the block ends; then it points at the private server again."""
    settings.CACHES = {
        "default": {**settings.CACHES["default"], "LOCATION": f"redis://127.0.0.1:{free_port()}/0"}
    }
    ct.reset_core()
    try:
        yield
    finally:
        settings.CACHES = {
            "default": {**settings.CACHES["default"], "LOCATION": own_redis.server.url}
        }
        ct.reset_core()


def test_overflowed_outbox_still_covers_writes_after_another_process_drained_it(
    own_redis: RedisEnv, settings: Any
) -> None:
    """Past OUTBOX_LIMIT a model is recorded as flushed and its further rows are not
    written. If another process drains that flush while this one still cannot reach
    Redis, the rows this one writes next must not be lost."""
    flows = [FlowFactory(current_step=1) for _ in range(3)]
    b = own_redis.worker("b")
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "OUTBOX_LIMIT": 1}
    with cut_off(settings, own_redis):
        ct.write_one(flows[0].pk, "save")  # one row: recorded
        ct.write_one(flows[1].pk, "save")  # over the limit: the model recorded as flushed
        assert outbox() == 2
        assert b.call(T + "drain") == 2  # another process applies both
        assert b.call(T + "warm", [flows[2].pk]) == 1  # ...and caches the third row again
        ct.write_one(flows[2].pk, "save")  # this process still cannot reach Redis
    assert ct.wait_trusted()
    seen = wait_for(lambda: b.call(T + "read", flows[2].pk)[0] == 2, 3)
    report("overflowed outbox drained by another process", other_process_saw_write=seen)
    assert seen, "the write made after another process drained the flush was lost"


def test_a_write_the_outbox_refused_is_delivered_by_its_process(
    own_redis: RedisEnv, settings: Any
) -> None:
    """Redis did not take a write's invalidation and the database refused its outbox row:
    the writing process owes it in memory and delivers it (its groups flushed) before it
    trusts the tiers again, so the other processes drop the old row."""
    flow = FlowFactory(current_step=1)
    b = own_redis.worker("b")
    assert b.call(T + "warm", [flow.pk]) == 1  # in b's L1 and in L2
    with cut_off(settings, own_redis), outbox_refused():
        assert ct.write_one(flow.pk, "save") == 2
    assert outbox() == 0
    assert ct.wait_trusted()
    seen = wait_for(lambda: b.call(T + "read", flow.pk)[0] == 2, 3)
    report("outbox refused by the database", other_process_saw_write=seen)
    assert seen, "the write whose outbox row the database refused was lost"


def test_a_write_the_outbox_refused_goes_in_with_the_next_recorded_one(
    own_redis: RedisEnv, settings: Any
) -> None:
    """What the database refused is written with this process's next outbox rows (a flush
    of its model), and the model's later writes are recorded as ever: another process's
    drain delivers both, while the writer is still cut off (or gone)."""
    refused, later = FlowFactory(current_step=1), FlowFactory(current_step=1)
    b = own_redis.worker("b")
    assert b.call(T + "warm", [refused.pk, later.pk]) == 2
    with cut_off(settings, own_redis):
        with outbox_refused():
            ct.write_one(refused.pk, "save")
        ct.write_one(later.pk, "save")
        kept = sorted((p.flush, len(p.rows)) for p in PendingInvalidation.objects.all())
        assert kept == [(False, 1), (True, 0)], kept  # the later row, the refused one's flush
        assert b.call(T + "drain") == 2
        rows = [b.call(T + "read", pk)[0] for pk in (refused.pk, later.pk)]
    report("outbox refused, then written with the next write", other_process_read=rows)
    assert rows == [2, 2]


@pytest.mark.single_server  # refusing writes is a fault of one server (as in the matrix)
def test_writes_redis_refuses_keep_their_connections(own_redis: RedisEnv) -> None:
    """Redis refusing writes (NOREPLICAS here, OOM alike) answered whole: the stream stays
    in step, so neither the refused scripts, nor their announcement, nor the listener's
    retried drains open a new connection each to a server in trouble (as they did)."""
    server = own_redis.server
    flow = FlowFactory(current_step=1)
    assert ct.wait_trusted()
    ct.write_one(flow.pk, "save")  # this thread's connection is made
    stats = server.client()
    received = lambda: int(stats.info("stats")["total_connections_received"])  # noqa: E731
    server.refuse_writes()
    try:
        before = received()
        for _ in range(5):
            ct.write_one(flow.pk, "save")
        time.sleep(1.0)  # the listener retries its drain meanwhile (backing off)
        opened = received() - before
    finally:
        server.accept_writes()
    assert wait_for(bus.trusted, 10)
    report("refused writes: connections opened", writes=5, opened=opened)
    # Never one per write (the code before: 9). At most two: the listener's own, for its
    # first drain, and the statistics publisher's, whose periodic push may fall in the
    # window (its connection was closed by an earlier test's reset; alone: 1).
    assert opened <= 2, f"{opened} connections opened for 5 refused writes"


def test_breaker_state_is_visible_in_stats(own_redis: RedisEnv) -> None:
    server = own_redis.server
    flow = FlowFactory(current_step=1)
    Flow.objects.get_cached(pk=flow.pk)
    seen = [tiered_cache.stats()[MODEL]["breaker"]]
    server.hide()
    try:
        for _ in range(conf.BREAKER_FAILURE_THRESHOLD):
            ct.write_one(flow.pk, "save")  # each invalidation fails at once
        seen.append(tiered_cache.stats()[MODEL]["breaker"])
        assert breaker.opened_count >= 1
    finally:
        server.unhide()
    sleep_until(time.monotonic() + conf.BREAKER_RECOVERY_TIME)
    assert wait_for(bus.trusted, 10)
    ct.write_one(flow.pk, "save")  # the half-open probe succeeds
    seen.append(tiered_cache.stats()[MODEL]["breaker"])
    report("breaker in stats()", states=seen)
    assert seen == ["closed", "open", "closed"]
    assert tiered_cache.stats()[MODEL]["bus"] == "live"


@pytest.mark.parametrize("past_l1", [False, True], ids=["l1", "l2"])
def test_a_redis_pausing_writes_ends_every_processs_trust_within_the_window(
    own_redis: RedisEnv, past_l1: bool
) -> None:
    """CLIENT PAUSE WRITE (what FAILOVER does on the old master) holds EVALSHA and PUBLISH
    but answers PING: a save's invalidation times out into the outbox, and no message
    tells the others. Their heartbeats are PUBLISHes too, held as well: their trust lapses
    within BUS_TRUST_WINDOW, and no read, from L1 or from L2 (get_many_cached's MGET is a
    read, not paused), serves the old row past it. (Another process served it for the
    whole pause and until the outbox was delivered.)"""
    server = own_redis.server
    flow = FlowFactory(current_step=1)
    rows = [(flow.pk, flow.tenant_id, flow.session_id)]
    reader = own_redis.worker("reader")
    assert reader.call(T + "warm", [flow.pk]) == 1
    start = time.monotonic() + 0.3
    reader.send(T + "read_loop", rows, start, start + 2.5, 0, 1, past_l1)
    sleep_until(start + 0.3)
    server.client().execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # ends by itself
    began = time.monotonic()
    version = ct.write_one(flow.pk, "save")  # its invalidation waits out the timeout
    writes = [(flow.pk, version, began, time.monotonic())]
    result = reader.result(30)
    stale = ct.stale_reads(result["obs"], writes, {flow.pk: 1}, conf.BUS_TRUST_WINDOW + 0.05)
    report("writes paused", reads=len(result["obs"]), stale=len(stale), errors=result["errors"])
    assert wait_for(lambda: PendingInvalidation.objects.count() == 0, 15)
    assert not result["errors"]
    assert not stale, stale[:3]


@pytest.mark.single_server  # one server paused: on a cluster the probe may go to another
def test_a_probe_cut_short_by_the_caller_leaves_the_breaker_free_to_probe_again(
    own_redis: RedisEnv,
) -> None:
    """A half-open probe that an exception of the caller's side ends (a Celery soft time
    limit or any signal handler that raises, a gevent timeout) tells nothing of Redis: the
    next call probes again, and the breaker closes once Redis answers. (It stayed
    half-open with its probe taken for good, every later read refused L2.)"""
    import signal

    server = own_redis.server
    flows = FlowFactory.create_batch(3)
    server.hide()
    try:
        for _ in range(conf.BREAKER_FAILURE_THRESHOLD):
            ct.write_one(flows[0].pk, "save")
    finally:
        server.unhide()
    assert breaker.state == "open"
    sleep_until(time.monotonic() + conf.BREAKER_RECOVERY_TIME)
    assert wait_for(bus.trusted, 10)

    class SoftTimeLimit(Exception):
        pass

    def cut_short(signum: int, frame: Any) -> None:
        raise SoftTimeLimit

    tiered_cache.clear_local()
    previous = signal.signal(signal.SIGALRM, cut_short)
    server.pause()  # the probe waits on its socket, and the signal ends the wait
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        with pytest.raises(SoftTimeLimit):
            Flow.objects.get_cached(pk=flows[1].pk)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        server.resume()
    assert breaker.state == "half-open"
    assert wait_for(bus.trusted, 10)
    for f in flows:
        tiered_cache.clear_local()
        Flow.objects.get_cached(pk=f.pk)
    assert breaker.state == "closed"


@pytest.mark.parametrize(
    "junk",
    [b"P|", b"a|b", b"P|x|y|z|" + b"\0" * 100_000, "list"],
    ids=["truncated", "bar", "oversized", "list"],
)
@pytest.mark.parametrize("which", ["generation", "writes", "row-version", "data", "lease"])
def test_junk_in_any_key_of_ours_is_a_miss_and_heals(
    own_redis: RedisEnv, junk: Any, which: str
) -> None:
    """Someone overwrote one of our keys: reads stay correct and L2 serves the row again
    after at most two misses (not never: a generation or row version with a '|' in it,
    or a lease with no expiry, used to disable L2 for the model, the row or the key)."""
    user = UserFactory(first_name="Ada")
    mc = first_model_cache(User)
    assert mc is not None
    User.objects.get_cached(pk=user.pk)
    redis_tier.wait_for_fills()
    data = mc.key(mc.pk_lookup, (user.pk,))
    key = {
        "generation": mc.home.gen_key,
        "writes": mc.home.writes_key,
        "row-version": mc.home.row_key(mc.row_id_of(user.pk)),
        "data": data,
        "lease": data + "|L",
    }[which]
    c = own_redis.server.client()
    if which == "lease":
        c.delete(data)  # so that the next reader needs the lease
    c.delete(key)
    if junk == "list":
        c.rpush(key, "junk")
    else:
        c.set(key, junk)
    hits = []
    for _ in range(4):
        tiered_cache.clear_local()
        before = counters(User)["l2_hits"]
        assert User.objects.get_cached(pk=user.pk).first_name == "Ada"
        redis_tier.wait_for_fills()
        hits.append(counters(User)["l2_hits"] - before)
    assert hits[-2:] == [1, 1], (hits, counters(User))


def test_a_reset_write_counter_never_lets_a_fill_of_an_old_row_through(
    own_redis: RedisEnv,
) -> None:
    """The write counter cannot be incremented when it holds junk, or when Redis is out
    of memory (INCR is refused, the script deletes and sets it again). If every reset
    gave the same value, a fill that read the counter after one reset would pass after
    the next reset although a write happened in between (ABA), storing the old row."""
    server = own_redis.server
    flow = FlowFactory(current_step=1)
    mc = first_model_cache(Flow)
    assert mc is not None
    c = server.client()

    def junk_counter() -> None:
        c.delete(mc.home.writes_key)
        c.hset(mc.home.writes_key, "junk", "1")

    junk_counter()
    ct.write_one(flow.pk, "save")  # v2; the counter is reset
    with reader_paused_after_read(Flow, lambda: ct.read(flow.pk)) as got:
        # The reader holds v2 and the counter it saw.
        junk_counter()
        ct.write_one(flow.pk, "save")  # v3; the counter is reset again
    redis_tier.wait_for_fills()
    tiered_cache.clear_local()
    after = Flow.objects.get_cached(pk=flow.pk).current_step
    report("write counter reset twice around a fill", reader_got=got[0][0], read_after=after)
    assert got[0][0] == 2
    assert after == 3, "the fill of v2 passed: the counter came back to the value it read"


# -- reads and writes during each fault -------------------------------------------------------

FAULT_SECONDS = 2.3  # longer than BREAKER_RECOVERY_TIME: half-open probes happen under it
RECOVERY_SECONDS = 2.0


def _kill(s: RedisServer) -> None:
    s.kill()


def _start_empty(s: RedisServer) -> None:
    s.start()


def _noop(s: RedisServer) -> None:
    pass


FAULTS: dict[str, tuple[Callable[[RedisServer], None], Callable[[RedisServer], None], str]] = {
    "killed": (_kill, _start_empty, "SIGKILL; started again empty when the fault ends"),
    "restarted-empty": (lambda s: s.restart_empty(), _noop, "SIGKILL and an empty server at once"),
    "paused": (lambda s: s.pause(), lambda s: s.resume(), "SIGSTOP, then SIGCONT"),
    "refusing": (
        lambda s: s.hide(),
        lambda s: s.unhide(),
        "nothing listens on the address (data kept, clients dropped)",
    ),
    "black-holed": (
        lambda s: s.start_fault_server("blackhole"),
        lambda s: s.heal(),
        "a server that accepts connections and never answers",
    ),
    "answering-errors": (
        lambda s: s.start_fault_server("errors"),
        lambda s: s.heal(),
        "a server that answers -ERR to every command",
    ),
    "requirepass": (
        lambda s: s.require_password(),
        lambda s: s.drop_password(),
        "the real server answers NOAUTH to every new connection",
    ),
    "junk": (
        lambda s: s.fill_with_junk(conf.KEY_PREFIX),
        _noop,
        "every key of ours overwritten with wrong types, truncated or oversized values",
    ),
    "flushall": (lambda s: s.client().flushall(), _noop, "FLUSHALL by someone else"),
    "out-of-memory": (
        lambda s: s.fill_memory(),
        lambda s: s.free_memory(),
        "maxmemory reached with noeviction: commands that write fail with OOM",
    ),
    "refusing-writes": (
        lambda s: s.refuse_writes(),
        lambda s: s.accept_writes(),
        "every write refused (NOREPLICAS); reads, PING and PUBLISH answered",
    ),
}


# Faults of one server only: a fake server on its one address, NOAUTH, OOM (a topology has
# an address per node, and sentinels or a cluster bus that would take them for a failure).
_FAULT_MARKS = {
    "black-holed": pytest.mark.single_server,
    "answering-errors": pytest.mark.single_server,
    "requirepass": pytest.mark.single_server,
    "out-of-memory": pytest.mark.single_server,
    "refusing-writes": pytest.mark.single_server,
}


@pytest.mark.parametrize("fault", [pytest.param(f, marks=_FAULT_MARKS.get(f, ())) for f in FAULTS])
def test_reads_and_writes_during_a_fault(own_redis: RedisEnv, fault: str) -> None:
    inject, heal, what = FAULTS[fault]
    server = own_redis.server
    flows = [FlowFactory(current_step=0) for _ in range(10)]
    rows = [(f.pk, f.tenant_id, f.session_id) for f in flows]
    pks = [f.pk for f in flows]
    probe = UserFactory()
    b, w = own_redis.worker("b"), own_redis.worker("w")
    assert ct.warm(pks) == len(pks)
    assert b.call(T + "warm", pks) == len(pks)
    w.call(T + "wait_trusted")
    User.objects.get_cached(pk=probe.pk)
    redis_tier.wait_for_fills()

    start = time.monotonic() + 0.3
    inject_at = start + 0.5
    heal_at = inject_at + FAULT_SECONDS
    until = heal_at + RECOVERY_SECONDS
    b.send(T + "read_loop", rows, start, until, 1, 1)
    w.send(T + "write_loop", pks, start, until, 7, 0.05)
    mine: dict[str, Any] = {}
    reader = threading.Thread(target=lambda: mine.update(ct.read_loop(rows, start, until, 2, 2)))
    reader.start()

    states: set[tuple[str, str]] = set()
    outbox_max = 0
    try:
        sleep_until(inject_at)
        t_inject = time.monotonic()
        inject(server)
        while time.monotonic() < heal_at:
            st = tiered_cache.stats()[MODEL]
            states.add((st["breaker"], st["bus"]))
            outbox_max = max(outbox_max, outbox())
            time.sleep(0.05)
        t_heal = time.monotonic()
        heal(server)
        healed = time.monotonic()
        back = ct.until_l2_hit(probe.pk, until + 5)
    finally:
        server.heal()
        reader.join(60)
    theirs = b.result(60)
    writes = w.result(60)
    w_info = w.call(T + "bus_info")
    time.sleep(0.3)  # quiet time
    assert wait_for(lambda: outbox() == 0, 10), "undelivered invalidations left behind"
    finals = [ct.read_all(rows), b.call(T + "read_all", rows), w.call(T + "read_all", rows)]

    obs = mine["obs"] + theirs["obs"]
    errors = mine["errors"] + theirs["errors"] + writes["errors"]
    initial = {pk: 0 for pk in pks}
    strict = ct.stale_reads(obs, writes["writes"], initial, 0.0)
    stale = ct.stale_reads(obs, writes["writes"], initial, conf.BUS_TRUST_WINDOW + 0.010)
    under = ct.latency_summary(obs, t_inject, t_heal)
    overall = ct.latency_summary(obs)
    w_under = sorted(d - b0 for _, _, b0, d in writes["writes"] if t_inject <= b0 < t_heal)
    figures = {
        "what": what,
        "fault_seconds": round(t_heal - t_inject, 2),
        "reads_under_fault": under["reads"],
        "reads_total": overall["reads"],
        "writes_under_fault": len(w_under),
        "writes_total": len(writes["writes"]),
        "errors": len(errors),
        "stale_reads": len(stale),
        "reads_older_than_a_returned_write": len(strict),
        "max_lag_ms": round(
            max([x["lag"] for x in strict if x["lag"] is not None] or [0]) * 1000, 1
        ),
        "slowest_read_under_fault_ms": under["slowest_ms"],
        "p99_read_under_fault_ms": under["p99_ms"],
        "slowest_read_ms": overall["slowest_ms"],
        "slowest_write_under_fault_ms": round(w_under[-1] * 1000, 1) if w_under else None,
        "outbox_max": outbox_max,
        "states_seen": sorted(f"{b_}/{s_}" for b_, s_ in states),
        "writer_breaker_opened": w_info["breaker_opened"],
        "l2_serves_again_after_s": None if back is None else round(back - healed, 3),
        "final_stale_rows": sum(len(f["stale"]) for f in finals),
        "stale_detail": [
            {
                **x,
                "read_at": round(x["read_at"] - t_heal, 3),
                "lag": None if x["lag"] is None else round(x["lag"], 3),
            }
            for x in stale[:3]
        ],
        "hit_ratio_this_process": mine["stats"].get("hit_ratio"),
    }
    report(fault, **figures)
    assert not errors, errors[:5]
    assert stale == [], stale[:5]
    assert [f["stale"] for f in finals] == [[], [], []]
    assert under["reads"] > 0 and overall["slowest_ms"] < READ_BOUND * 1000
    assert not w_under or w_under[-1] < READ_BOUND
    assert back is not None and back - healed <= conf.BREAKER_RECOVERY_TIME + 1.5


# -- bad input on the bus -------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [
        b"[]",
        b"null",
        b'{"o": "x"}',
        b'{"o": "x", "g": 1, "r": []}',
        b'{"o": "x", "k": 5, "m": "fn:x"}',
        b'{"o": "x", "u": 2}',
        b'{"o": "x", "u": 1, "g": "g", "r": [], "f": 0}',
        b"\xff not json",
    ],
)
def test_a_bus_message_that_is_not_ours_is_ignored_with_a_warning(junk: bytes, caplog: Any) -> None:
    """Valid JSON of another shape must neither kill the listener (which clears every L1 and
    drops trust in every process) nor drop anything."""
    from tiered_cache.keys import channel
    from tiered_cache.tiers import local_tier

    user = UserFactory()
    assert ct.wait_trusted()
    User.objects.get_cached(pk=user.pk)
    entries, reconnects, messages = len(local_tier), bus.reconnects, bus.messages
    assert entries >= 1
    with caplog.at_level("WARNING", logger="tiered_cache"):
        if redis_tier.cluster:  # the bus is a sharded channel there
            redis_tier.client.spublish(channel(), junk)
        else:
            redis_tier.client.publish(channel(), junk)
        assert wait_for(lambda: bus.messages > messages, 5), "the message never arrived"
        time.sleep(0.05)
    assert bus.reconnects == reconnects and bus.trusted()
    assert len(local_tier) == entries
    assert "not ours" in caplog.text
