"""A private Redis Cluster (tests/cluster_topology.py) for one test module. Not registered
in conftest: a module that wants it imports `cluster_topology` from here."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster_topology import ClusterTopology


@pytest.fixture(scope="module")
def cluster_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTopology]:
    topology = ClusterTopology(tmp_path_factory.mktemp("redis-cluster"))
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
