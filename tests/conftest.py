"""Session-wide checks and cleanup: real services up front, no Redis keys left behind."""

import pytest
import redis
from django.conf import settings

# Every fixture of the suite, for every test module: none is imported by name. Celery's own
# fixtures (celery_app, celery_worker, ...) ship in celery itself; tests.celery_fixtures
# overrides some of them (it is listed after), so it must stay after celery's.
pytest_plugins = (
    "celery.contrib.pytest",
    "tests.cache_fixtures",
    "tests.redis_fixtures",
    "tests.celery_fixtures",
    "tests.ops_helpers",
    "tests.pg_replica_fixtures",
)

_TIMEOUT = 3


def _check_postgresql() -> None:
    db = settings.DATABASES["default"]
    if db["ENGINE"] != "django.db.backends.postgresql":
        return
    import psycopg

    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or 5432
    try:
        # The maintenance database: the test database is created later by pytest-django.
        psycopg.connect(
            host=host,
            port=port,
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            dbname="postgres",
            connect_timeout=_TIMEOUT,
        ).close()
    except psycopg.Error as exc:
        pytest.exit(
            f"PostgreSQL is not reachable at {host}:{port} ({exc}); start it with: make services",
            returncode=3,
        )


def _redis_client() -> redis.Redis:
    """A client to the run's Redis: the shared server, or the topology's (a cluster client
    splits SCAN and UNLINK by node and slot)."""
    from tests import topologies

    if topologies.current is not None:
        from django_redis import get_redis_connection

        client: redis.Redis = get_redis_connection("default")
        return client
    return redis.Redis.from_url(
        settings.CACHES["default"]["LOCATION"],
        socket_connect_timeout=_TIMEOUT,
        socket_timeout=_TIMEOUT,
    )


def _check_redis() -> None:
    location = settings.CACHES["default"]["LOCATION"]
    try:
        _redis_client().ping()
    except redis.RedisError as exc:
        pytest.exit(
            f"Redis is not reachable at {location} ({exc}); start it with: make services",
            returncode=3,
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    from tests import topologies

    topologies.stop()


def pytest_sessionstart(session: pytest.Session) -> None:
    _check_postgresql()
    _check_redis()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    from tiered_cache.bus import bus

    bus.stop()  # before the test database is dropped under its outbox reads
    prefix = settings.TEST_KEY_PREFIX
    try:
        client = _redis_client()
        batch = []
        for key in client.scan_iter(match=f"*{prefix}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)
    except redis.RedisError as exc:
        session.config.get_terminal_writer().line(
            f"Could not delete Redis keys with prefix {prefix}: {exc}", yellow=True
        )
