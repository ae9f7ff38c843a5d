"""A real Celery worker (a thread of this process) on the real Redis broker, for the task
and browser tests. Everything it writes in Redis carries the run's key prefix. Loaded as a
plugin after celery.contrib.pytest (tests/conftest.py), whose fixtures it overrides."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings

# Imported before any test app exists: each Celery app fixture restores the set of
# shared-task finalizers on exit, so a task module first imported inside one would never
# be registered on the apps of later tests.
import tiered_cache.tasks  # noqa: F401

BROKER_URL = settings.TEST_REDIS_URL


@pytest.fixture(scope="session")
def celery_config() -> dict[str, Any]:
    prefix = settings.TEST_KEY_PREFIX
    return {
        "broker_url": BROKER_URL,
        "result_backend": BROKER_URL,
        # Queue, results and bindings under the run's prefix (conftest deletes them).
        "broker_transport_options": {"global_keyprefix": f"{prefix}:celery:"},
        "result_backend_transport_options": {"global_keyprefix": f"{prefix}:celery:"},
        "task_default_queue": f"{prefix}:tasks",
        "result_expires": 600,
        "broker_connection_retry_on_startup": False,
    }


@pytest.fixture(scope="session")
def celery_includes() -> tuple[str, ...]:
    return ("tiered_cache.tasks",)


@pytest.fixture(scope="session")
def celery_worker_parameters() -> dict[str, Any]:
    return {"shutdown_timeout": 30}


@pytest.fixture
def broker() -> str:
    """A missing broker fails the test, naming it."""
    try:
        redis.Redis.from_url(BROKER_URL, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(
            f"The Celery broker (Redis at {BROKER_URL}) is not reachable: {exc}; "
            "start it with: make services"
        )
    return BROKER_URL


@pytest.fixture
def worker(broker: str, celery_app: Any, celery_worker: Any) -> Iterator[Any]:
    """A worker consuming the test app's queue; the app is current and default meanwhile,
    so ``task.delay()`` from any thread (the live server's too) reaches it."""
    yield celery_worker
