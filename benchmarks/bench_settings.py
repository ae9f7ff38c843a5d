"""Settings of the benchmark (`python -m benchmarks.bench`): the test settings, with the bench's
own database and Redis key prefix (both set by benchmarks/bench.py through the environment, so
the processes it spawns share them), DEBUG off as in production, and room in L1 for the
memory rows (100,000 users)."""

import os

from tests.settings import *  # noqa: F403
from tests.settings import DATABASES, TEST_KEY_PREFIX

DEBUG = False

# Never the test database nor whatever DATABASE_URL names: the bench drops this one.
DATABASES["default"]["NAME"] = os.environ.get("TC_BENCH_DB", "tiered_cache_bench")

# Room for the memory rows in entries and in bytes (L1_MAX_BYTES would otherwise evict
# most of 100,000 users, and the per-entry figure would not be one).
TIERED_CACHE = {
    "KEY_PREFIX": TEST_KEY_PREFIX,
    "L1_MAX_ENTRIES": 250_000,
    "L1_MAX_BYTES": 1024 * 1024 * 1024,
}
