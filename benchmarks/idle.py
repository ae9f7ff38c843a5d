"""What processes cost Redis and the CPU when they serve nothing (guarantee 13), and what a
reading process spends on liveness.

`measure_idle(n, seconds)` spawns n processes pointed at a private redis-server, has each
read one row (so its bus listener runs and its trust was granted once), pushes their
statistics, then counts over `seconds` of idleness: Redis commands per second
(INFO stats), the redis-server's CPU (INFO cpu) and the processes' CPU (/proc). Then one of
them reads in a loop for `seconds` and its heartbeats per second are counted (INFO
commandstats). The worker side of it is the functions below, called by path.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# -- the workers' side ---------------------------------------------------------------------


def read_and_settle(pk: int) -> int:
    """Read one row through the cache (the bus starts and is trusted), then push the
    statistics so that no push is left for the idle window. Returns the pid."""
    from tests.testapp.models import Flow
    from tiered_cache.bus import bus
    from tiered_cache.reporting import publish_stats
    from tiered_cache.tiers.remote import redis_tier

    bus.wait_trusted()
    Flow.objects.get_cached(pk=pk)
    Flow.objects.get_cached(pk=pk)
    redis_tier.wait_for_fills()
    publish_stats()
    return os.getpid()


def read_for(pk: int, seconds: float) -> dict[str, Any]:
    """Read one row in a loop for `seconds`: how many reads, and how they were served."""
    import tiered_cache
    from tests.testapp.models import Flow
    from tiered_cache.reporting import reset_stats

    reset_stats()
    n = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        Flow.objects.get_cached(pk=pk)
        n += 1
    return {"reads": n, "stats": tiered_cache.stats().get("testapp.flow", {})}


# -- this process's side --------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_idle(processes: int = 64, seconds: float = 10.0) -> dict[str, Any]:
    from tests.processes import Worker
    from tests.redis_server import RedisServer
    from tests.testapp.models import Flow

    server = RedisServer(Path(tempfile.mkdtemp(prefix="tc-idle-")))
    server.start()
    row = Flow.objects.create(tenant_id="bench-idle", session_id=str(os.getpid()))
    workers: list[Any] = []
    try:
        with ThreadPoolExecutor(16) as pool:
            workers = list(
                pool.map(lambda _: Worker({"TEST_REDIS_URL": server.url}), range(processes))
            )
        for w in workers:
            w.call("benchmarks.idle.read_and_settle", row.pk)
        client = server.client()
        time.sleep(1.0)  # the last heartbeats are answered, the listeners block on their sockets

        def counts() -> tuple[int, float, int]:
            stats, cpu = client.info("stats"), client.info("cpu")
            # Heartbeats: PUBLISHes to the process's own channel (PINGs where CLIENT REPLY
            # is refused); the reading process publishes nothing else.
            calls = client.info("commandstats")
            pings = sum(
                calls.get(f"cmdstat_{c}", {}).get("calls", 0)
                for c in ("ping", "publish", "spublish")
            )
            return (
                int(stats["total_commands_processed"]),
                float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
                int(pings),
            )

        c0, r0, _ = counts()
        p0 = {w.pid: _cpu_seconds(w.pid) for w in workers}
        t0 = time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - t0
        c1, r1, ping0 = counts()
        p1 = {w.pid: _cpu_seconds(w.pid) for w in workers}
        # Our own three INFO calls of the first counts() are in the difference.
        commands = max(0, c1 - c0 - 3)
        proc_cpu = sum(p1[pid] - p0[pid] for pid in p0)

        busy = workers[0].call("benchmarks.idle.read_for", row.pk, seconds, timeout=seconds + 30)
        ping1 = counts()[2]
        return {
            "processes": processes,
            "seconds": round(elapsed, 2),
            "redis_commands_per_s": round(commands / elapsed, 3),
            "redis_cpu_pct": round(100 * (r1 - r0) / elapsed, 3),
            "process_cpu_pct_total": round(100 * proc_cpu / elapsed, 3),
            "process_cpu_pct_each": round(100 * proc_cpu / elapsed / processes, 4),
            "busy_reads": busy["reads"],
            "busy_l1_hits": busy["stats"].get("l1_hits", 0),
            "busy_heartbeats_per_s": round((ping1 - ping0) / seconds, 2),
        }
    finally:
        for w in workers:
            try:
                w.close()
            except Exception:
                pass
        server.stop()
        Flow.objects.filter(pk=row.pk).delete()


def format_result(r: dict[str, Any]) -> str:
    return (
        f"{r['processes']} idle processes over {r['seconds']} s: "
        f"{r['redis_commands_per_s']} Redis commands/s, Redis CPU {r['redis_cpu_pct']} %, "
        f"processes' CPU {r['process_cpu_pct_total']} % of a core "
        f"({r['process_cpu_pct_each']} % each); one process reading: "
        f"{r['busy_heartbeats_per_s']} heartbeats/s over {r['busy_reads']:,} reads "
        f"({r['busy_l1_hits']:,} from L1)"
    )
