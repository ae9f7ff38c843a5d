"""Fixtures shared by the cache tests: a clean cache per test, and ways to look inside it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.conf import settings

from tiered_cache import clear_local
from tiered_cache.breaker import breaker
from tiered_cache.bus import bus
from tiered_cache.invalidation import flush_batch
from tiered_cache.registry import cached_models, first_model_cache
from tiered_cache.reporting import reset_stats
from tiered_cache.tiers import local_tier, redis_tier


@pytest.fixture(autouse=True)
def clean_cache(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test starts with empty tiers for every cached model (a new generation in L2,
    applied directly so it also works inside a test's own transaction)."""
    breaker.reset()
    for model in cached_models():
        for alias in settings.DATABASES:
            flush_batch(model, alias).apply()
    clear_local()
    reset_stats()
    uses_db = request.node.get_closest_marker("django_db") or {
        "db",
        "transactional_db",
    } & set(request.fixturenames)
    if uses_db and bus.listening():
        # Trust lapses between tests, and regaining it runs an outbox query on a new
        # connection (CONN_MAX_AGE 0), which on a loaded CI machine can outlast the 50 ms a
        # read waits for it: that read would be a correct miss, not the fill a test expects.
        bus.wait_trusted(5)
    yield
    clear_local()


@pytest.fixture
def redis_client() -> Any:
    return redis_tier.client


def l2_keys(model: Any) -> list[bytes]:
    """The data keys of a model holding entries of the current generation and schema."""
    mc = first_model_cache(model)
    assert mc is not None
    redis_tier.wait_for_fills()
    client = redis_tier.client
    live = []
    for shard in mc.home.shards:  # one but on a cluster (keys.Shard)
        gen = client.get(shard.gen_key) or b""
        prefix = f"{shard.tag}:{mc.schema}:{mc.label}:".replace("[", "[[]")
        for k in client.scan_iter(match=prefix + "*", count=1000):
            if k.endswith(b"|L"):
                continue
            value = client.get(k) or b""
            if value.split(b"|", 2)[1:2] == [gen]:
                live.append(k)
    return live


def counters(model: Any) -> dict[str, int]:
    redis_tier.wait_for_fills()
    mc = first_model_cache(model)
    assert mc is not None
    return mc.counters.as_dict()


def l1_len() -> int:
    return len(local_tier)


@pytest.fixture(scope="session", autouse=True)
def close_stray_connections(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """Threads of asgiref, the bus listener and test helpers keep connections of their own;
    end them so pytest-django can drop the test database afterwards."""
    yield
    from django.db import connection

    with django_db_blocker.unblock():
        name = connection.settings_dict["NAME"]
        if connection.vendor != "postgresql" or not str(name).startswith("test_"):
            return  # no test database was set up in this session
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )


def write_outside_django(sql: str, params: list[Any], alias: str = "default") -> None:
    """Run a write to `alias`'s database on a connection Django does not own (another
    application, psql): the one kind of write tiered_cache cannot see."""
    import psycopg
    from django.db import connections

    s = connections[alias].settings_dict
    with psycopg.connect(
        host=s.get("HOST") or "127.0.0.1",
        port=s.get("PORT") or 5432,
        user=s.get("USER") or None,
        password=s.get("PASSWORD") or None,
        dbname=s["NAME"],
        autocommit=True,
    ) as conn:
        conn.execute(sql, params)


def in_thread(fn: Callable[[], Any]) -> Any:
    """Run fn in a new thread (its own database connections, outside our transaction);
    return its result or the exception it raised."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = fn()
        except Exception as exc:  # returned for the assertion
            out["value"] = exc
        finally:
            from django.db import connections

            connections.close_all()

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert not t.is_alive(), "the thread did not finish within 30 s"
    return out["value"]


@contextmanager
def paused_after_read(
    model: Any, pause: Callable[[], None], using: str = "default"
) -> Iterator[None]:
    """In this thread, call pause() once, as soon as the first SELECT from model's table has
    returned its rows: a cache read is then between its database read and its fills. Built
    on Django's documented connection.execute_wrapper(); the library carries no test hook."""
    from django.db import connections

    connection = connections[using]
    table = "FROM " + connection.ops.quote_name(model._meta.db_table)
    done = False

    def wrapper(
        execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any
    ) -> Any:
        nonlocal done
        result = execute(sql, params, many, context)
        if not done and sql.lstrip()[:6].upper() == "SELECT" and table in sql:
            done = True
            pause()
        return result

    with connection.execute_wrapper(wrapper):
        yield


@contextmanager
def reader_paused_after_read(model: Any, read: Callable[[], Any]) -> Iterator[list[Any]]:
    """Run read() in a thread that pauses right after its database read (see
    paused_after_read), with L1 emptied first; yield the list its result will be put in,
    once it is paused; on exit let it go on and wait for it."""
    paused, release = threading.Event(), threading.Event()
    got: list[Any] = []

    def pause() -> None:
        paused.set()
        release.wait(10)

    def run() -> None:
        with paused_after_read(model, pause):
            got.append(read())

    clear_local()
    reader = threading.Thread(target=run)
    reader.start()
    try:
        assert paused.wait(10), "the reader never reached its database read"
        yield got
    finally:
        release.set()
        reader.join(10)


def plant(mc: Any, key: str, value: bytes = b"x") -> None:
    """Store a value under one of the model's keys as a fill of an earlier deploy would
    have: listed in the model's index of the current generation, where cleanup looks."""
    from tiered_cache.tiers import redis_tier

    client = redis_tier.client
    gen = client.get(mc.home.gen_key)
    if gen is None:
        gen = b"planted"
        client.set(mc.home.gen_key, gen)
    index = mc.home.index_key(mc.label, gen)
    client.set(key, value)
    client.zadd(index, {key: (time.time() + 600) * 1000})
    client.sadd(mc.home.indexes_key, index)
