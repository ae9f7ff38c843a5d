"""`python -m benchmarks.instructions`: the read paths counted in CPU instructions.

This VM's speed drifts within minutes (see the README's Benchmarks), so a change of a few
per cent cannot be told by time. Valgrind's callgrind counts the instructions a thread
executes instead: run to run they repeat to within about 3 % here (the socket reads vary a
little), whatever else the machine does. Each case runs in a process of its own under
callgrind, twice, with two numbers of calls; the difference over the calls is the cost of
one, the set-up cancelling out. Only the main thread is counted (the bus listener and the
filler run in threads of their own).

    python -m benchmarks.instructions                      # every case, about 10 minutes
    python -m benchmarks.instructions --cases many_l2,floor_many

The rows are the bench's (`make_data`), in a database of their own, and are stored in L2 by
a process outside callgrind before each run, under a fixed key prefix; the database and the
keys are removed at the end. Under callgrind a process runs about 50 times slower, so it
trusts the bus for longer than the settings' default (BUS_TRUST_WINDOW), or every read would
go to the database.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DB = "tiered_cache_bench_instructions"
PREFIX = "tc-bench-instructions"

# case: (what it measures, calls in the short and the long run)
CASES = {
    "many_l2": ("get_many_cached(100) warm in L2, L1 cleared first", 5, 45),
    "floor_many": ("  floor: one MGET of the 100, then MAC, decode, instance", 5, 45),
    "many_l1": ("get_many_cached(100) warm in L1", 10, 110),
    "floor_many_l1": ("  floor: Model.from_db of 100 rows", 10, 110),
    "l2_pk": ("100 get_cached(pk) L2 hits, L1 cleared before each", 2, 6),
    "redis_get": ("  100 redis-py GETs of the same payloads", 2, 6),
    "floor_l2": ("  floor: each GET, then MAC, decode, instance", 2, 6),
    "l1_pk": ("100 get_cached(pk) L1 hits", 20, 220),
}


def _calls(case: str) -> Callable[[], Any]:
    """The function one call of `case` runs, its rows in L2 already (see _warm)."""
    from django.conf import settings

    from tiered_cache.conf import conf

    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "BUS_TRUST_WINDOW": 60.0}
    conf.forget()

    from benchmarks.bench import open_rows
    from demo_project.demo.models import User
    from tiered_cache.registry import model_cache
    from tiered_cache.tiers.local import local_tier
    from tiered_cache.tiers.remote import redis_tier

    mc = model_cache(User.objects)
    pks = _pks()
    keys = [mc.key(mc.pk_lookup, (pk,)) for pk in pks]
    client = redis_tier.client
    rows = [mc.codec.values(u) for u in User.objects.filter(pk__in=pks)]
    names = mc.codec.attnames

    def many_l2() -> None:
        local_tier.clear()
        User.objects.get_many_cached(pks)

    def floor_many() -> None:
        open_rows(mc, keys, client.mget(keys))

    def many_l1() -> None:
        User.objects.get_many_cached(pks)

    def floor_many_l1() -> None:
        for values in rows:
            User.from_db("default", names, values)

    def l2_pk() -> None:
        for pk in pks:
            local_tier.clear()
            User.objects.get_cached(pk=pk)

    def redis_get() -> None:
        for key in keys:
            client.get(key)

    def floor_l2() -> None:
        for key in keys:
            open_rows(mc, [key], [client.get(key)])

    def l1_pk() -> None:
        for pk in pks:
            User.objects.get_cached(pk=pk)

    cases = (many_l2, floor_many, many_l1, floor_many_l1, l2_pk, redis_get, floor_l2, l1_pk)
    return {f.__name__: f for f in cases}[case]


def _pks() -> list[int]:
    from demo_project.demo.models import User

    return list(User.objects.order_by("pk").values_list("pk", flat=True)[:100])


def _warm() -> None:
    """Store the 100 rows in L2 and wait until every one is there."""
    from demo_project.demo.models import User
    from tiered_cache.registry import model_cache
    from tiered_cache.tiers.remote import redis_tier

    pks = _pks()
    User.objects.get_many_cached(pks)
    mc = model_cache(User.objects)
    keys = [mc.key(mc.pk_lookup, (pk,)) for pk in pks]
    for _ in range(100):
        if None not in redis_tier.client.mget(keys):
            return
        time.sleep(0.05)
    raise SystemExit("the rows never reached L2")


def _child(case: str, calls: int) -> None:
    """Run under callgrind: a warm-up call (L1 and L2 as the case needs them), then `calls`."""
    from demo_project.demo.models import User
    from tiered_cache.registry import model_cache

    fn = _calls(case)
    fn()
    fn()
    counters = model_cache(User.objects).counters
    before = counters.as_dict()
    for _ in range(calls):
        fn()
    after = counters.as_dict()
    # What served the calls, so a run where trust lapsed (reads from the database) shows.
    print(
        {k: after[k] - before[k] for k in ("l1_hits", "l2_hits", "misses") if after[k] - before[k]}
    )


def _count(case: str, calls: int, out: Path) -> tuple[int, str]:
    """(instructions of the main thread, what served the reads) of one run under callgrind."""
    me = [sys.executable, "-m", "benchmarks.instructions"]
    subprocess.run([*me, "--warm"], check=True, capture_output=True)
    run = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--separate-threads=yes",
            f"--callgrind-out-file={out}",
            *me,
            "--child",
            case,
            str(calls),
        ],
        capture_output=True,
        text=True,
    )
    if run.returncode:
        raise SystemExit(f"{case} failed under callgrind:\n{run.stderr[-2000:]}")
    main_thread = Path(f"{out}-01")
    for line in main_thread.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1]), run.stdout.strip().splitlines()[-1]
    raise SystemExit(f"no total in {main_thread}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from benchmarks import bench

    bench.configure_django(DB, prefix=PREFIX)
    if args.warm:
        _warm()
        return
    if args.child:
        _child(args.child[0], int(args.child[1]))
        return

    cases = args.cases.split(",")
    unknown = set(cases) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    try:
        subprocess.run(["valgrind", "--version"], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError):
        raise SystemExit("valgrind is not installed (apt-get install valgrind)") from None
    bench.recreate_database()
    bench.make_data(
        bench.Plan(rounds=1, scale=1.0, user_pool=300, memory_sizes=(), latency_samples=0), 10
    )
    per_call: dict[str, int] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for case in cases:
                title, short, long = CASES[case]
                a, _ = _count(case, short, Path(tmp) / f"{case}.short")
                b, served = _count(case, long, Path(tmp) / f"{case}.long")
                per_call[case] = (b - a) // (long - short)
                print(f"{case:<14} {per_call[case]:>12,} instructions a call  {title}  {served}")
                sys.stdout.flush()
    finally:
        bench._delete_keys_quietly(PREFIX)
        bench.recreate_database(create=False)
    pairs = (("many_l2", "floor_many"), ("many_l1", "floor_many_l1"), ("l2_pk", "floor_l2"))
    for case, floor in pairs:
        if case in per_call and floor in per_call:
            print(f"{case} / {floor}: {per_call[case] / per_call[floor]:.3f}x")


if __name__ == "__main__":
    main()
