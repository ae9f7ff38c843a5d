"""Fixtures and helpers shared by the operations tests (commands, tasks, admin, browser).
The fixtures reach every test module as a plugin (tests/conftest.py); import the helpers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from django.db import models

from tests.processes import wait_for
from tiered_cache.breaker import breaker
from tiered_cache.bus import bus
from tiered_cache.tiers import redis_tier


@pytest.fixture
def live_bus() -> Iterator[None]:
    """Wait until the invalidation bus is live: until then reads neither trust L1 nor
    fill L2, and a test that reads to fill the cache would find it empty."""
    wait_for_bus()
    yield
    breaker.reset()


@pytest.fixture
def no_past_runs() -> None:
    """Forget the warmup and cleanup runs of earlier tests."""
    from tiered_cache.conf import conf

    redis_tier.client.delete(f"{conf.KEY_PREFIX}:ops")


def wait_for_bus(timeout: float = 5.0) -> None:
    bus.ensure_started()
    assert wait_for(bus.trusted, timeout, step=0.01), f"the invalidation bus is {bus.state()}"


def read(manager: object, **lookup: object) -> object:
    """get_cached, then wait for its L2 fill (fills run on a filler thread)."""
    obj = manager.get_cached(**lookup)  # type: ignore[attr-defined]
    redis_tier.wait_for_fills()
    return obj


def read_cached(manager: object, **lookup: object) -> object:
    """get_cached while this process trusts its tiers. A read during a trust lapse (a loaded
    machine can starve the bus thread for a heartbeat) rightly goes to the database, which
    would hide what the cache holds; so read when trust holds before and after the read."""
    found: list[object] = []

    def trusted_read() -> bool:
        if bus.trusted():
            obj = manager.get_cached(**lookup)  # type: ignore[attr-defined]
            if bus.trusted():
                found.append(obj)
                return True
        return False

    assert wait_for(trusted_read, 10, step=0.01), "the bus never became trusted"
    return found[0]


def change_behind_the_cache(user: models.Model, first_name: str) -> None:
    """A write outside Django (another application): the cache keeps the old row until
    flushed."""
    from tests.cache_fixtures import write_outside_django

    write_outside_django(
        f"UPDATE {user._meta.db_table} SET first_name = %s WHERE id = %s", [first_name, user.pk]
    )


def pk_of_key(key: bytes) -> int:
    """The pk in a pk-lookup data key ("<data prefix>pk:<len>.i<pk>")."""
    return int(key.rsplit(b".i", 1)[1])
