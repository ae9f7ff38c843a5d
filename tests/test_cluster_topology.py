"""The private Redis Cluster of tests/cluster_topology.py does what the failover tests need:
it serves every slot, sharded pub/sub works through redis-py, and a replica whose link was
cut without its master knowing is elected in the master's place, losing the writes the
master accepted after the cut."""

from __future__ import annotations

import time

from redis.crc import key_slot

from tests import cluster_fixtures
from tests.cluster_topology import ClusterTopology
from tests.processes import wait_for

cluster_topology = cluster_fixtures.cluster_topology  # the module-scoped fixture


def _key_in(slots: list[tuple[int, int]], prefix: str) -> str:
    for i in range(100_000):
        key = f"{prefix}:{i}"
        if any(a <= key_slot(key.encode()) <= b for a, b in slots):
            return key
    raise AssertionError("no key found in those slots")


def test_starts_with_three_masters_and_a_replica_each(cluster_topology: ClusterTopology) -> None:
    masters = cluster_topology.masters()
    assert len(masters) == 3
    assert sum(b - a + 1 for m in masters for a, b in m["slots"]) == 16384
    for m in masters:
        assert m["replica"] is not None and m["replica"] != m["address"]
        assert m["address"] in cluster_topology.startup_nodes
        assert m["replica"] in cluster_topology.startup_nodes


def test_set_get_on_keys_of_many_slots(cluster_topology: ClusterTopology) -> None:
    rc = cluster_topology.cluster_client()
    keys = [f"ct:slots:{i}" for i in range(500)]
    try:
        for i, key in enumerate(keys):
            assert rc.set(key, str(i))
        for i, key in enumerate(keys):
            assert rc.get(key) == str(i).encode()
        assert len({key_slot(k.encode()) for k in keys}) > 450
        for m in cluster_topology.masters():
            assert cluster_topology.node_client(m["address"]).dbsize() > 100
    finally:
        for key in keys:
            rc.delete(key)
        rc.close()


def test_sharded_pubsub(cluster_topology: ClusterTopology) -> None:
    rc = cluster_topology.cluster_client()
    p = rc.pubsub()
    try:
        p.ssubscribe("ct:chan")
        msg = p.get_sharded_message(timeout=2)
        assert msg is not None and msg["type"] == "ssubscribe", msg
        assert rc.spublish("ct:chan", "hello") == 1
        msg = p.get_sharded_message(timeout=2)
        assert msg == {"type": "smessage", "pattern": None, "channel": b"ct:chan", "data": b"hello"}
    finally:
        p.close()
        rc.close()


def test_cut_replica_is_promoted_and_loses_the_writes_after_the_cut(
    cluster_topology: ClusterTopology,
) -> None:
    topology = cluster_topology
    a = topology.masters()[0]
    on_a = topology.node_client(a["address"])
    kept, lost = _key_in(a["slots"], "ct:kept"), _key_in(a["slots"], "ct:lost")
    on_a.set(kept, "before the cut")
    assert on_a.wait(1, 1000) == 1

    topology.cut_off_replica_of(a["address"])
    on_a.set(lost, "after the cut")
    started = time.monotonic()
    assert on_a.wait(1, 100) == 0
    assert time.monotonic() - started >= 0.09
    assert on_a.info("replication")["connected_slaves"] == 1
    on_replica = topology.node_client(a["replica"])
    assert on_replica.info("replication")["master_link_status"] == "up"

    new = topology.fail_over(a["address"])
    assert new == a["replica"]
    on_new = topology.node_client(new)
    assert on_new.get(lost) is None
    assert on_new.get(kept) == b"before the cut"
    rc = topology.cluster_client()
    try:
        assert rc.get(lost) is None
        assert rc.get(kept) == b"before the cut"
    finally:
        rc.close()

    topology.restart_old_master_as_replica(a["address"])
    back = next(m for m in topology.masters() if m["address"] == new)
    assert back["replica"] == a["address"]
    on_new.set(lost, "after the restart")
    assert on_new.wait(1, 1000) == 1
    replica_a = topology.node_client(a["address"], single_connection_client=True)
    replica_a.execute_command("READONLY")
    assert wait_for(lambda: replica_a.get(lost) == b"after the restart", 5)
    replica_a.close()
    assert on_a.info("replication")["role"] == "slave"

    topology.heal()
    masters = topology.masters()
    assert len(masters) == 3 and all(m["replica"] for m in masters)
    rc = topology.cluster_client()
    try:
        rc.delete(kept)
        rc.delete(lost)
    finally:
        rc.close()
    print(
        "\ncluster timings:", {k: [round(v, 2) for v in vs] for k, vs in topology.timings.items()}
    )
