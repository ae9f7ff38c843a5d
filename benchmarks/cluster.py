"""Redis Cluster at work (issue 12): on a private cluster of 3 masters and 3 replicas
(tests/cluster_topology.py), with the cache pointed at it through
tiered_cache.cluster.ClusterClient.

- spread: N rows of one model stored by warmup; how many of its entries each master
  holds (from the shards' indexes, grouped by the master owning each shard's slot).
- bus: the cost of one bus message to P subscribers on every node, by sharded pub/sub
  (SPUBLISH, what the bus uses: one node fans it out) and by a plain PUBLISH (which the
  cluster forwards to every node): bytes each node sent, per message.
- writes: the round trip of one row's invalidation (SHARDS scripts, one WAIT per master,
  then the SPUBLISH), median, beside a cached read's L2 round trip."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _on_cluster() -> tuple[Any, Any]:
    from django.conf import settings
    from django.test import override_settings

    from tests import topologies
    from tests.cluster_topology import ClusterTopology
    from tests.coherence_tasks import reset_core

    topology = ClusterTopology(Path(tempfile.mkdtemp(prefix="tc-cluster-bench-")))
    topology.start()
    entry = topologies.cache_entry("cluster", topology, settings.TEST_KEY_PREFIX)
    override = override_settings(CACHES={"default": entry})
    override.enable()
    reset_core()
    return topology, override


def _off_cluster(topology: Any, override: Any) -> None:
    from tests.coherence_tasks import reset_core

    reset_core()
    override.disable()
    reset_core()
    topology.stop()


def entries_per_master(topology: Any, model: Any) -> dict[str, int]:
    """The model's live entries on each master, counted from its shards' indexes."""
    from redis.crc import key_slot

    from tiered_cache.registry import first_model_cache
    from tiered_cache.tiers.remote import redis_tier

    mc = first_model_cache(model)
    assert mc is not None
    client = redis_tier.client
    out: dict[str, int] = {}
    now_ms = int(time.time() * 1000)
    for shard in mc.home.shards:
        gen = client.get(shard.gen_key)
        n = int(client.zcount(shard.index_key(mc.label, gen or b""), now_ms, "+inf")) if gen else 0
        master = topology.master_of_slot(key_slot(shard.tag.strip("{}").encode()))
        key = f"{master[0]}:{master[1]}"
        out[key] = out.get(key, 0) + n
    return out


def measure_spread(rows: int = 100_000) -> dict[str, Any]:
    """Store `rows` rows of one model (warmup) and report each master's share."""
    from tests.testapp.models import Tenant
    from tiered_cache import reads
    from tiered_cache.registry import first_model_cache
    from tiered_cache.tiers.remote import redis_tier

    topology, override = _on_cluster()
    try:
        base = sum(
            int(topology.node_client(tuple(m["address"])).info("memory")["used_memory"])
            for m in topology.masters()
        )
        Tenant.objects.all().delete()
        Tenant.objects.bulk_create(
            [Tenant(name=f"tenant-{i}") for i in range(rows)], batch_size=5000
        )
        mc = first_model_cache(Tenant)
        assert mc is not None
        t0 = time.perf_counter()
        done = reads.warm(Tenant.objects, mc, Tenant.objects.all(), batch_size=2000)
        seconds = time.perf_counter() - t0
        redis_tier.wait_for_fills()
        per = entries_per_master(topology, Tenant)
        total = sum(per.values())
        used = sum(
            int(topology.node_client(tuple(m["address"])).info("memory")["used_memory"])
            for m in topology.masters()
        )
        return {
            "rows": rows,
            "stored": done["stored"],
            "warm_seconds": round(seconds, 1),
            "entries": total,
            "shares_pct": {k: round(100 * v / total, 2) for k, v in sorted(per.items())},
            "masters": len(per),
            # Entries, row versions and index members of the rows, over all masters.
            "bytes_per_row": round((used - base) / max(1, total)),
        }
    finally:
        Tenant.objects.all().delete()
        _off_cluster(topology, override)


