"""Redis losing state never makes an old entry valid again (issue 12, deliverable 4): a
restart with nothing in it, FLUSHALL, and eviction of any one of our keys (as allkeys-lru
does, here by DEL so that each kind is lost on purpose, and then under a real allkeys-lru
with memory pressure). Failover, the other way state is lost, is in test_failover.py.

The danger is a counter that starts again from a value it held before: an old "no such
row" entry, or a fill that read the row before a write, would then pass the check that
should refuse it. Every counter is now a fresh token (keys.py, lua/common.lua)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import tiered_cache
from tests import coherence_tasks as ct
from tests.cache_fixtures import reader_paused_after_read
from tests.redis_fixtures import RedisEnv
from tests.testapp.factories import FlowFactory
from tests.testapp.models import Flow
from tiered_cache.conf import conf
from tiered_cache.keys import pk_row_id
from tiered_cache.registry import first_model_cache
from tiered_cache.tiers import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)


def data_key(pk: int) -> str:
    mc = first_model_cache(Flow)
    assert mc is not None
    return mc.key(mc.pk_lookup, (pk,))


def _home() -> Any:
    mc = first_model_cache(Flow)
    assert mc is not None
    return mc.home


def _lose(env: RedisEnv, how: str, keys: Callable[[], list[str]]) -> None:
    """Lose Redis state one way: some of our keys evicted, FLUSHALL, or a restart with
    nothing in it."""
    if how == "evicted":
        env.server.client().delete(*keys())
    elif how == "flushall":
        env.server.client().flushall()
    else:
        env.server.restart_empty()
        assert ct.wait_trusted(10)


# A restart: of the one server, or of every node of a topology (tests/redis_fixtures.py).
LOSSES = ["evicted", "flushall", "restart-empty"]


def _writes_back_to(seen: bytes | None) -> int:
    """How many writes after a loss would bring a counter that restarts from 0 back to
    `seen` (what the old INCR counter did); 1 for a token."""
    return int(seen) if seen is not None and seen.isdigit() else 1


@pytest.mark.parametrize("how", LOSSES)
def test_a_no_such_row_entry_is_not_valid_again_after_the_write_counter_is_lost(
    own_redis: RedisEnv, how: str
) -> None:
    """A "no such row" entry is valid while the model's write counter holds the value it
    was stored under. With a counter that restarted from 0 on loss and counted up, two
    writes (one before the loss, one after) brought it back to that value, and the row
    created by the first write read as missing."""
    other = FlowFactory()  # some other row, written after the loss
    assert ct.read_by_session("t-new", "s-new") == "DoesNotExist"
    redis_tier.wait_for_fills()
    g = _home()
    mc = first_model_cache(Flow)
    assert mc is not None
    lk = mc.lookups[frozenset({"tenant_id", "session_id"})]
    shard = g.shard_of(mc.key(lk, ("t-new", "s-new")))
    seen = own_redis.server.client().get(shard.writes_key)
    created = FlowFactory(tenant_id="t-new", session_id="s-new")
    _lose(own_redis, how, lambda: [s.writes_key for s in g.shards])
    # As many writes after the loss as bring a counter counting up from 0 back to the
    # value the entry was stored under.
    for _ in range(_writes_back_to(seen)):
        ct.write_one(other.pk, "save")
    tiered_cache.clear_local()
    got = ct.read_by_session("t-new", "s-new")
    assert got == ct.row_of(created), f"the row created before the loss read as {got!r}"


@pytest.mark.parametrize("which", ["writes", "row version", "generation", "all three"])
def test_a_fill_of_a_row_read_before_a_write_is_refused_whatever_key_was_evicted(
    own_redis: RedisEnv, which: str
) -> None:
    """A reader holds the row it read before a write; the write commits; one of the keys
    the fill is checked against is evicted; then another write. The fill must still be
    refused, and the next read must see the last write."""
    flow = FlowFactory(current_step=1)
    other = FlowFactory(current_step=1)
    g = _home()
    rid = pk_row_id(Flow._meta.pk, flow.pk)
    # In every shard (one but on a cluster): the entry may be in any of them.
    chosen = {
        "writes": [s.writes_key for s in g.shards],
        "row version": [s.row_key(rid) for s in g.shards],
        "generation": [s.gen_key for s in g.shards],
        "all three": [k for s in g.shards for k in (s.writes_key, s.row_key(rid), s.gen_key)],
    }[which]
    with reader_paused_after_read(Flow, lambda: ct.read(flow.pk)) as got:
        # The reader holds step 1 and the counters it saw.
        seen = own_redis.server.client().get(g.shard_of(data_key(flow.pk)).writes_key)
        ct.write_one(flow.pk, "save")  # step 2
        own_redis.server.client().delete(*chosen)
        for _ in range(_writes_back_to(seen) if which != "row version" else 1):
            ct.write_one(other.pk, "save")
    redis_tier.wait_for_fills()
    tiered_cache.clear_local()
    assert got[0][0] == 1
    assert ct.read(flow.pk)[0] == 2, f"the fill of step 1 passed after the {which} was evicted"


# A topology's memory settings are per node; the same scripts run there.
@pytest.mark.single_server
def test_reads_equal_the_database_under_allkeys_lru_eviction(own_redis: RedisEnv) -> None:
    """A small maxmemory with allkeys-lru and another client filling Redis: our keys are
    evicted as Redis chooses, between and during reads and writes of this process and
    another one. Every read through the cache equals the database."""
    server = own_redis.server
    c = server.client()
    c.config_set("maxmemory-policy", "allkeys-lru")
    c.config_set("maxmemory", str(int(c.info("memory")["used_memory"]) + 1_500_000))
    flows = [FlowFactory(current_step=1) for _ in range(12)]
    b = own_redis.worker("b")
    stop = threading.Event()

    def pressure() -> None:
        p = server.client()
        i = 0
        while not stop.is_set():
            try:
                p.set(f"pressure:{i}", b"x" * 2000)
            except Exception:
                pass
            i += 1

    filler = threading.Thread(target=pressure, daemon=True)
    filler.start()
    rng = random.Random(12)
    stale: list[Any] = []
    steps = 0
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            f = rng.choice(flows)
            op = rng.random()
            if op < 0.3:
                ct.write_one(f.pk, rng.choice(["save", "update", "bulk_update"]))
            want = ct.row_of(Flow.objects.get(pk=f.pk))
            mine = ct.read(f.pk)  # this process dropped its own write from L1 at once
            # Process b drops it when the bus message arrives (the bound the README gives:
            # BUS_TRUST_WINDOW): a read then still older is stale.
            theirs: Any = None
            until = time.monotonic() + conf.BUS_TRUST_WINDOW + 0.2
            while theirs != want and time.monotonic() < until:
                theirs = tuple(b.call("tests.coherence_tasks.read", f.pk))
            for who, row in (("this process", mine), ("process b", theirs)):
                if row != want:
                    stale.append((steps, who, f.pk, row, want))
            steps += 1
    finally:
        stop.set()
        filler.join(5)
        c.config_set("maxmemory", "0")
        c.config_set("maxmemory-policy", "noeviction")
    evicted = int(c.info("stats")["evicted_keys"])
    print(f"\n[lost-state] allkeys-lru: {steps} steps, {evicted} keys evicted, stale {stale[:3]}")
    assert evicted > 0, "nothing was evicted: the test did not test eviction"
    assert steps > 50
    assert not stale


# SCRIPT FLUSH on one server; a topology's nodes each keep their own script cache.
@pytest.mark.single_server
def test_reads_and_writes_load_the_scripts_again_after_redis_lost_them(
    own_redis: RedisEnv, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart or SCRIPT FLUSH empties Redis's script cache while our keys may stay (a
    restart from a snapshot): EVALSHA then answers NOSCRIPT. A read of one row (its own
    short path, RedisTier._one) and a write load the scripts and run again, so the read
    is still an L2 hit and the write still invalidates."""
    flow = FlowFactory(current_step=1)
    assert ct.read(flow.pk)[0] == 1
    redis_tier.wait_for_fills()
    mc = first_model_cache(Flow)
    assert mc is not None
    client = own_redis.server.client()
    client.script_flush()
    tiered_cache.clear_local()
    hits = mc.counters.l2_hits
    # Counted, not replaced: the read must take the short path and meet NOSCRIPT there.
    short = []
    one = redis_tier._one
    monkeypatch.setattr(redis_tier, "_one", lambda call: short.append(call) or one(call))
    assert ct.read(flow.pk)[0] == 1
    assert mc.counters.l2_hits == hits + 1, "the read after SCRIPT FLUSH missed L2"
    assert short, "the read of one row did not take RedisTier._one"
    client.script_flush()
    ct.write_one(flow.pk, "save")  # step 2
    client.script_flush()
    tiered_cache.clear_local()
    assert ct.read(flow.pk)[0] == 2


