"""Failover without stale rows (issue 12, deliverable 4), in a Sentinel setup and in a Redis
Cluster, each started by its fixture on spare ports (tests/sentinel_topology.py,
tests/cluster_topology.py).

Replication is asynchronous. The tests make the loss really happen: the replica is cut off
from its master (the master still believes it connected), a row is written, the master is
killed and the cut-off replica promoted. The new master holds the old entry and the old
row version, so its scripts would serve the replaced row. With replica acknowledgements
(REPLICA_ACKS, 1 by default on both topologies) the invalidation the replica never got is
in the outbox, and no process trusts L2 before it has been applied to the new master:
every read, in both processes and both tiers, returns the committed row. Without them
(REPLICA_ACKS=0), the control test shows the old row served after the failover."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

import tiered_cache
from tests import coherence_tasks as ct
from tests import topologies
from tests.processes import wait_for
from tests.redis_fixtures import RedisEnv, TopologyServer
from tests.testapp.factories import FlowFactory
from tests.testapp.models import Flow
from tiered_cache.conf import conf
from tiered_cache.keys import pk_row_id
from tiered_cache.models import PendingInvalidation
from tiered_cache.registry import first_model_cache

pytestmark = pytest.mark.django_db(transaction=True)

T = "tests.coherence_tasks."


class Setup:
    """One topology under the cache, and how to break it around the row `pk`'s entry."""

    def __init__(self, kind: str, topology: Any, env: RedisEnv) -> None:
        self.kind = kind
        self.topology = topology
        self.env = env
        self.master: Any = None

    def entry_master(self, key: str) -> Any:
        if self.kind == "cluster":
            from redis.crc import key_slot

            return self.topology.master_of_slot(key_slot(key.encode()))
        return self.topology.master_address()

    def cut_off(self, key: str) -> None:
        self.master = self.entry_master(key)
        if self.kind == "cluster":
            self.topology.cut_off_replica_of(self.master)
        else:
            self.topology.cut_off_replica()

    def fail_over(self) -> Any:
        if self.kind == "cluster":
            return self.topology.fail_over(self.master)
        return self.topology.fail_over()

    def restart_old_master(self) -> None:
        if self.kind == "cluster":
            self.topology.restart_old_master_as_replica(self.master)
        else:
            self.topology.restart_old_master_as_replica()

    def replica_client(self) -> Any:
        """The cut-off replica, which the failover promotes."""
        if self.kind == "cluster":
            for m in self.topology.masters():
                if tuple(m["address"]) == tuple(self.master):
                    c = self.topology.node_client(m["replica"])
                    c.execute_command("READONLY")  # a replica answers reads, not MOVED
                    return c
            raise AssertionError(f"no replica of {self.master} in {self.topology.masters()}")
        return self.topology.replica_client()


def _start(kind: str, workdir: Any) -> Any:
    if kind == "cluster":
        from tests.cluster_topology import ClusterTopology

        topology: Any = ClusterTopology(workdir)
    else:
        from tests.sentinel_topology import SentinelTopology

        topology = SentinelTopology(workdir)
    topology.start()
    return topology


