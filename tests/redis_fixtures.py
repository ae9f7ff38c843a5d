"""Fixtures pointing the cache at a private redis-server (tests/redis_server.py), in this
process and in spawned worker processes. The shared server on 6379 is never touched."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from django.conf import settings
from django.test import override_settings

from tests.redis_server import RedisServer, free_port

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
    setup or cluster, which the cache already points at. Faults of a single server
    (pause, hide, restart empty...) have no meaning here; tests/test_failover.py injects
    the faults of a topology."""

    def __init__(self, topology: Any) -> None:
        self.topology = topology
        self.url = settings.CACHES["default"]["LOCATION"]

    def client(self) -> Any:
        """A plain client to the data: the cluster, or the Sentinel master."""
        if hasattr(self.topology, "cluster_client"):
            return self.topology.cluster_client()
        return self.topology.master_client()

    def heal(self) -> None:
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
