"""Redis Cluster (issue 12, deliverable 2): one model's entries spread over every master,
and the bus on sharded pub/sub. Each measure starts a private cluster of 3 masters and 3
replicas (benchmarks/cluster.py, which `make bench` runs too); the coherence and
resilience tests run on a cluster in `make test-topologies`."""

from __future__ import annotations

import pytest

from benchmarks.cluster import measure_bus, measure_spread

pytestmark = pytest.mark.django_db(transaction=True)


def test_100000_rows_of_one_model_spread_over_every_master_within_5_points() -> None:
    spread = measure_spread(100_000)
    print(f"\n[cluster] spread: {spread}")
    assert spread["stored"] == spread["entries"] == 100_000
    assert spread["masters"] == 3
    for share in spread["shares_pct"].values():
        assert abs(share - 100 / 3) <= 5, spread["shares_pct"]


def test_the_bus_message_is_fanned_out_by_the_channels_shard_only() -> None:
    """SPUBLISH: one node sends to the subscribers, and the message crosses the cluster bus
    to that shard's replica only; a plain PUBLISH crosses it to every other node."""
    bus = measure_bus(subscribers=12, messages=500)
    print(f"\n[cluster] bus: {bus}")
    assert bus["nodes"] == 6
    assert bus["spublish"]["nodes_sending_to_clients"] == 1
    assert bus["spublish"]["cluster_bus_messages_per_message"] <= 1.05
    assert bus["publish"]["cluster_bus_messages_per_message"] >= 4.95