# A cached function whose computation a test holds between its L2 read and its fill.
_source = {"v": 1}
_hold: dict[str, threading.Event] = {}


def _slow_source(k: str) -> int:
    v = _source["v"]
    if _hold:
        _hold["read"].set()
        _hold["go"].wait(10)
    return v


_held_fn = tiered_cache.cached(depends_on=[Flow], name="lost_state_held")(_slow_source)


@pytest.mark.parametrize("how", LOSSES)
def test_a_derived_result_computed_before_invalidate_is_never_stored_after_a_loss(
    own_redis: RedisEnv, how: str
) -> None:
    """fn.invalidate() leaves a tombstone that refuses fills begun before it; with the
    tombstone lost (evicted, FLUSHALL, a restart), such a fill is refused still: it must
    find the marker its own read left (it stored the old result, served to every process
    until TIMEOUT)."""
    assert ct.wait_trusted(10)
    _source["v"] = 1
    _hold.update(read=threading.Event(), go=threading.Event())
    first: list[int] = []
    computing = threading.Thread(target=lambda: first.append(_held_fn("k")))
    computing.start()
    try:
        assert _hold["read"].wait(10)
        _source["v"] = 2
        _held_fn.invalidate("k")
        _lose(own_redis, how, lambda: [_held_fn.key("k")])
    finally:
        _hold["go"].set()
        computing.join(10)
        _hold.clear()
    assert first == [1]  # the caller gets what it computed
    redis_tier.wait_for_fills()
    tiered_cache.clear_local()
    assert ct.wait_trusted(10)
    assert _held_fn("k") == 2
