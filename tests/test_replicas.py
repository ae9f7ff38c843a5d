"""Read replicas (issue 12, deliverable 5) against a real streaming replica of the local
PostgreSQL (tests/pg_replica.py: pg_basebackup, recovery_min_apply_delay 2 s), with the
usual router: reads to the replica, writes to the primary.

A miss right after a write used to read the replica's old row and store it in L2, where
it outlived the lag by TIMEOUT: the fill guard cannot see it, the write (and its
invalidation) came before the read. Misses through an alias that may lag now read the
primary (groups.replica_of): no entry is ever filled from a replica."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.db import connections
from django.test import override_settings
from django.test.utils import CaptureQueriesContext

import tiered_cache
from tests import coherence_tasks as ct
from tests.redis_fixtures import RedisEnv
from tests.testapp.factories import FlowFactory
from tests.testapp.models import Flow
from tiered_cache.groups import replica_of
from tiered_cache.tiers import redis_tier

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "replica"])


class ReplicaRouter:
    """Reads to the replica, writes to the primary (what Django's docs show)."""

    def db_for_read(self, model: Any, **hints: Any) -> str:
        return "replica"

    def db_for_write(self, model: Any, **hints: Any) -> str:
        return "default"

    def allow_relation(self, *args: Any, **hints: Any) -> bool:
        return True


@pytest.fixture
def routed(pg_replica: Any) -> Iterator[Any]:
    with override_settings(DATABASE_ROUTERS=[ReplicaRouter()]):
        yield pg_replica


def _step(alias: str, pk: int) -> int:
    return Flow.objects.using(alias).get(pk=pk).current_step


def test_the_replica_alias_is_recognised_as_one_that_may_lag(routed: Any) -> None:
    assert replica_of("replica") == "default"
    assert replica_of("default") is None
    # Another alias of the same server (an isolation level) is not a replica.
    assert replica_of("snapshot") is None


def test_a_miss_right_after_a_write_never_stores_the_replicas_old_row(
    routed: Any, own_redis: RedisEnv
) -> None:
    flow = FlowFactory(current_step=1)
    routed.wait_replayed()
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 1  # cached, through the replica
    b = own_redis.worker("b")
    assert b.call("tests.coherence_tasks.read", flow.pk)[0] == 1

    ct.write_one(flow.pk, "save")  # step 2 on the primary; the replica is 2 s behind
    assert _step("replica", flow.pk) == 1, "the replica did not lag: the test tests nothing"
    tiered_cache.clear_local()
    with CaptureQueriesContext(connections["replica"]) as on_replica:
        got = Flow.objects.get_cached(pk=flow.pk).current_step
    redis_tier.wait_for_fills()
    assert got == 2, "the miss read the lagging replica"
    assert not [q for q in on_replica.captured_queries if "testapp_flow" in q["sql"]]
    # The entry it stored is the primary's row: another process reads it from L2.
    assert b.call("tests.coherence_tasks.read", flow.pk)[0] == 2

    routed.wait_replayed()
    tiered_cache.clear_local()
    assert _step("replica", flow.pk) == 2
    assert Flow.objects.get_cached(pk=flow.pk).current_step == 2
    assert b.call("tests.coherence_tasks.read", flow.pk)[0] == 2


def test_get_many_and_lookups_through_the_replica_read_the_primary_on_a_miss(
    routed: Any, own_redis: RedisEnv
) -> None:
    flows = [FlowFactory(current_step=1) for _ in range(3)]
    routed.wait_replayed()
    for f in flows:
        ct.write_one(f.pk, "update")
    assert all(_step("replica", f.pk) == 1 for f in flows)
    tiered_cache.clear_local()
    many = Flow.objects.get_many_cached([f.pk for f in flows])
    assert sorted(o.current_step for o in many.values()) == [2, 2, 2]
    # As the ORM through the replica would label them, once it has caught up.
    assert {o._state.db for o in many.values()} == {"replica"}
    one = Flow.objects.get_cached(tenant_id=flows[0].tenant_id, session_id=flows[0].session_id)
    assert one.current_step == 2 and one._state.db == "replica"
    redis_tier.wait_for_fills()
    tiered_cache.clear_local()
    again = Flow.objects.get_many_cached([f.pk for f in flows])
    assert sorted(o.current_step for o in again.values()) == [2, 2, 2]


def test_inside_a_transaction_on_the_primary_a_replica_miss_is_answered_but_not_cached(
    routed: Any,
) -> None:
    """Reading the primary there would join the caller's transaction."""
    from django.db import transaction

    flow = FlowFactory(current_step=1)
    routed.wait_replayed()
    tiered_cache.clear_local()
    with transaction.atomic(using="default"):
        assert Flow.objects.get_cached(pk=flow.pk).current_step == 1
    redis_tier.wait_for_fills()
    assert ct.l1_count() == 0


class ReplicaFlows(tiered_cache.CachedManager):
    """A manager whose queryset reads the replica itself (using()), with no router."""

    def get_queryset(self) -> Any:
        return super().get_queryset().using("replica")


def test_a_manager_whose_queryset_reads_the_replica_misses_from_the_primary(
    pg_replica: Any,
) -> None:
    manager = ReplicaFlows()
    manager.model, manager.name = Flow, "on_replica"  # bound as contribute_to_class would
    flows = [FlowFactory(current_step=1) for _ in range(2)]
    pg_replica.wait_replayed()
    assert manager.get_cached(pk=flows[0].pk).current_step == 1
    for f in flows:
        Flow.objects.filter(pk=f.pk).update(current_step=2)  # the primary
    assert _step("replica", flows[0].pk) == 1, "the replica did not lag: the test tests nothing"
    tiered_cache.clear_local()
    with CaptureQueriesContext(connections["replica"]) as on_replica:
        one = manager.get_cached(pk=flows[0].pk)
        many = manager.get_many_cached([f.pk for f in flows])
    assert (one.current_step, one._state.db) == (2, "replica")
    assert sorted((o.current_step, o._state.db) for o in many.values()) == [(2, "replica")] * 2
    assert not [q for q in on_replica.captured_queries if "testapp_flow" in q["sql"]]
