"""Celery tasks through a real worker and the real Redis broker: warmup, cleanup and their
locks (the demo's beat schedule is tested with the demo, tests/test_demo_project.py). Data
is committed so the worker's thread sees it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest

from tests.cache_fixtures import l2_keys, plant
from tests.testapp.factories import UserFactory
from tests.testapp.models import User
from tiered_cache import maintenance, tasks
from tiered_cache.keys import lock_key
from tiered_cache.registry import first_model_cache
from tiered_cache.tiers import redis_tier

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("live_bus")]

WAIT = 30


def test_tasks_are_declared_for_late_acks_and_expiry() -> None:
    for task, name in (
        (tasks.warmup, "tiered_cache.tasks.warmup"),
        (tasks.cleanup_expired, "tiered_cache.tasks.cleanup_expired"),
    ):
        assert task.name == name
        assert task.acks_late is True
        assert 0 < task.expires <= task.time_limit
        assert task.soft_time_limit < task.time_limit


@pytest.mark.usefixtures("worker")
def test_warmup_through_a_worker_fills_l2_with_committed_rows() -> None:
    users = UserFactory.create_batch(3)

    result = tasks.warmup.delay("testapp.User", 2).get(timeout=WAIT)

    assert result["model"] == "testapp.User"
    assert (result["stored"], result["refused"]) == (2, 0)
    assert result["source"] == "hot+recent"
    assert len(l2_keys(User)) == 2
    # The worker's fills are served here from L2: no database read.
    mc = first_model_cache(User)
    assert mc is not None
    misses = mc.counters.misses
    assert User.objects.get_cached(pk=users[-1].pk) == users[-1]
    assert mc.counters.misses == misses
    assert maintenance.last_runs()["warmup"]["testapp.user"]["stored"] == 2


@pytest.mark.usefixtures("worker")
def test_warmup_is_idempotent() -> None:
    UserFactory.create_batch(2)

    first = tasks.warmup.delay("testapp.User").get(timeout=WAIT)
    keys = sorted(l2_keys(User))
    second = tasks.warmup.delay("testapp.User").get(timeout=WAIT)

    assert first["stored"] == second["stored"] == 2
    assert sorted(l2_keys(User)) == keys


@pytest.mark.usefixtures("worker")
def test_warmup_of_an_unknown_model_fails_the_task() -> None:
    res = tasks.warmup.delay("testapp.Nope")
    with pytest.raises(Exception, match="no such model is installed"):
        res.get(timeout=WAIT)
    assert res.failed()


@pytest.mark.usefixtures("worker")
def test_a_held_lock_skips_the_run() -> None:
    UserFactory()
    with maintenance.exclusive("warmup:testapp.user", 60) as acquired:
        assert acquired
        skipped = tasks.warmup.delay("testapp.User").get(timeout=WAIT)
    assert skipped == {"model": "testapp.User", "skipped": "locked"}
    assert l2_keys(User) == []
    # Released: the next run goes ahead.
    assert tasks.warmup.delay("testapp.User").get(timeout=WAIT)["stored"] == 1

    with maintenance.exclusive("cleanup", 60):
        assert tasks.cleanup_expired.delay().get(timeout=WAIT) == {"skipped": "locked"}


@pytest.mark.usefixtures("worker")
def test_overlapping_runs_do_not_both_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two deliveries of the same warmup at once (a redelivery after acks_late, or a
    slow run meeting the next beat): one runs, the other returns at once."""
    UserFactory()
    inside = threading.Event()
    release = threading.Event()
    real = maintenance.warmup

    def slow_warmup(model: Any, limit: Any = None) -> dict[str, Any]:
        inside.set()
        assert release.wait(WAIT)
        return real(model, limit)

    monkeypatch.setattr(maintenance, "warmup", slow_warmup)
    first = tasks.warmup.delay("testapp.User")
    assert inside.wait(WAIT), "the first run never started"
    # The worker is busy with the first run (solo pool), so run the second delivery
    # here, as a second worker process would.
    second = tasks.warmup.apply(args=("testapp.User",)).get()
    release.set()

    assert second == {"model": "testapp.User", "skipped": "locked"}
    assert first.get(timeout=WAIT)["stored"] == 1


def test_lock_is_released_only_by_its_holder() -> None:
    key = lock_key("demo-lock")
    with maintenance.exclusive("demo-lock", 0.2) as acquired:
        assert acquired
        time.sleep(0.3)  # our lock expired ...
        with maintenance.exclusive("demo-lock", 60) as second:  # ... and someone else took it
            assert second
            token = redis_tier.client.get(key)
        redis_tier.client.set(key, token, px=60_000)
    # Leaving the first block must not delete the other holder's lock.
    assert redis_tier.client.get(key) == token
    redis_tier.client.delete(key)


@pytest.mark.usefixtures("worker")
def test_cleanup_through_a_worker() -> None:
    client = redis_tier.client
    mc = first_model_cache(User)
    assert mc is not None
    user = UserFactory()
    maintenance.warmup(User)
    User.objects.flush_cache()
    old = mc.key(mc.pk_lookup, (user.pk,))
    junk = f"{mc.home.tag}:0123456789:{mc.label}:objects:pk:default:1"
    plant(mc, junk)
    assert client.exists(old)

    result = tasks.cleanup_expired.delay().get(timeout=WAIT)

    assert result["old_generation"] >= 1 and result["old_schema"] >= 1
    assert not client.exists(old) and not client.exists(junk)
    assert maintenance.last_runs()["cleanup"]["scanned"] == result["scanned"]


def test_importing_tiered_cache_does_not_need_celery() -> None:
    code = """
import sys

class NoCelery:
    def find_spec(self, name, path=None, target=None):
        if name == "celery" or name.startswith("celery."):
            raise ImportError("celery is not installed")

sys.meta_path.insert(0, NoCelery())
import django
from django.conf import settings
settings.configure(
    INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth",
                    "django.contrib.contenttypes", "django.contrib.sessions",
                    "django.contrib.messages", "tiered_cache"],
    CACHES={"default": {"BACKEND": "django_redis.cache.RedisCache",
                        "LOCATION": "redis://127.0.0.1:6379/9"}},
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
)
django.setup()
import tiered_cache, tiered_cache.maintenance, tiered_cache.dashboard
import tiered_cache.admin, tiered_cache.metrics
from tiered_cache.management.commands import tiered_cache as command
try:
    import tiered_cache.tasks
except ImportError:
    pass
else:
    raise SystemExit("tiered_cache.tasks imported without celery")
assert not [m for m in sys.modules if m.split(".")[0] == "celery"]
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.stdout.strip() == "ok", proc.stderr


def test_projects_sharing_a_redis_keep_their_own_locks_and_records(settings: Any) -> None:
    """Two projects on one Redis apart only by their cache VERSION (or KEY_PREFIX) share
    no maintenance lock nor last-run record: one's cleanup never skips as 'locked' because
    the other's runs."""
    from django.test import override_settings

    from tiered_cache.keys import ops_key

    other = {"default": {**settings.CACHES["default"], "VERSION": 99}}
    with override_settings(CACHES=other):
        theirs = lock_key("cleanup"), ops_key()
        with maintenance.exclusive("cleanup", 60) as held:
            assert held
            with override_settings(CACHES={"default": {**other["default"], "VERSION": 1}}):
                ours = lock_key("cleanup"), ops_key()
                assert tasks.cleanup_expired.run() != {"skipped": "locked"}
    assert set(ours).isdisjoint(theirs)
