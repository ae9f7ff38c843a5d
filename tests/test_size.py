"""Operations at size: the dashboard, `manage.py tiered_cache stats` and cleanup cost
O(cached models and their own entries), never O(keys in Redis): they read the indexes the
fills keep and issue no SCAN. Counted on a private redis-server (INFO), never timed."""

from __future__ import annotations

from typing import Any

import pytest

import tiered_cache
from tests.testapp.factories import UserFactory
from tests.testapp.models import User
from tiered_cache import dashboard, maintenance
from tiered_cache.bus import bus
from tiered_cache.tiers.remote import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)

UNRELATED = 50_000


def _scans(client: Any) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_scan", {}).get("calls", 0))


def test_counts_and_cleanup_read_our_indexes_not_the_database(own_redis: Any) -> None:
    client = own_redis.server.client()
    pipe = client.pipeline(transaction=False)
    for i in range(UNRELATED):
        pipe.set(f"someone-else:{i}", b"x")
    pipe.execute()
    users = UserFactory.create_batch(5)
    assert bus.wait_trusted()
    for u in users:
        User.objects.get_cached(pk=u.pk)
        User.objects.get_cached(email=u.email)
    redis_tier.wait_for_fills()
    scans = _scans(client)

    view = dashboard.overview([User])
    assert view["models"][0]["l2_entries"] == 10
    User.objects.invalidate(users[0])  # its two entries are unservable now
    result = maintenance.cleanup([User])
    assert result["stale_rows"] == 2 and result["scanned"] == 10
    assert dashboard.l2_entry_count(User) == 8
    User.objects.flush_cache()
    assert dashboard.l2_entry_count(User) == 0  # a new generation has no entries yet
    assert maintenance.cleanup([User])["old_generation"] == 8
    tiered_cache.clear_local()
    User.objects.get_cached(pk=users[1].pk)
    redis_tier.wait_for_fills()
    assert dashboard.l2_entry_count(User) == 1

    assert _scans(client) == scans, "the dashboard or cleanup scanned the database"
    assert client.dbsize() >= UNRELATED  # nobody else's key was touched
