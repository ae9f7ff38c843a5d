"""Operations at size: how long the dashboard's data (`dashboard.overview()`, what
`manage.py tiered_cache stats` prints) takes when the Redis database holds a million keys
that are not ours. On a private redis-server, with a few hundred entries of every cached
model; the median of several calls."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def measure_dashboard(unrelated: int = 1_000_000, calls: int = 7) -> dict[str, Any]:
    from django.conf import settings
    from django.test import override_settings

    from tests.coherence_tasks import reset_core
    from tests.redis_server import RedisServer
    from tests.testapp.factories import UserFactory
    from tests.testapp.models import User
    from tiered_cache import dashboard
    from tiered_cache.bus import bus
    from tiered_cache.tiers.remote import redis_tier

    server = RedisServer(Path(tempfile.mkdtemp(prefix="tc-size-")))
    server.start()
    caches = {"default": {**settings.CACHES["default"], "LOCATION": server.url}}
    override = override_settings(CACHES=caches)
    override.enable()
    reset_core()
    users = []
    try:
        client = server.client(timeout=60)
        batch = 10_000
        for start in range(0, unrelated, batch):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(start + batch, unrelated)):
                pipe.set(f"someone-else:{i}", b"x")
            pipe.execute()
        users = UserFactory.create_batch(300)
        bus.wait_trusted()
        User.objects.get_many_cached([u.pk for u in users])
        redis_tier.wait_for_fills()
        dashboard.overview()  # connections made, the publisher's first push done
        samples = []
        for _ in range(calls):
            t0 = time.perf_counter()
            view = dashboard.overview()
            samples.append(time.perf_counter() - t0)
        entries = {row["label"]: row["l2_entries"] for row in view["models"]}
        return {
            "keys_in_redis": int(client.dbsize()),
            "cached_models": len(view["models"]),
            "user_entries": entries.get("testapp.User"),
            "overview_ms_median": round(1000 * statistics.median(samples), 1),
            "overview_ms_max": round(1000 * max(samples), 1),
        }
    finally:
        User.objects.filter(pk__in=[u.pk for u in users]).delete()
        reset_core()
        override.disable()
        reset_core()
        server.stop()


def format_result(r: dict[str, Any]) -> str:
    return (
        f"dashboard data with {r['keys_in_redis']:,} keys in Redis ({r['cached_models']} "
        f"cached models, {r['user_entries']} user entries): median {r['overview_ms_median']} ms, "
        f"max {r['overview_ms_max']} ms"
    )