@pytest.fixture(scope="module", params=["sentinel", "cluster"])
def setup(
    request: pytest.FixtureRequest, django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    from tests.redis_fixtures import _reset_core

    kind = request.param
    topology = _start(kind, tmp_path_factory.mktemp(kind))
    entry = topologies.cache_entry(kind, topology, settings.TEST_KEY_PREFIX)
    override = override_settings(CACHES={"default": entry})
    override.enable()
    _reset_core()
    env = RedisEnv(TopologyServer(topology))  # type: ignore[arg-type]
    try:
        yield Setup(kind, topology, env)
    finally:
        env.close()
        override.disable()
        _reset_core()
        topology.stop()


@pytest.fixture
def healthy(setup: Setup) -> Iterator[Setup]:
    setup.topology.heal()
    for w in setup.env.workers():
        w.call(T + "reset_for_test")
    ct.reset_for_test()
    PendingInvalidation.objects.all().delete()
    yield setup
    setup.topology.heal()


def _entry_state(c: Any, pk: int) -> dict[str, Any]:
    """What one server holds for the row's pk entry: the entry's row version (in its
    header) and the row version key's value."""
    mc = first_model_cache(Flow)
    assert mc is not None
    key = mc.key(mc.pk_lookup, (pk,))
    shard = mc.home.shard_of(key)
    raw = c.get(key)
    version = raw.split(b"|")[3] if raw else None
    return {
        "entry_version": version,
        "row_version": c.get(shard.row_key(pk_row_id(Flow._meta.pk, pk))),
    }


def _away_from_the_bus(s: Setup) -> Any:
    """A row whose entry is on another master than the bus channel's, on a cluster: the
    failover of its master leaves every bus connection up, so only the changed slot map
    tells the processes that L2 may have lost invalidations."""
    from redis.crc import key_slot

    from tiered_cache.keys import channel

    mc = first_model_cache(Flow)
    assert mc is not None
    bus_master = s.entry_master(channel()) if s.kind == "cluster" else None
    for _ in range(50):
        flow = FlowFactory(current_step=1)
        key = mc.key(mc.pk_lookup, (flow.pk,))
        if s.kind != "cluster" or s.topology.master_of_slot(key_slot(key.encode())) != bus_master:
            return flow
    raise AssertionError("every row's entry landed on the bus channel's master")


def _scenario(s: Setup) -> dict[str, Any]:
    flow = _away_from_the_bus(s)
    b = s.env.worker("b")
    assert ct.wait_trusted(10) and b.call(T + "wait_trusted", 10)
    assert ct.read(flow.pk)[0] == 1
    assert b.call(T + "read", flow.pk)[0] == 1  # both tiers hold step 1 in both processes
    mc = first_model_cache(Flow)
    assert mc is not None
    key = mc.key(mc.pk_lookup, (flow.pk,))

    s.cut_off(key)
    ct.write_one(flow.pk, "save")  # step 2: its invalidation never reaches the replica
    outbox_rows = PendingInvalidation.objects.count()
    # The old master has the invalidation, and b has its bus message (within the bound).
    assert wait_for(lambda: b.call(T + "read", flow.pk)[0] == 2, conf.BUS_TRUST_WINDOW + 0.5)

    # The replica about to be promoted: the entry of step 1, valid against its row version.
    lost = _entry_state(s.replica_client(), flow.pk)
    s.fail_over()
    seen: list[tuple[str, Any]] = []
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:  # the failover window, before any replica is back
        # Past L1 (which the bus message emptied): what L2 or the database answer.
        seen.append(("this process", ct.read_past_l1(flow.pk)))
        seen.append(("process b", tuple(b.call(T + "read_past_l1", flow.pk))))
        time.sleep(0.05)
    s.restart_old_master()
    trusted = ct.wait_trusted(20) and b.call(T + "wait_trusted", 20)
    for _ in range(20):  # after: from the cache again
        seen.append(("this process", ct.read(flow.pk)))
        seen.append(("process b", tuple(b.call(T + "read", flow.pk))))
        tiered_cache.clear_local()
    stale = [(who, row) for who, row in seen if row[0] != 2]
    return {
        "outbox_rows": outbox_rows,
        "lost": lost,
        "reads": len(seen),
        "stale": stale,
        "trusted_after": trusted,
        "outbox_after": PendingInvalidation.objects.count(),
        "stats_b": b.call(T + "stats"),
    }


def test_after_a_failover_that_lost_an_invalidation_no_process_serves_the_old_row(
    healthy: Setup,
) -> None:
    out = _scenario(healthy)
    print(f"\n[failover] {healthy.kind}: {out}")
    # The loss really happened: the replica that was promoted held the entry of step 1,
    # still valid against the row version it had (the control test shows it served).
    lost = out["lost"]
    assert lost["entry_version"] is not None and lost["entry_version"] == lost["row_version"]
    assert out["outbox_rows"] >= 1, "the unacknowledged invalidation did not go to the outbox"
    assert not out["stale"], out["stale"][:5]
    assert out["trusted_after"], "the processes never trusted the cache again"
    assert out["outbox_after"] == 0
    # Served from the cache again once the new master had a replica.
    assert out["stats_b"].get("l1_hits", 0) + out["stats_b"].get("l2_hits", 0) > 0


def test_control_without_replica_acknowledgements_the_old_row_comes_back(
    healthy: Setup, settings: Any
) -> None:
    """REPLICA_ACKS=0 in the writing process: the same failover serves step 1 again,
    which shows the loss the first test guards against is real."""
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "REPLICA_ACKS": 0}
    out = _scenario(healthy)
    print(f"\n[failover] {healthy.kind} without acknowledgements: {out}")
    assert out["outbox_rows"] == 0
    assert out["stale"], "no stale read: the loss did not happen, the first test proves nothing"
