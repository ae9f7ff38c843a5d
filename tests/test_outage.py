"""The opt-in outage mode, OUTAGE_STALE_SECONDS (issue 13 §3): while Redis is unreachable,
L1 keeps serving what it holds for at most that long after the bus last vouched for it,
misses reach the database once per key per process, this process's own writes are read
back at once, and everything L1 held is dropped when the bus is back.

Each test kills a private redis-server (tests/redis_fixtures.own_redis) and reads with
the database's queries counted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext, override_settings

from tests.cache_fixtures import counters
from tests.processes import wait_for
from tests.redis_fixtures import RedisEnv
from tests.testapp.factories import FlowFactory
from tests.testapp.models import Flow
from tiered_cache.bus import bus
from tiered_cache.conf import conf
from tiered_cache.tiers import redis_tier

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.single_server]

STALE = 1.5
T = "tests.coherence_tasks."


@pytest.fixture
def outage_mode(own_redis: RedisEnv) -> Iterator[RedisEnv]:
    with override_settings(TIERED_CACHE={**conf.raw, "OUTAGE_STALE_SECONDS": STALE}):
        assert bus.wait_trusted()
        try:
            yield own_redis
        finally:
            own_redis.server.heal()
            bus.wait_trusted()


def queries(fn: Any) -> tuple[Any, int]:
    with CaptureQueriesContext(connection) as ctx:
        value = fn()
    return value, len(ctx.captured_queries)


def kill(env: RedisEnv) -> float:
    """Kill Redis right after a fresh heartbeat; returns the last moment the bus vouched
    for L1, once trust ended. Fresh: heartbeats follow reads, and none came while the
    test's worker was spawned (over a second on a loaded machine), which the bounds the
    tests check would otherwise count."""
    seen = bus.vouched_at
    assert wait_for(lambda: bus.trusted() and bus.vouched_at > seen, 5), "no heartbeat"
    vouched = bus.vouched_at
    env.server.kill()
    assert wait_for(lambda: not bus.trusted(), 5), "trust outlived a killed Redis"
    assert bus.vouched_at >= vouched
    return bus.vouched_at


def test_l1_serves_what_it_held_for_the_bound_then_reads_the_database(
    outage_mode: RedisEnv,
) -> None:
    flow = FlowFactory(current_step=1)
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1
    redis_tier.wait_for_fills()
    other = outage_mode.worker("b")
    vouched = kill(outage_mode)
    # Another process's write, which cannot reach this one: the bounded staleness.
    assert other.call(T + "write_one", flow.pk, "update") == 2
    assert time.monotonic() - vouched < STALE
    before = counters(Flow)
    served, n = queries(lambda: Flow.objects.get_cached(pk=flow.pk).current_step)
    assert (served, n) == (1, 0), "L1 was not served during the outage"
    assert counters(Flow)["stale_hits"] == before["stale_hits"] + 1
    # Past the bound from the last heartbeat, never again.
    while time.monotonic() < vouched + STALE:
        time.sleep(0.05)
    served, n = queries(lambda: Flow.objects.get_cached(pk=flow.pk).current_step)
    assert served == 2 and n == 1


def test_a_miss_during_the_outage_reads_the_database_once_per_key(
    outage_mode: RedisEnv,
) -> None:
    flows = FlowFactory.create_batch(3)
    kill(outage_mode)
    first, n1 = queries(lambda: Flow.objects.get_cached(pk=flows[0].pk).pk)
    again, n2 = queries(lambda: Flow.objects.get_cached(pk=flows[0].pk).pk)
    assert (first, n1) == (flows[0].pk, 1)
    assert (again, n2) == (flows[0].pk, 0)
    many, n3 = queries(lambda: Flow.objects.get_many_cached([f.pk for f in flows]))
    assert sorted(many) == sorted(f.pk for f in flows) and n3 == 1
    _, n4 = queries(lambda: Flow.objects.get_many_cached([f.pk for f in flows]))
    assert n4 == 0
    # An absent row is remembered too, under the same bound.
    for expected in (1, 0):
        with CaptureQueriesContext(connection) as ctx, pytest.raises(Flow.DoesNotExist):
            Flow.objects.get_cached(pk=-7)
        assert len(ctx.captured_queries) == expected
    # Read once from the database, then each entry expires STALE after its read began.
    time.sleep(STALE)
    _, n6 = queries(lambda: Flow.objects.get_cached(pk=flows[0].pk))
    assert n6 == 1


def test_this_process_reads_its_own_writes_during_the_outage(outage_mode: RedisEnv) -> None:
    flow = FlowFactory(current_step=1)
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1
    kill(outage_mode)
    obj = Flow.objects.get(pk=flow.pk)
    obj.current_step = 5
    obj.save()  # Redis is gone: the invalidation goes to the outbox
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 5
    Flow.objects.filter(pk=flow.pk).update(current_step=6)
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 6


def test_l1_is_emptied_when_the_bus_is_back(outage_mode: RedisEnv) -> None:
    flow = FlowFactory(current_step=1)
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1
    other = outage_mode.worker("b")
    kill(outage_mode)
    assert other.call(T + "write_one", flow.pk, "update") == 2
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1  # within the bound
    outage_mode.server.start()
    assert bus.wait_trusted()
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 2


def test_off_by_default_l1_is_not_served_once_redis_is_gone(own_redis: RedisEnv) -> None:
    assert conf.OUTAGE_STALE_SECONDS == 0
    assert bus.wait_trusted()
    flow = FlowFactory(current_step=1)
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1
    kill(own_redis)
    Flow.objects.filter(pk=flow.pk).update(current_step=2)
    served, n = queries(lambda: Flow.objects.get_cached(pk=flow.pk).current_step)
    assert served == 2 and n == 1
    _, n = queries(lambda: Flow.objects.get_cached(pk=flow.pk))
    assert n == 1