def measure_bus(subscribers: int = 32, messages: int = 2000) -> dict[str, Any]:
    """What one bus message costs the cluster with `subscribers` processes listening, by
    sharded pub/sub (SSUBSCRIBE on the node owning the channel, SPUBLISH: what the bus
    does) and by plain pub/sub (SUBSCRIBE on any node, PUBLISH, which the cluster
    forwards over its bus to every node): per message, the cluster-bus messages the nodes
    exchanged and how many nodes sent it to clients."""

    from tiered_cache.keys import channel

    topology, override = _on_cluster()
    try:
        cluster = topology.cluster_client()
        ch = channel()
        owner = cluster.get_node_from_key(ch)
        addresses = [tuple(m["address"]) for m in topology.masters()]
        addresses += [tuple(r) for m in topology.masters() for r in m.get("replicas", [])]
        nodes = [topology.node_client(a) for a in addresses]
        out: dict[str, Any] = {
            "subscribers": subscribers,
            "messages": messages,
            "nodes": len(nodes),
        }
        payload = b'{"o": "x", "g": "default:testapp.tenant", "r": ["1.i1"], "f": 0}'
        for how in ("spublish", "publish"):
            subs = []
            for i in range(subscribers):
                if how == "spublish":
                    # Straight to the node, as the plain subscribers below (not through
                    # the test relay in front of it).
                    s = topology.node_client((owner.host, owner.port)).pubsub()
                    s.ssubscribe(ch)
                else:
                    host, port = addresses[i % len(addresses)]
                    s = topology.node_client((host, port)).pubsub()
                    s.subscribe(ch)
                subs.append(s)
            time.sleep(0.3)
            _reset(nodes)
            before = [_counters(n) for n in nodes]
            cpu_before = _cpu_seconds(nodes)
            for _ in range(messages):
                if how == "spublish":
                    cluster.spublish(ch, payload)
                else:
                    cluster.execute_command("PUBLISH", ch, payload, target_nodes=owner)
            time.sleep(0.5)
            after = [_counters(n) for n in nodes]
            cpu_used = _cpu_seconds(nodes) - cpu_before
            # The fan-out is PUBLISH's or SPUBLISH's own time.
            cpu = (
                sum(
                    int(st["usec"])
                    for n in nodes
                    for name, st in n.info("commandstats").items()
                    if name in ("cmdstat_publish", "cmdstat_spublish")
                )
                / messages
            )
            sent = [(a[0] - b[0]) / messages for a, b in zip(after, before, strict=True)]
            bus_msgs = sum(a[1] - b[1] for a, b in zip(after, before, strict=True)) / messages
            out[how] = {
                "client_bytes_per_message": round(sum(sent)),
                "nodes_sending_to_clients": sum(1 for v in sent if v > 20),
                "cluster_bus_messages_per_message": round(bus_msgs, 2),
                "redis_us_per_message": round(cpu, 1),
                "redis_us_per_delivery": round(cpu / subscribers, 2),
                # Process CPU of every node (socket writes included), idle work included.
                "node_cpu_us_per_delivery": round(1e6 * cpu_used / messages / subscribers, 2),
            }
            for s in subs:
                s.close()
        return out
    finally:
        _off_cluster(topology, override)


def _cpu_seconds(nodes: list[Any]) -> float:
    total = 0.0
    for n in nodes:
        info = n.info("cpu")
        total += float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
    return total


def _counters(node: Any) -> tuple[int, int]:
    """(bytes sent to clients, pub/sub messages sent over the cluster bus) of one node."""
    info = node.info("stats")
    cluster = node.execute_command("CLUSTER", "INFO")
    if isinstance(cluster, bytes):
        cluster = cluster.decode()
    fields = dict(line.split(":", 1) for line in str(cluster).splitlines() if ":" in line)
    bus = sum(
        int(fields.get(k, 0))
        for k in ("cluster_stats_messages_publish_sent", "cluster_stats_messages_publishshard_sent")
    )
    return int(info["total_net_output_bytes"]), bus


def _on_single() -> tuple[Any, Any]:
    from django.conf import settings
    from django.test import override_settings

    from tests.coherence_tasks import reset_core
    from tests.redis_server import RedisServer

    server = RedisServer(Path(tempfile.mkdtemp(prefix="tc-single-bench-")))
    server.start()
    override = override_settings(
        CACHES={"default": {**settings.CACHES["default"], "LOCATION": server.url}}
    )
    override.enable()
    reset_core()
    return server, override


def _reset(clients: list[Any]) -> None:
    for c in clients:
        c.config_resetstat()


# Commands clients send us (a script's inner commands are counted by Redis too, and
# their time is inside the script's).
_TOP = ("cmdstat_evalsha", "cmdstat_spublish", "cmdstat_wait", "cmdstat_ping")


def _commands(clients: list[Any]) -> tuple[int, float]:
    """(commands clients sent, µs Redis spent running them) since _reset, summed over the
    nodes: Redis's own accounting (INFO commandstats), blind to the rest of the machine.
    PUBLISH is left out: inside a script on one server, sent after the scripts on a
    cluster (SPUBLISH, counted)."""
    calls = usec = 0
    for c in clients:
        for name, st in c.info("commandstats").items():
            if name in _TOP:
                calls += int(st["calls"])
                usec += int(st["usec"])
    return calls, float(usec)


