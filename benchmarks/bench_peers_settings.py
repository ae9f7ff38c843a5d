"""Settings of `make bench-peers` (benchmarks/bench_peers.py, in .venv-peers): the bench settings
plus one peer, named by TC_BENCH_PEER, caching the demo models in the same Redis database
under the run's key prefix."""

import os

from benchmarks.bench_settings import *  # noqa: F403
from benchmarks.bench_settings import INSTALLED_APPS, TEST_KEY_PREFIX, TEST_REDIS_URL

PEER = os.environ.get("TC_BENCH_PEER", "")

if PEER == "cachalot":
    # Every query of every table, cached through the django-redis "default" cache (whose
    # KEY_PREFIX is the run's prefix).
    INSTALLED_APPS = [*INSTALLED_APPS, "cachalot"]
    CACHALOT_CACHE = "default"
elif PEER == "cacheops":
    INSTALLED_APPS = [*INSTALLED_APPS, "cacheops"]
    CACHEOPS_REDIS = TEST_REDIS_URL
    CACHEOPS_PREFIX = lambda query: f"{TEST_KEY_PREFIX}:"  # noqa: E731
    # .get() of the demo models cached automatically, as cacheops' docs set it up.
    CACHEOPS = {"demo.*": {"ops": "get", "timeout": 3600}}
elif PEER:
    raise ValueError(f"unknown TC_BENCH_PEER {PEER!r}")
