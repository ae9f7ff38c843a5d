"""The Redis topology a test run uses: the shared single server (the default), or with
TC_TOPOLOGY=sentinel a Sentinel setup (1 master, 1 replica, 3 sentinels;
tests/sentinel_topology.py) or with TC_TOPOLOGY=cluster a Redis Cluster (3 masters, 3
replicas; tests/cluster_topology.py), started on spare ports by tests/settings.py (the
first thing pytest-django reads) and stopped at the end of the run (tests/conftest.py).

    TC_TOPOLOGY=cluster .venv/bin/pytest tests/test_coherence.py

The run's cache entry goes to TEST_CACHE_JSON, which tests/settings.py reads and worker
processes (tests/processes.py) inherit."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

KINDS = ("sentinel", "cluster")

# The topology of this run, once started (None on the single server).
current: Any = None
_workdir: Path | None = None


def kind() -> str | None:
    """The topology this run asked for, or None for the single shared server."""
    k = os.environ.get("TC_TOPOLOGY") or None
    if k is not None and k not in KINDS:
        raise SystemExit(f"TC_TOPOLOGY={k!r}: use one of {', '.join(KINDS)}")
    return k


def cache_entry(k: str, topology: Any, prefix: str) -> dict[str, Any]:
    """The suite's cache entry (as tests/settings.py builds it) on this topology."""
    base: dict[str, Any] = {
        "BACKEND": "django_redis.cache.RedisCache",
        "KEY_PREFIX": prefix,
        "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 0.25, "SOCKET_TIMEOUT": 0.25},
    }
    if k == "sentinel":
        entry: dict[str, Any] = topology.cache_settings(base)
        return entry
    return {
        **base,
        "LOCATION": ",".join(f"redis://{h}:{p}" for h, p in topology.startup_nodes),
        "OPTIONS": {**base["OPTIONS"], "CLIENT_CLASS": "tiered_cache.cluster.ClusterClient"},
    }


def start() -> None:
    """Start the run's topology (in the test process only: a worker process finds
    TEST_CACHE_JSON already set by its parent)."""
    global current, _workdir
    k = kind()
    if k is None or os.environ.get("TEST_CACHE_JSON"):
        return
    _workdir = Path(tempfile.mkdtemp(prefix=f"tc-{k}-"))
    if k == "sentinel":
        from tests.sentinel_topology import SentinelTopology

        topology: Any = SentinelTopology(_workdir)
    else:
        from tests.cluster_topology import ClusterTopology

        topology = ClusterTopology(_workdir)
    topology.start()
    current = topology
    prefix = f"tc-test-{k}-{os.getpid()}-{secrets.token_hex(4)}"
    os.environ["TC_TEST_KEY_PREFIX"] = prefix
    os.environ["TEST_CACHE_JSON"] = json.dumps(cache_entry(k, topology, prefix))


def stop() -> None:
    global current
    if current is not None:
        current.stop()
        current = None
    if _workdir is not None:
        shutil.rmtree(_workdir, ignore_errors=True)
