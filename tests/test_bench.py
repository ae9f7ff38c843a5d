"""The benchmark as CI runs it: a smoke run (`python -m benchmarks.bench --quick`) that must
finish and print its table. Never a timed test: a missed target is reported, not a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The bench makes and drops a database of its own. The mark is only for the session
# fixtures of cache_fixtures.py, which expect a test database to exist at the end.
pytestmark = pytest.mark.django_db


def test_quick_bench_exits_0_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = {
        **os.environ,
        # Its own database, so a `make bench` running beside this test is left alone.
        "TC_BENCH_DB": f"tiered_cache_bench_smoke_{os.getpid()}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench", "--quick", "--json", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"

    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "case"
    for label in (
        "ORM get(pk)",
        "get_cached(pk) L1 hit",
        "get_cached(pk) L2 hit",
        "get_cached(pk) miss",
        "get_many_cached(100) warm L2",
        "save() FlowInstance (cached)",
        "breaker open",
        "commit-to-drop",
        "L1 memory per user",
    ):
        assert any(label in line for line in table), label
    assert "targets met" in proc.stdout

    result = json.loads(out.read_text())
    rows = {r["id"]: r for r in result["rows"]}
    for case in (
        "l1_pk",
        "l2_pk",
        "miss_pk",
        "many_l2",
        "many_l1",
        "l1_big",
        "l2_pk_vs_get",
        "save_cached",
        "breaker",
        "drop_p99_busy0",
        "drop_p99_busy2",
        "mem_10000_db",
        "mem_10000_l2",
    ):
        assert case in rows, case
        assert rows[case]["result"] in ("PASS", "MISS"), rows[case]
    assert rows["orm_pk"]["median_us"] > 0
    assert rows["mem_10000_l2"]["bytes_per_entry"] > 0
