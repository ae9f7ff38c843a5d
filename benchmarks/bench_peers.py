"""`make bench-peers`: django-cachalot and django-cacheops on the same models and database,
each in its own process of the .venv-peers virtualenv, beside tiered_cache in that process.

    .venv-peers/bin/python -m benchmarks.bench_peers [--rounds N] [--json PATH]

Each peer process recreates the database tiered_cache_bench_peers (dropped at the end),
fills it as `make bench` does, and measures in shuffled rounds: the plain ORM get by pk
(the peer switched off for it), the peer's cached get by pk (warm), and tiered_cache's L1
and L2 hits. Only ratios within one process are compared.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from benchmarks import bench

PEERS = ("cachalot", "cacheops")
NS = 1_000.0


def measure(peer: str, rounds: int) -> dict[str, Any]:
    """In a process set up for one peer: {case: [µs per op, one per round]}."""
    import tiered_cache
    from demo_project.demo.models import User

    plan = bench.Plan(rounds=rounds, scale=1.0, user_pool=500, memory_sizes=(), latency_samples=0)
    data = bench.make_data(plan, 0)
    if not bench._wait_for_trust(5):
        raise RuntimeError("the invalidation bus did not become trusted within 5 s")
    hot = data.hot
    now = time.perf_counter_ns

    if peer == "cachalot":
        from cachalot.api import cachalot_disabled

        def orm(pk: int) -> Any:
            with cachalot_disabled():
                return User.objects.get(pk=pk)

        def cached(pk: int) -> Any:
            return User.objects.get(pk=pk)  # every query goes through cachalot
    else:

        def orm(pk: int) -> Any:
            return User.objects.nocache().get(pk=pk)

        def cached(pk: int) -> Any:
            return User.objects.get(pk=pk)  # CACHEOPS: demo.* ops "get"

    def loop(fn: Any, n: int, before_each: Any = None) -> float:
        seq = [hot[i % len(hot)] for i in range(n)]
        if before_each is None:
            t = now()
            for pk in seq:
                fn(pk)
            return (now() - t) / n / NS
        total = 0
        for pk in seq:
            if before_each is not None:
                before_each()
            t = now()
            fn(pk)
            total += now() - t
        return total / n / NS

    def ours(pk: int) -> Any:
        return User.objects.get_cached(pk=pk)

    for pk in hot:  # warm every cache
        orm(pk)
        cached(pk)
        ours(pk)
    from tiered_cache.tiers.remote import redis_tier

    redis_tier.wait_for_fills()
    # Sanity: the peer really answers from its cache (no query to the database).
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as q:
        cached(hot[0])
    if len(q):
        raise RuntimeError(f"{peer}: a warm cached get still ran {len(q)} queries")

    # As in benchmarks/bench.py: what setup made is frozen, so the collector's full passes do
    # not walk it over and over inside the timed loops.
    gc.collect()
    gc.freeze()
    cases = {
        "orm": lambda: loop(orm, 40),
        "peer": lambda: loop(cached, 40),
        "l1": lambda: (loop(ours, len(hot)), loop(ours, 4000))[1],  # the first loop fills L1
        "l2": lambda: loop(ours, 100, tiered_cache.clear_local),
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    rng = random.Random(7)
    for r in range(rounds + 1):
        order = list(cases)
        rng.shuffle(order)
        for k in order:
            us = cases[k]()
            if r:
                samples[k].append(us)
    import importlib.metadata as md

    return {"peer": peer, "version": md.version(f"django-{peer}"), "samples": samples}


def child(peer: str, rounds: int, out: str) -> int:
    os.environ["TC_BENCH_PEER"] = peer
    prefix = bench.configure_django(
        os.environ.get("TC_BENCH_DB", "tiered_cache_bench_peers"), "benchmarks.bench_peers_settings"
    )
    atexit.register(bench._delete_keys_quietly, prefix)  # after the stats publisher's last push
    status = 0
    try:
        bench.recreate_database()
        result = measure(peer, rounds)
        with open(out, "w") as f:
            json.dump(result, f)
    except Exception:
        traceback.print_exc()
        status = 1
    finally:
        try:
            from tiered_cache.bus import bus

            bus.stop()
            bench.delete_redis_keys(prefix)
            bench.recreate_database(create=False)
        except Exception:
            traceback.print_exc()
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_peers")
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peer:
        return child(args.peer, args.rounds, args.out)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for peer in PEERS:
            out = os.path.join(tmp, f"{peer}.json")
            print(f"[{peer}] measuring ({args.rounds} rounds)...", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_peers",
                    "--peer",
                    peer,
                    "--rounds",
                    str(args.rounds),
                    "--out",
                    out,
                ]
            )
            if proc.returncode:
                print(f"[{peer}] failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            with open(out) as f:
                results.append(json.load(f))

    import django

    med = bench._median
    rows = []
    for res in results:
        s = res["samples"]
        run = f"{res['peer']} {res['version']} run"
        for key, label in (
            ("orm", "ORM get(pk), peer off"),
            ("peer", f"django-{res['peer']} cached get(pk), warm"),
            ("l1", "tiered_cache get_cached(pk) L1 hit"),
            ("l2", "tiered_cache get_cached(pk) L2 hit"),
        ):
            ratio = med([x / y for x, y in zip(s[key], s["orm"], strict=True)])
            rows.append({"run": run, "case": label, "median_us": med(s[key]), "vs_orm": ratio})
    print(
        f"Peers, same models, database and Redis; Django {django.get_version()}, "
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} cores, "
        f"{args.rounds} rounds per process."
    )
    head = ["process", "case", "median µs", "vs ORM get"]
    body = [
        [r["run"], r["case"], bench._fmt_us(r["median_us"]), bench._fmt_vs(r["vs_orm"])]
        for r in rows
    ]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(4)]

    def line(cells: list[str]) -> str:
        return (
            "| "
            + " | ".join(
                c.rjust(w) if i >= 2 else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    print(line(head))
    print(
        "|"
        + "|".join(("-" * (w + 1) + ":") if i >= 2 else "-" * (w + 2) for i, w in enumerate(widths))
        + "|"
    )
    for b in body:
        print(line(b))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
