"""Test settings: the suite's own app (tests/testapp) against real PostgreSQL and Redis,
isolated per run. The demo project's app stays installed for its own tests only
(tests/test_demo_project.py)."""

import json
import os
import secrets

import dj_database_url
import psycopg

from demo_project.settings import *  # noqa: F403
from demo_project.settings import CACHES as _DEMO_CACHES
from demo_project.settings import INSTALLED_APPS as _DEMO_APPS
from demo_project.settings import MIDDLEWARE as _DEMO_MIDDLEWARE

# The suite's own app (tests/testapp): every model shape Django has, and its user model.
# django-celery-beat: its database scheduler runs the cache's tasks (tests/test_beat.py).
# The demo's debug toolbar (on with DEBUG) stays out of the suite: its middleware would run
# on every request of every test. tests/test_panels_browser.py serves the demo with it.
INSTALLED_APPS = [
    *(app for app in _DEMO_APPS if app != "debug_toolbar"),
    "django_celery_beat",
    "tests.testapp",
]
MIDDLEWARE = [m for m in _DEMO_MIDDLEWARE if not m.startswith("debug_toolbar.")]
AUTH_USER_MODEL = "testapp.User"
ROOT_URLCONF = "tests.urls"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/tiered_cache")
    ),
}
# A test database per run too: two runs on one server must not drop each other's.
DATABASES["default"]["TEST"] = {"NAME": f"test_{DATABASES['default']['NAME']}_{os.getpid()}"}
# A second database (tests/test_orm_parity.py): no router, tests name it with
# using("other") / db_manager("other").
DATABASES["other"] = {
    **DATABASES["default"],
    "NAME": "tiered_cache_other",
    "TEST": {"NAME": f"test_tiered_cache_other_{os.getpid()}"},
}
# The default database again, through connections in REPEATABLE READ: a transaction on it
# reads one snapshot (tests/test_orm_parity.py).
DATABASES["snapshot"] = {
    **DATABASES["default"],
    "OPTIONS": {
        **DATABASES["default"].get("OPTIONS", {}),
        "isolation_level": psycopg.IsolationLevel.REPEATABLE_READ,
    },
    "TEST": {**DATABASES["default"]["TEST"], "MIRROR": "default"},
}

# TC_TOPOLOGY=sentinel|cluster: the run's Redis is a topology started here, in the test
# process, before anything reads CACHES (pytest-django reads the settings before any
# conftest hook runs); tests/conftest.py stops it. It sets TEST_CACHE_JSON (below).
if os.environ.get("TC_TOPOLOGY") and not os.environ.get("TEST_CACHE_JSON"):
    from tests import topologies

    topologies.start()

# One prefix per run keeps concurrent runs (and leftovers of dead runs) apart;
# conftest.py deletes this run's keys at the end.
# Processes spawned by a test (tests/processes.py) inherit the parent's prefix.
TEST_KEY_PREFIX = os.environ.get("TC_TEST_KEY_PREFIX") or (
    f"tc-test-{os.getpid()}-{secrets.token_hex(4)}"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")

CACHES = {
    "default": {
        **_DEMO_CACHES["default"],
        "LOCATION": TEST_REDIS_URL,
        "KEY_PREFIX": TEST_KEY_PREFIX,
    },
}
# A worker process (tests/processes.py) gets its parent's whole cache entry: behind
# Sentinel, the location alone does not say where Redis is.
if os.environ.get("TEST_CACHE_JSON"):
    CACHES["default"] = json.loads(os.environ["TEST_CACHE_JSON"])

TIERED_CACHE = {"KEY_PREFIX": TEST_KEY_PREFIX}

# A `celery -A demo_project worker -B` started by tests/test_beat.py: Celery settings by
# their lower-case names (beat_schedule, task_default_queue, ...), over the demo's.
for _name, _value in json.loads(os.environ.get("TC_CELERY_JSON") or "{}").items():
    globals()[f"CELERY_{_name.upper()}"] = _value

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
