"""The Redis Sentinel topology (tests/sentinel_topology.py) as a pytest fixture: one per
test module, since starting it costs about a second and a failover several.

Not a plugin of the suite yet: tests/conftest.py lists it in pytest_plugins when a test
module needs it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.sentinel_topology import SentinelTopology


@pytest.fixture(scope="module")
def sentinel_topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelTopology]:
    """A started topology, healthy at the start of the module, stopped (every process
    killed) at its end. Tests that break it call heal() first, or last."""
    topology = SentinelTopology(tmp_path_factory.mktemp("sentinel"))
    try:
        topology.start()
        yield topology
    finally:
        topology.stop()
