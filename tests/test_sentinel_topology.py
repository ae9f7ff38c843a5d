"""The Sentinel topology (tests/sentinel_topology.py) does what the failover tests rely on:
sentinels that hand clients the master, a replication link that can be cut without the
master noticing, a failover that promotes the cut-off replica and so loses the writes made
after the cut, an old master that comes back as a replica, and heal()."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from redis.sentinel import Sentinel

from tests.sentinel_topology import SentinelTopology

# Until tests/conftest.py lists it with the suite's other fixture plugins.
pytest_plugins = ("tests.sentinel_fixtures",)


def refused(port: int) -> bool:
    """Nothing listens on the port (a plain connect: redis-py would retry for seconds)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


@contextmanager
def sentinel_client(topology: SentinelTopology) -> Iterator[Any]:
    """redis-py's own Sentinel client, as an application would use it (untyped: Any)."""
    sentinel: Any = Sentinel(  # type: ignore[no-untyped-call]
        topology.sentinels, sentinel_kwargs={"socket_timeout": 2.0}, socket_timeout=2.0
    )
    try:
        yield sentinel
    finally:
        for s in sentinel.sentinels:
            s.close()


def test_clients_find_the_master_and_the_replica(sentinel_topology: SentinelTopology) -> None:
    topology = sentinel_topology
    topology.heal()
    with sentinel_client(topology) as sentinel:
        assert sentinel.discover_master(topology.SERVICE) == topology.master_address()
        assert len(sentinel.discover_slaves(topology.SERVICE)) == 1
        master = sentinel.master_for(topology.SERVICE, socket_timeout=2.0)
        master.set("round-trip", "1")
        assert master.wait(1, 5000) == 1
        replica = sentinel.slave_for(topology.SERVICE, socket_timeout=2.0)
        assert replica.get("round-trip") == b"1"
        assert replica.info("replication")["role"] == "slave"
        assert topology.replica_client().get("round-trip") == b"1"
        master.close()
        replica.close()


def test_cut_off_replica_is_promoted_without_the_writes_made_after_the_cut(
    sentinel_topology: SentinelTopology,
) -> None:
    topology = sentinel_topology
    topology.heal()
    old_address = topology.master_address()
    master = topology.master_client()
    master.set("before-cut", "1")

    topology.cut_off_replica()
    assert topology.replica_client().get("before-cut") == b"1"
    master.set("after-cut", "lost")
    started = time.monotonic()
    assert master.wait(1, 100) == 0  # the replica never acknowledges...
    assert time.monotonic() - started >= 0.09
    info = master.info("replication")
    assert info["connected_slaves"] == 1  # ...yet the master believes it connected
    assert info["slave0"]["state"] == "online"
    assert topology.replica_client().get("after-cut") is None
    assert topology.replica_client().info("replication")["master_link_status"] == "up"

    new_address = topology.fail_over()
    assert new_address != old_address
    assert refused(master.connection_pool.connection_kwargs["port"])  # killed
    with sentinel_client(topology) as sentinel:
        assert sentinel.discover_master(topology.SERVICE) == new_address
        new_master = sentinel.master_for(topology.SERVICE, socket_timeout=2.0)
        assert new_master.info("replication")["role"] == "master"
        assert new_master.get("after-cut") is None  # the acknowledged write is lost
        assert new_master.get("before-cut") == b"1"
        with pytest.raises(LookupError):
            topology.replica_client()

        topology.restart_old_master_as_replica()
        new_master.set("after-restart", "1")
        assert new_master.wait(1, 1000) == 1
        replica = topology.replica_client()
        assert replica.info("replication")["role"] == "slave"
        assert replica.get("after-restart") == b"1"
        assert replica.get("before-cut") == b"1"  # resynced from the new master
        assert replica.get("after-cut") is None
        assert sentinel.discover_slaves(topology.SERVICE) == [old_address]
        new_master.close()

    topology.heal()
    assert topology.master_address() == old_address
    master = topology.master_client()
    master.set("healed", "1")
    assert master.wait(1, 5000) == 1


def test_fail_over_works_both_ways_and_heal_keeps_a_healthy_topology(
    sentinel_topology: SentinelTopology,
) -> None:
    topology = sentinel_topology
    topology.heal()
    first = topology.master_address()
    second = topology.fail_over()
    topology.restart_old_master_as_replica()
    assert topology.fail_over() == first  # back to the node behind the relay
    topology.restart_old_master_as_replica()
    topology.master_client().set("kept", "1")
    # The first node is master again: its link can be cut again.
    topology.cut_off_replica()
    topology.heal()  # a cut link needs a restart: empty again
    assert topology.master_address() == first
    assert topology.master_client().get("kept") is None
    topology.master_client().set("kept", "1")
    started = time.monotonic()
    topology.heal()  # healthy: nothing restarted, nothing lost
    assert time.monotonic() - started < 1
    assert topology.master_client().get("kept") == b"1"
    assert second == ("127.0.0.1", topology.second.port)


def test_stop_leaves_no_process_behind(tmp_path: Path) -> None:
    topology = SentinelTopology(tmp_path)
    topology.start()
    parts: list[Any] = [topology.relay, *topology.nodes, *topology._sentinels]
    processes = [p.proc for p in parts]
    assert all(p is not None and p.poll() is None for p in processes)
    topology.stop()
    topology.stop()  # idempotent
    assert all(p is not None and p.poll() is not None for p in processes)
    assert all(refused(port) for _, port in topology.sentinels)
    assert refused(topology.relay.port)