def measure_writes(samples: int = 300, on: str = "cluster") -> dict[str, Any]:
    """On a private cluster or single server: one row's invalidation round trip and an L2
    hit's (medians, ms), and the Redis CPU each costs (µs, summed over the nodes)."""
    from tests.testapp.models import Tenant
    from tiered_cache import clear_local
    from tiered_cache.bus import bus
    from tiered_cache.invalidation import rows_batch
    from tiered_cache.keys import shard_count
    from tiered_cache.tiers.remote import redis_tier

    if on == "cluster":
        topology, override = _on_cluster()
        nodes = [topology.node_client(tuple(m["address"])) for m in topology.masters()]
    else:
        topology, override = _on_single()
        nodes = [topology.client()]
    try:
        bus.wait_trusted()
        t = Tenant.objects.create(name=f"bench-write-{on}")
        Tenant.objects.get_cached(pk=t.pk)
        redis_tier.wait_for_fills()
        writes, reads_ = [], []
        _reset(nodes)
        cpu0 = _cpu_seconds(nodes)
        for _ in range(samples):
            t0 = time.perf_counter()
            rows_batch(Tenant, [t.pk], "default").apply(notify=False)
            writes.append(time.perf_counter() - t0)
        w_cpu = _cpu_seconds(nodes) - cpu0
        w_calls, w_usec = _commands(nodes)
        Tenant.objects.get_cached(pk=t.pk)
        redis_tier.wait_for_fills()
        _reset(nodes)
        cpu0 = _cpu_seconds(nodes)
        for _ in range(samples):
            clear_local()
            t0 = time.perf_counter()
            Tenant.objects.get_cached(pk=t.pk)
            reads_.append(time.perf_counter() - t0)
        r_cpu = _cpu_seconds(nodes) - cpu0
        r_calls, r_usec = _commands(nodes)
        t.delete()
        return {
            "on": on,
            "shards": shard_count(),
            "invalidation_ms_median": round(1000 * statistics.median(writes), 3),
            "l2_hit_ms_median": round(1000 * statistics.median(reads_), 3),
            # Heartbeats and the stats publisher run meanwhile: counted in, as in production.
            "commands_per_invalidation": round(w_calls / samples, 2),
            "redis_us_per_invalidation": round(w_usec / samples, 1),
            "commands_per_l2_hit": round(r_calls / samples, 2),
            "redis_us_per_l2_hit": round(r_usec / samples, 1),
            # The nodes' process CPU (networking included), over the masters.
            "node_cpu_us_per_invalidation": round(1e6 * w_cpu / samples, 1),
            "node_cpu_us_per_l2_hit": round(1e6 * r_cpu / samples, 1),
        }
    finally:
        if on == "cluster":
            _off_cluster(topology, override)
        else:
            from tests.coherence_tasks import reset_core

            reset_core()
            override.disable()
            reset_core()
            topology.stop()


def format_result(
    spread: dict[str, Any], busr: dict[str, Any], writes: list[dict[str, Any]]
) -> str:
    lines = [
        f"Redis Cluster, 3 masters + 3 replicas, SHARDS={spread.get('shards', 12)}",
        f"  spread: {spread['entries']:,} entries of one model ({spread['rows']:,} rows, "
        f"warmup {spread['warm_seconds']} s), share per master %: "
        + ", ".join(f"{v}" for v in spread["shares_pct"].values())
        + f"; Redis memory per cached row: {spread['bytes_per_row']} bytes",
    ]
    for how, label in (("spublish", "sharded pub/sub (the bus)"), ("publish", "plain PUBLISH")):
        b = busr[how]
        lines.append(
            f"  bus, {label}, {busr['subscribers']} subscribers: per message "
            f"{b['cluster_bus_messages_per_message']} cluster-bus messages, "
            f"{b['client_bytes_per_message']:,} bytes to clients from "
            f"{b['nodes_sending_to_clients']} of {busr['nodes']} nodes, "
            f"{b['node_cpu_us_per_delivery']} µs of node CPU per delivery"
        )
    for w in writes:
        lines.append(
            f"  {w['on']} (SHARDS={w['shards']}): one row's invalidation "
            f"{w['invalidation_ms_median']} ms median, {w['commands_per_invalidation']} "
            f"commands, {w['node_cpu_us_per_invalidation']} µs of node CPU; an L2 hit "
            f"{w['l2_hit_ms_median']} ms, {w['commands_per_l2_hit']} commands, "
            f"{w['node_cpu_us_per_l2_hit']} µs of node CPU"
        )
    return "\n".join(lines)
