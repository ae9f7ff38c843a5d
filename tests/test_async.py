"""The async API: aget_cached, aget_many_cached, ainvalidate and async cached functions,
under a real event loop, and through ASGI."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient

import tiered_cache
from tests.cache_fixtures import write_outside_django
from tests.coherence_tasks import wait_trusted
from tests.testapp.factories import UserFactory
from tests.testapp.models import User
from tiered_cache import cached

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.asyncio]


def _no_hop(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("an L1 hit left the event loop")


async def test_aget_cached_miss_then_l1_hit_on_the_loop(monkeypatch: Any) -> None:
    user = await sync_to_async(UserFactory)(first_name="async")
    got = await User.objects.aget_cached(pk=user.pk)
    assert got.first_name == "async"
    monkeypatch.setattr("tiered_cache.managers.sync_to_async", _no_hop)
    monkeypatch.setattr("tiered_cache.tiers.remote.RedisTier.call", _no_hop)
    again = await User.objects.aget_cached(pk=user.pk)
    assert again.first_name == "async" and again is not got


async def test_aget_cached_remembers_absence_and_raises() -> None:
    with pytest.raises(User.DoesNotExist):
        await User.objects.aget_cached(email="nobody@example.com")
    with pytest.raises(User.DoesNotExist):
        await User.objects.aget_cached(email="nobody@example.com")


async def test_aget_many_and_ainvalidate() -> None:
    users = await sync_to_async(UserFactory.create_batch)(3, first_name="before")
    got = await User.objects.aget_many_cached([u.pk for u in users] + [10**9])
    assert sorted(got) == sorted(u.pk for u in users)
    await sync_to_async(lambda: User.objects.filter(pk=users[0].pk).update(first_name="after"))()
    # Queryset updates invalidate on their own; ainvalidate is for what signals miss.
    assert (await User.objects.aget_cached(pk=users[0].pk)).first_name == "after"

    def raw() -> None:
        write_outside_django(
            f"UPDATE {User._meta.db_table} SET first_name = 'raw' WHERE id = %s", [users[1].pk]
        )

    await sync_to_async(raw)()
    assert (await User.objects.aget_cached(pk=users[1].pk)).first_name == "before"
    await User.objects.ainvalidate(users[1])
    assert (await User.objects.aget_cached(pk=users[1].pk)).first_name == "raw"


async def test_many_concurrent_async_readers_share_one_database_read() -> None:
    user = await sync_to_async(UserFactory)()
    # Until the bus answers its first heartbeat, reads rightly trust neither tier and each
    # goes to the database: what is measured here is the reads once the cache is usable.
    assert await sync_to_async(wait_trusted)()
    results = await asyncio.gather(*(User.objects.aget_cached(pk=user.pk) for _ in range(20)))
    assert {r.pk for r in results} == {user.pk}
    stats = tiered_cache.stats()["testapp.user"]
    assert stats["misses"] == 1


acalls: list[str] = []


@cached(depends_on=[User])
async def count_domain(domain: str) -> int:
    acalls.append(domain)
    return await User.objects.filter(email__endswith="@" + domain).acount()


@cached(depends_on=[User])
def count_domain_sync(domain: str) -> int:
    acalls.append("sync:" + domain)
    return User.objects.filter(email__endswith="@" + domain).count()


async def test_async_cached_function() -> None:
    acalls.clear()
    await sync_to_async(UserFactory)(email="a@async.test")
    assert await count_domain("async.test") == 1
    assert await count_domain("async.test") == 1
    await sync_to_async(UserFactory)(email="b@async.test")
    assert await count_domain("async.test") == 2
    assert acalls == ["async.test", "async.test"]


async def test_acall_of_a_sync_cached_function() -> None:
    acalls.clear()
    await sync_to_async(UserFactory)(email="a@sync.test")
    assert await count_domain_sync.acall("sync.test") == 1
    assert await count_domain_sync.acall("sync.test") == 1
    assert acalls == ["sync:sync.test"]


async def test_under_asgi_no_synchronous_only_operation() -> None:
    user = await sync_to_async(UserFactory)(first_name="asgi")
    client = AsyncClient()
    for _ in range(2):  # a miss, then an L1 hit
        response = await client.get(f"/async/users/{user.pk}/")
        assert response.status_code == 200
        assert response.json()["first_name"] == "asgi"
    response = await client.get("/async/users/999999999/")
    assert response.status_code == 404
