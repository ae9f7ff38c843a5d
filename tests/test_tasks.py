"""Celery tasks through a real worker and the real Redis broker: warmup, cleanup, their
locks, and the demo's beat schedule. Data is committed so the worker's thread sees it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
from celery import beat
from celery.schedules import schedule as every

from demo_project.demo.factories import GlobalModelFactory, UserFactory
from demo_project.demo.models import User
from tests.cache_fixtures import l2_keys
from tests.celery_fixtures import (  # noqa: F401 - fixtures
    broker,
    celery_config,
    celery_includes,
    celery_worker_parameters,
    worker,
)
from tests.ops_helpers import live_bus  # noqa: F401 - fixture
from tiered_cache import ops, tasks
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

    result = tasks.warmup.delay("demo.User", 2).get(timeout=WAIT)

    assert result["model"] == "demo.User"
    assert (result["stored"], result["refused"]) == (2, 0)
    assert result["source"] == "hot+recent"
    assert len(l2_keys(User)) == 2
    # The worker's fills are served here from L2: no database read.
    mc = first_model_cache(User)
    assert mc is not None
    misses = mc.counters.misses
    assert User.objects.get_cached(pk=users[-1].pk) == users[-1]
    assert mc.counters.misses == misses
    assert ops.last_runs()["warmup"]["demo.user"]["stored"] == 2


@pytest.mark.usefixtures("worker")
def test_warmup_is_idempotent() -> None:
    UserFactory.create_batch(2)

    first = tasks.warmup.delay("demo.User").get(timeout=WAIT)
    keys = sorted(l2_keys(User))
    second = tasks.warmup.delay("demo.User").get(timeout=WAIT)

    assert first["stored"] == second["stored"] == 2
    assert sorted(l2_keys(User)) == keys


@pytest.mark.usefixtures("worker")
def test_warmup_of_an_unknown_model_fails_the_task() -> None:
    res = tasks.warmup.delay("demo.Nope")
    with pytest.raises(Exception, match="no such model is installed"):
        res.get(timeout=WAIT)
    assert res.failed()


@pytest.mark.usefixtures("worker")
def test_a_held_lock_skips_the_run() -> None:
    UserFactory()
    with ops.exclusive("warmup:demo.user", 60) as acquired:
        assert acquired
        skipped = tasks.warmup.delay("demo.User").get(timeout=WAIT)
    assert skipped == {"model": "demo.User", "skipped": "locked"}
    assert l2_keys(User) == []
    # Released: the next run goes ahead.
    assert tasks.warmup.delay("demo.User").get(timeout=WAIT)["stored"] == 1

    with ops.exclusive("cleanup", 60):
        assert tasks.cleanup_expired.delay().get(timeout=WAIT) == {"skipped": "locked"}


@pytest.mark.usefixtures("worker")
def test_overlapping_runs_do_not_both_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two deliveries of the same warmup at once (a redelivery after acks_late, or a
    slow run meeting the next beat): one runs, the other returns at once."""
    UserFactory()
    inside = threading.Event()
    release = threading.Event()
    real = ops.warmup

    def slow_warmup(model: Any, limit: Any = None) -> dict[str, Any]:
        inside.set()
        assert release.wait(WAIT)
        return real(model, limit)

    monkeypatch.setattr(ops, "warmup", slow_warmup)
    first = tasks.warmup.delay("demo.User")
    assert inside.wait(WAIT), "the first run never started"
    # The worker is busy with the first run (solo pool), so run the second delivery
    # here, as a second worker process would.
    second = tasks.warmup.apply(args=("demo.User",)).get()
    release.set()

    assert second == {"model": "demo.User", "skipped": "locked"}
    assert first.get(timeout=WAIT)["stored"] == 1


def test_lock_is_released_only_by_its_holder() -> None:
    key = f"{ops.conf.KEY_PREFIX}:lock:demo-lock"
    with ops.exclusive("demo-lock", 0.2) as acquired:
        assert acquired
        time.sleep(0.3)  # our lock expired ...
        with ops.exclusive("demo-lock", 60) as second:  # ... and someone else took it
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
    ops.warmup(User)
    User.objects.flush_cache()
    old = mc.key(mc.pk_lookup, (user.pk,))
    junk = f"{mc.home.tag}:0123456789:{mc.label}:objects:pk:default:1"
    client.set(junk, b"x")
    assert client.exists(old)

    result = tasks.cleanup_expired.delay().get(timeout=WAIT)

    assert result["old_generation"] >= 1 and result["old_schema"] >= 1
    assert not client.exists(old) and not client.exists(junk)
    assert ops.last_runs()["cleanup"]["scanned"] == result["scanned"]


# -- the demo's beat schedule ------------------------------------------------------


def demo_schedule() -> dict[str, beat.ScheduleEntry]:
    from demo_project.celery import app

    app.loader.import_default_modules()
    return beat.Scheduler(app=app, lazy=False).schedule


def test_beat_schedule_loads_and_names_existing_tasks() -> None:
    from demo_project.celery import app

    entries = {name: e for name, e in demo_schedule().items() if name.startswith("tiered-cache")}

    assert set(entries) == {
        "tiered-cache-warm-users",
        "tiered-cache-warm-models",
        "tiered-cache-warm-global-models",
        "tiered-cache-cleanup",
    }
    for name, entry in entries.items():
        assert entry.task in app.tasks, f"{name} names {entry.task}, which is not registered"
        assert isinstance(entry.schedule, every)
        period = entry.schedule.run_every.total_seconds()
        # A run waiting in the queue expires before the next one is due.
        assert 0 < entry.options["expires"] < period, name
        if entry.task == "tiered_cache.tasks.warmup":
            assert period <= 10 * 60
            (label,) = entry.args
            ops.resolve_models([label])  # a cached model
        else:
            assert entry.task == "tiered_cache.tasks.cleanup_expired"
            assert period == 3600


@pytest.mark.usefixtures("worker")
def test_beat_entries_run_on_the_worker(celery_app: Any) -> None:
    UserFactory.create_batch(2)
    GlobalModelFactory()
    for name, entry in demo_schedule().items():
        if not name.startswith("tiered-cache"):
            continue
        res = celery_app.send_task(
            entry.task, args=entry.args, kwargs=entry.kwargs, **entry.options
        )
        out = res.get(timeout=WAIT)
        assert "skipped" not in out, (name, out)
    assert len(l2_keys(User)) == 2


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
import tiered_cache, tiered_cache.ops, tiered_cache.admin, tiered_cache.metrics
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
