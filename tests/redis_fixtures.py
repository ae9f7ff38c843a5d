"""Fixtures pointing the cache at a private redis-server (tests/redis_server.py), in this
process and in spawned worker processes. The shared server on 6379 is never touched."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from tests.redis_server import RedisServer, fill_with_junk, free_port

# Loaded as a plugin (tests/conftest.py) before Django is set up: what needs the app
# registry is imported when used.


def _reset_core() -> None:
    from tests.coherence_tasks import reset_core

    reset_core()


class RedisEnv:
    """The private server, and worker processes pointed at it (spawned on first use and
    kept for the module: each costs a second or more to start)."""

    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self._workers: dict[str, Any] = {}

    def worker(self, name: str) -> Any:
        from tests.processes import Worker

        w = self._workers.get(name)
        if w is None or not w.process.is_alive():
            # TEST_REDIS_URL comes from the overridden CACHES (tests/processes.py).
            w = self._workers[name] = Worker()
        return w

    def workers(self) -> list[Any]:
        return list(self._workers.values())

    def close(self) -> None:
        for w in self._workers.values():
            w.close()
        self._workers.clear()


class TopologyServer:
    """own_redis's server in a TC_TOPOLOGY run (tests/topologies.py): the run's Sentinel
    setup or cluster, which the cache already points at, with the faults of a single server
    that mean the same on a topology: every node (and sentinel) paused, every node killed
    and the topology started again empty, junk, FLUSHALL, and its addresses refusing
    connections with the data kept (the relays in front stopped). Tests of other faults are
    marked single_server. A topology's own fault, a failover, is tests/test_failover.py's."""

    def __init__(self, topology: Any) -> None:
        self.topology = topology
        self.url = settings.CACHES["default"]["LOCATION"]
        self.cluster = hasattr(topology, "cluster_client")
        self.paused = False

    def client(self) -> Any:
        """A plain client to the data, straight to the nodes (not through the relays the
        cache goes through, which hide() stops): the cluster, or the Sentinel master."""
        if not self.cluster:
            return self.topology.master_client()
        from redis.cluster import ClusterNode, RedisCluster

        real = {n.relay_port: n.port for n in self.topology.nodes}
        return RedisCluster(
            startup_nodes=[
                ClusterNode("127.0.0.1", n.port) for n in self.topology.nodes if n.alive()
            ],
            address_remap=lambda addr: (addr[0], real.get(addr[1], addr[1])),
            socket_timeout=5,
            socket_connect_timeout=5,
        )

    def _processes(self) -> list[Any]:
        """The data nodes, and the sentinels (paused with them, they see nothing fail)."""
        nodes = [n.proc for n in self.topology.nodes]
        if not self.cluster:
            nodes += [s.proc for s in self.topology._sentinels]
        return [p for p in nodes if p is not None and p.poll() is None]

    def pause(self) -> None:
        for p in self._processes():
            p.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        for p in self._processes():
            p.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        """Every data node killed: nothing answers, every key is lost."""
        if self.paused:
            self.resume()
        for n in self.topology.nodes:
            n.kill()

    def start(self) -> None:
        """Everything started again (empty: the nodes keep nothing)."""
        self.heal()

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def hide(self) -> None:
        """Every node's address refuses connections, the data stays (the relays clients go
        through stop; the cluster bus goes straight between nodes)."""
        if not self.cluster:
            # The master's address is its relay's: the sentinels lose it too, and fail over
            # to the replica meanwhile.
            self.topology.relay.kill()
            return
        for n in self.topology.nodes:
            if n.relay is not None:
                n.relay.stop()
                n.relay = None

    def unhide(self) -> None:
        self.topology.heal()

    def fill_with_junk(self, prefix: str) -> int:
        return fill_with_junk(self.client(), prefix)

    def heal(self) -> None:
        if self.paused:
            self.resume()
        self.topology.heal()


@pytest.fixture(scope="module")
def redis_env(django_db_setup: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisEnv]:
    from tests import topologies

    if topologies.current is not None:
        _reset_core()
        env = RedisEnv(TopologyServer(topologies.current))  # type: ignore[arg-type]
        try:
            yield env
        finally:
            env.close()
            _reset_core()
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    caches = {"default": {**settings.CACHES["default"], "LOCATION": server.url}}
    override = override_settings(CACHES=caches)
    override.enable()
    _reset_core()
    env = RedisEnv(server)
    try:
        yield env
    finally:
        env.close()
        server.stop()
        override.disable()
        _reset_core()


@pytest.fixture
def own_redis(redis_env: RedisEnv) -> Iterator[RedisEnv]:
    """A healthy private server at the start and the end of every test; this process and
    the module's workers start with clean counters, L1 and breaker."""
    redis_env.server.heal()
    for w in redis_env.workers():
        w.call("tests.coherence_tasks.reset_for_test")
    from tests.coherence_tasks import reset_for_test

    reset_for_test()
    try:
        yield redis_env
    finally:
        redis_env.server.heal()


@pytest.fixture
def redis_unreachable() -> Iterator[str]:
    """This process's cache pointed at a closed port (connections refused at once), and
    back afterwards. For tests that need Redis really gone, not only the breaker open: an
    invalidation is sent past an open breaker, and the outbox is drained as soon as Redis
    answers the bus."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    override = override_settings(
        CACHES={"default": {**settings.CACHES["default"], "LOCATION": url}}
    )
    override.enable()
    _reset_core()
    try:
        yield url
    finally:
        override.disable()
        _reset_core()
