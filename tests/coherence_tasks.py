"""Functions the coherence, resilience and latency tests run inside worker processes
(tests/processes.py), and the bookkeeping they share with the test process."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from django.db import connections, transaction

import tiered_cache
from tests.cache_fixtures import paused_after_read
from tests.testapp.models import Flow
from tiered_cache.breaker import breaker
from tiered_cache.bus import bus
from tiered_cache.reporting import reset_stats
from tiered_cache.tiers import local_tier, redis_tier

# L1 entries are labelled by invalidation group: "<database alias>:<root model label>".
MODEL = "testapp.flow"
LABEL = "default:" + MODEL

# A row as the tests compare it: the version counter and two other fields.
Row = tuple[int, str, str]


def row_of(obj: Flow) -> Row:
    return (obj.current_step, obj.status, json.dumps(obj.context, sort_keys=True))


# -- state of this process --------------------------------------------------------------


def reset_core() -> None:
    """Forget connections, listener, breaker, L1 and counters (the cache was re-pointed)."""
    bus.stop()
    redis_tier.reset()
    breaker.reset()
    tiered_cache.clear_local()
    reset_stats()


def reset_counters() -> None:
    reset_stats()
    tiered_cache.clear_local()


def reset_counters_keep_l1() -> None:
    reset_stats()


def bus_info() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "trusted": bus.trusted(),
        "state": bus.state(),
        "connected": bus.connected,
        "reconnects": bus.reconnects,
        "messages": bus.messages,
        "listener_alive": bus.listening(),
        "l1_entries": local_tier.count(LABEL),
        "breaker": breaker.state,
        "breaker_opened": breaker.opened_count,
    }


def wait_trusted(timeout: float = 10.0) -> bool:
    return bus.wait_trusted(timeout)


def hold_descriptors_past_1024() -> int:
    """Open descriptors until the next one is past select()'s limit, as a busy server
    process holds them (kept open for the worker's life): the bus's socket, made on the
    first read after this, lands there. The new highest descriptor."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    fd = os.open(os.devnull, os.O_RDONLY)
    while fd <= 1100:
        _held.append(fd)
        fd = os.open(os.devnull, os.O_RDONLY)
    _held.append(fd)
    return fd


_held: list[int] = []


def bus_fd() -> int:
    return int(bus._pubsub.connection._sock.fileno())


def stats() -> dict[str, Any]:
    redis_tier.wait_for_fills()
    return tiered_cache.stats().get(MODEL, {})


def l1_count() -> int:
    return local_tier.count(LABEL)


# -- reads and writes -------------------------------------------------------------------


def read(pk: int) -> Row | str:
    try:
        return row_of(Flow.objects.get_cached(pk=pk))
    except Flow.DoesNotExist:
        return "DoesNotExist"


def read_past_l1(pk: int) -> Row | str:
    """A read that L1 cannot answer: from L2 or the database."""
    tiered_cache.clear_local()
    return read(pk)


def read_by_session(tenant_id: str, session_id: str) -> Row | str:
    try:
        return row_of(Flow.objects.get_cached(tenant_id=tenant_id, session_id=session_id))
    except Flow.DoesNotExist:
        return "DoesNotExist"


def warm(pks: list[int], timeout: float = 10.0) -> int:
    """Read every row until each sits in L1 (needs a trusted bus); the L1 entry count."""
    wait_trusted(timeout)
    deadline = time.monotonic() + timeout
    while True:
        for pk in pks:
            Flow.objects.get_cached(pk=pk)
        redis_tier.wait_for_fills()
        if local_tier.count(LABEL) >= len(pks) or time.monotonic() > deadline:
            return local_tier.count(LABEL)
        time.sleep(0.01)


def read_all(rows: list[tuple[int, str, str]]) -> dict[str, Any]:
    """Every row through the cache (by pk, by (tenant, session), and get_many) and from the
    database, in this process: what differs is stale."""
    cached_pk = {pk: read(pk) for pk, _, _ in rows}
    cached_lk = {pk: read_by_session(t, s) for pk, t, s in rows}
    many = {
        pk: row_of(o) for pk, o in Flow.objects.get_many_cached([pk for pk, _, _ in rows]).items()
    }
    db = {o.pk: row_of(o) for o in Flow.objects.filter(pk__in=[r[0] for r in rows])}
    stale = []
    for pk, _, _ in rows:
        for how, got in (("pk", cached_pk[pk]), ("lookup", cached_lk[pk]), ("many", many.get(pk))):
            if got != db[pk]:
                stale.append({"pk": pk, "via": how, "cached": got, "db": db[pk]})
    return {"stale": stale, "rows": len(rows), "pid": os.getpid()}


def read_loop(
    rows: list[tuple[int, str, str]],
    start: float,
    until: float,
    seed: int = 0,
    threads: int = 1,
    past_l1: bool = False,
) -> dict[str, Any]:
    """Read random rows through the cache from `start` to `until` (time.monotonic(), which is
    one clock for every process of the machine). Each read is (start, end, pk, version);
    errors are counted, never raised. past_l1: every read a get_many_cached() with L1
    emptied first (L2's answers, by MGET: a read command, which a Redis pausing writes
    still runs)."""
    out: dict[str, Any] = {"obs": [], "errors": [], "pid": os.getpid()}
    lock = threading.Lock()

    def loop(n: int) -> None:
        rng = random.Random(seed * 100 + n)
        obs: list[tuple[float, float, int, int]] = []
        errors: list[str] = []
        while time.monotonic() < start:
            time.sleep(0.001)
        while True:
            t0 = time.monotonic()
            if t0 >= until:
                break
            pk, tenant, session = rng.choice(rows)
            how = rng.random()
            if past_l1:
                tiered_cache.clear_local()
                how = 1.0
            try:
                if how < 0.6:
                    got = Flow.objects.get_cached(pk=pk).current_step
                elif how < 0.9:
                    got = Flow.objects.get_cached(tenant_id=tenant, session_id=session).current_step
                else:
                    got = Flow.objects.get_many_cached([pk])[pk].current_step
            except Exception as exc:  # counted: a cache must never raise
                errors.append(f"{type(exc).__name__}: {exc}")
                got = -1
            obs.append((t0, time.monotonic(), pk, got))
        connections.close_all()
        with lock:
            out["obs"].extend(obs)
            out["errors"].extend(errors)

    workers = [threading.Thread(target=loop, args=(n,)) for n in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    redis_tier.wait_for_fills()
    out["stats"] = tiered_cache.stats().get(MODEL, {})
    return out


def write_one(pk: int, how: str) -> int:
    """Bump a row's version through one of the ORM's write paths; the new version."""
    with transaction.atomic():
        obj = Flow.objects.select_for_update().get(pk=pk)
        new = obj.current_step + 1
        if how == "save":
            obj.current_step = new
            obj.save(update_fields=["current_step", "updated_at"])
        elif how == "update":
            Flow.objects.filter(pk=pk).update(current_step=new)
        else:
            obj.current_step = new
            Flow.objects.bulk_update([obj], ["current_step"])
    return new


def write_loop(
    pks: list[int], start: float, until: float, seed: int = 0, pause: float = 0.01
) -> dict[str, Any]:
    """Bump random rows from `start` to `until`; each write is (pk, version, began, done),
    `done` taken once save()/update() returned, i.e. after the invalidation was sent."""
    rng = random.Random(seed)
    writes: list[tuple[int, int, float, float]] = []
    errors: list[str] = []
    while time.monotonic() < start:
        time.sleep(0.001)
    while time.monotonic() < until:
        pk = rng.choice(pks)
        how = rng.choice(("save", "save", "update", "bulk_update"))
        t0 = time.monotonic()
        try:
            new = write_one(pk, how)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
        else:
            writes.append((pk, new, t0, time.monotonic()))
        time.sleep(rng.uniform(0, pause))
    connections.close_all()
    return {"writes": writes, "errors": errors, "pid": os.getpid()}


# -- the fill race ------------------------------------------------------------------------


def read_with_paused_fill(
    pk: int | None, lookup: tuple[str, str] | None, signal_dir: str, wait_for_message: bool = True
) -> dict[str, Any]:
    """Read one row through the cache, pausing between the database read and the fills
    until the test creates `<signal_dir>/release`. With wait_for_message, the reader also
    waits until the writer's invalidation reached this process's bus, so the L1 fill is
    refused by its token rather than dropped afterwards."""
    d = Path(signal_dir)
    info: dict[str, Any] = {"paused": False}

    def pause() -> None:
        info["paused"] = True
        info["trusted_at_pause"] = bus.trusted()
        info["messages_at_pause"] = bus.messages
        (d / "paused").write_text(str(os.getpid()))
        deadline = time.monotonic() + 20
        while not (d / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        info["released"] = (d / "release").exists()
        if wait_for_message:
            deadline = time.monotonic() + 5
            while bus.messages == info["messages_at_pause"] and time.monotonic() < deadline:
                time.sleep(0.001)
        info["messages_at_fill"] = bus.messages

    wait_trusted()
    with paused_after_read(Flow, pause):
        if lookup is not None:
            info["value"] = read_by_session(*lookup)
        else:
            assert pk is not None
            info["value"] = read(pk)
    redis_tier.wait_for_fills()
    info["l1_entries"] = local_tier.count(LABEL)
    info["stats"] = tiered_cache.stats().get(MODEL, {})
    return info


# -- the listener's connection --------------------------------------------------------------


def listener_address() -> tuple[str, int] | None:
    """The local address of this process's bus connection, as CLIENT LIST shows it."""
    return bus.local_address()


def wait_reconnected(after: int, timeout: float = 10.0) -> dict[str, Any]:
    """Wait until the listener reconnected more than `after` times and is trusted again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bus.reconnects > after and bus.trusted():
            break
        time.sleep(0.005)
    return bus_info()


# -- fork safety ------------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> None:
    """The parent polls for the file and reads it at once: it must never see it half written."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def fork_child(pk: int, signal_dir: str) -> int:
    """Fork this (warm, listening) process. The child reports what it inherited, reads the
    row twice (an L1 hit needs its own live listener), waits for `go`, then polls the row
    until it changes; every step is written to `<signal_dir>/child.json`. Returns the pid."""
    d = Path(signal_dir)
    connections.close_all()  # the child must not share the parent's database socket
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        report: dict[str, Any] = {"pid": os.getpid()}
        report["l1_entries_at_start"] = len(local_tier)
        report["trusted_at_start"] = bus.trusted()
        report["inherited_listener"] = bus.listening()
        reset_stats()
        first = read(pk)
        redis_tier.wait_for_fills()
        wait_trusted()
        read(pk)  # fills L1 if the first read came before the listener was trusted
        second = read(pk)
        report["first"], report["second"] = first, second
        report["stats_after_warm"] = tiered_cache.stats().get(MODEL, {})
        report["own_listener"] = bus.listening()
        report["listener_threads"] = [
            th.name for th in threading.enumerate() if th.name == "tiered_cache-bus"
        ]
        _write_atomically(d / "child.json", json.dumps(report))
        deadline = time.monotonic() + 20
        while not (d / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.002)
        seen = []
        t0 = time.monotonic()
        deadline = t0 + 5
        while time.monotonic() < deadline:
            v = read(pk)
            seen.append(v)
            if v != second:
                break
            time.sleep(0.002)
        report["after_write"] = seen[-1]
        report["reads_until_new"] = len(seen)
        report["seconds_until_new"] = time.monotonic() - t0
        report["stats_end"] = tiered_cache.stats().get(MODEL, {})
        _write_atomically(d / "child.json", json.dumps(report))
        (d / "done").write_text("1")
    except BaseException as exc:  # reported to the test through the file
        _write_atomically(d / "error", repr(exc))
        code = 1
    finally:
        os._exit(code)


def reap(pid: int, timeout: float = 10.0) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


# -- stampede ------------------------------------------------------------------------------


def read_at(pk: int, at: float) -> dict[str, Any]:
    """Wait for monotonic time `at`, then read the row once; this process's counters."""
    wait_trusted()
    reset_stats()
    while time.monotonic() < at:
        pass
    value = read(pk)
    redis_tier.wait_for_fills()
    return {"value": value, "stats": tiered_cache.stats().get(MODEL, {})}


# -- judging reads against writes (in the test process) ------------------------------------


def stale_reads(
    obs: list[tuple[float, float, int, int]],
    writes: list[tuple[int, int, float, float]],
    initial: dict[int, int],
    bound: float,
) -> list[dict[str, Any]]:
    """Reads that returned a version older than one whose write had returned more than
    `bound` seconds before the read began. Versions of a row only grow (row lock + 1), so
    "older" is "smaller". bound=0 is linearizability across processes; the design allows
    BUS_TRUST_WINDOW (a reader's L1 may serve the old row until the bus message lands)."""
    import bisect

    by_pk: dict[int, tuple[list[float], list[int]]] = {}
    for pk in initial:
        done = sorted((w[3], w[1]) for w in writes if w[0] == pk)
        times, best, top = [], [], initial[pk]
        for t, v in done:
            top = max(top, v)
            times.append(t)
            best.append(top)
        by_pk[pk] = (times, best)
    out = []
    for t0, _t1, pk, got in obs:
        if got < 0:
            continue  # an error, counted elsewhere
        times, best = by_pk[pk]
        i = bisect.bisect_left(times, t0 - bound)
        need = best[i - 1] if i else initial[pk]
        if got < need:
            out.append(
                {
                    "pk": pk,
                    "got": got,
                    "expected_at_least": need,
                    "read_at": t0,
                    "lag": t0 - times[best.index(need)] if need != initial[pk] else None,
                }
            )
    return out


def latency_summary(
    obs: list[tuple[float, float, int, int]],
    start: float = float("-inf"),
    end: float = float("inf"),
) -> dict[str, Any]:
    """Count and slowest of the reads that began in [start, end)."""
    durations = sorted(t1 - t0 for t0, t1, _, _ in obs if start <= t0 < end)
    if not durations:
        return {"reads": 0, "slowest_ms": None, "p50_ms": None, "p99_ms": None}
    return {
        "reads": len(durations),
        "slowest_ms": round(durations[-1] * 1000, 1),
        "p50_ms": round(durations[len(durations) // 2] * 1000, 2),
        "p99_ms": round(durations[min(len(durations) - 1, int(len(durations) * 0.99))] * 1000, 2),
    }


def reset_for_test() -> None:
    """Clean counters, L1 and breaker at the start of a test (the listener keeps running)."""
    breaker.reset()
    reset_stats()
    tiered_cache.clear_local()


def outbox_count() -> int:
    from tiered_cache.models import PendingInvalidation

    n = PendingInvalidation.objects.count()
    connections.close_all()
    return n


def open_breaker() -> str:
    """Make this process's breaker open, as after three failed Redis calls."""
    for _ in range(max(1, breaker_threshold())):
        breaker.failure()
    return breaker.state


def breaker_threshold() -> int:
    from tiered_cache.conf import conf

    return conf.BREAKER_FAILURE_THRESHOLD


def drain() -> int:
    from tiered_cache.invalidation import drain_outbox

    n = drain_outbox()
    connections.close_all()
    return n


def until_l2_hit(pk: int, deadline: float, model: str = "testapp.user") -> float | None:
    """Read one row with L1 emptied before each try until it is served from L2; the
    monotonic time it was, or None at `deadline`."""
    from django.apps import apps

    from tiered_cache.registry import first_model_cache

    m = apps.get_model(model)
    mc = first_model_cache(m)
    assert mc is not None
    while time.monotonic() < deadline:
        before = mc.counters.l2_hits
        local_tier.clear()
        try:
            m.objects.get_cached(pk=pk)
        except Exception:
            pass
        if mc.counters.l2_hits > before:
            return time.monotonic()
        redis_tier.wait_for_fills(0.2)
        time.sleep(0.01)
    return None
