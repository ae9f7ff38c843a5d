"""A process that does not read costs next to nothing (guarantee 13): no heartbeat and no
other Redis command while idle, at most one heartbeat per BUS_HEARTBEAT while reading, and
the first read after a pause waits one round trip for its heartbeat instead of going to
the database. Counted on a private redis-server (INFO), never timed."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.testapp.factories import FlowFactory
from tests.testapp.models import Flow
from tiered_cache.conf import conf
from tiered_cache.reporting import publish_stats
from tiered_cache.tiers.remote import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)

T = "tests.coherence_tasks."
IDLE = "benchmarks.idle."


class Calls:
    """Calls per command the private server processed, read through one connection of
    ours (a new one would count its own HELLO)."""

    def __init__(self, env: Any) -> None:
        self.client = env.server.client()
        self()

    def __call__(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def heartbeats(self) -> int:
        """Heartbeats: a PUBLISH to the process's own channel (a PING where Redis refuses
        CLIENT REPLY); the reading process publishes nothing else."""
        calls = self()
        return sum(calls.get(c, 0) for c in ("ping", "publish", "spublish"))


def test_an_idle_process_sends_nothing_to_redis(own_redis: Any) -> None:
    flow = FlowFactory()
    w = own_redis.worker("idle")
    w.call(IDLE + "read_and_settle", flow.pk)
    time.sleep(2 * conf.BUS_TRUST_WINDOW)  # its last heartbeat answered, trust lapsed
    # This process wrote the row: push its counters now, or its publisher would in the window.
    redis_tier.wait_for_fills()
    publish_stats()
    calls = Calls(own_redis)
    before = calls()
    time.sleep(3)
    after = calls()
    sent = {c: n - before.get(c, 0) for c, n in after.items() if c != "info"}
    sent = {c: n for c, n in sent.items() if n}
    assert sent == {}, f"an idle process sent {sent} in 3 s"
    info = w.call(T + "bus_info")
    assert info["connected"] and info["listener_alive"], "the subscription stays open"


def test_a_reading_process_keeps_trust_with_few_heartbeats(own_redis: Any) -> None:
    flow = FlowFactory()
    w = own_redis.worker("reader")
    w.call(IDLE + "read_and_settle", flow.pk)
    calls = Calls(own_redis)
    p0 = calls.heartbeats()
    seconds = 2.0
    got = w.call(IDLE + "read_for", flow.pk, seconds, timeout=60)
    p1 = calls.heartbeats()
    allowed = seconds / conf.BUS_HEARTBEAT + 2
    assert p1 - p0 <= allowed, f"{p1 - p0} heartbeats in {seconds} s of reads"
    stats = got["stats"]
    # Trust was renewed before it lapsed: nearly every read came from L1.
    assert stats["l1_hits"] >= 0.99 * got["reads"], stats
    assert stats["misses"] <= 1, stats


def test_the_first_read_after_a_pause_waits_for_its_heartbeat(own_redis: Any) -> None:
    flow = FlowFactory()
    w = own_redis.worker("pausing")
    w.call(IDLE + "read_and_settle", flow.pk)
    time.sleep(2 * conf.BUS_TRUST_WINDOW)
    assert not w.call(T + "bus_info")["trusted"], "trust lapses without reads"
    w.call(T + "reset_counters_keep_l1")
    assert w.call(T + "read", flow.pk)[0] == flow.current_step
    stats = w.call(T + "stats")
    assert stats["l1_hits"] == 1 and stats["misses"] == 0, stats


def test_a_heartbeat_after_redis_closed_an_idle_connection_keeps_the_bus(own_redis: Any) -> None:
    """Redis's `timeout` closes idle clients, subscribers spared: the heartbeat connection of
    a process that stopped reading is closed. Its next read connects it again and is
    vouched for at once: no lost heartbeat, no listener started over (which clears L1)."""
    from tiered_cache.bus import bus

    flow = FlowFactory()
    client = own_redis.server.client()
    client.config_set("timeout", 1)
    try:
        assert bus.wait_trusted(10)
        Flow.objects.get_cached(pk=flow.pk)
        reconnects = bus.reconnects
        time.sleep(2.5)  # Redis closes the idle heartbeat connection
        bus.ensure_started()  # what a read does once trust lapsed: a heartbeat, a wait
        assert bus.trusted(), "the first read after the idle spell is vouched for"
        assert bus.reconnects == reconnects, "the listener did not start over"
    finally:
        client.config_set("timeout", 0)
