"""Transactions and connections: what a transaction wrote never reaches a tier, its
invalidation is never lost, and our hooks never change what Django does around a commit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.db import OperationalError, connection, connections, transaction

import tiered_cache
from tests.cache_fixtures import in_thread
from tests.testapp.factories import AccountFactory, TenantFactory
from tests.testapp.models import Account
from tiered_cache import maintenance
from tiered_cache.signals import cache_invalidated
from tiered_cache.tiers import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)


def committed(pk: int) -> int:
    """The balance every tier serves once this process's L1 is gone (L2, else the DB)."""
    redis_tier.wait_for_fills()
    tiered_cache.clear_local()
    return int(Account.objects.get_cached(pk=pk).balance)


def rolled_back(fn: Callable[[], Any]) -> None:
    with pytest.raises(RuntimeError):
        with transaction.atomic():
            fn()
            raise RuntimeError("roll back")


def test_a_connection_first_opened_inside_a_users_execute_wrapper_keeps_ours() -> None:
    acc = AccountFactory(balance=500)
    Account.objects.get_cached(pk=acc.pk)

    def noop(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        return execute(sql, params, many, context)

    def worker() -> None:
        from django.db import connection as conn

        with conn.execute_wrapper(noop):
            Account.objects.count()  # the thread's connection is created in the block
        Account.objects.filter(pk=acc.pk).update(balance=7)

    in_thread(worker)
    assert Account.objects.get_cached(pk=acc.pk).balance == 7


def test_a_second_connection_committing_does_not_end_the_first_ones_bypass() -> None:
    acc, other = AccountFactory(balance=500), TenantFactory()
    side = connections.create_connection("default")
    try:
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                Account.objects.filter(pk=acc.pk).update(balance=7)
                side.set_autocommit(False)
                with side.cursor() as cursor:
                    cursor.execute(
                        'UPDATE "testapp_tenant" SET "name" = %s WHERE "testapp_tenant"."id" = %s',
                        ["x", other.pk],
                    )
                side.commit()
                side.set_autocommit(True)
                assert Account.objects.get_cached(pk=acc.pk).balance == 7  # its own write
                raise RuntimeError
    finally:
        side.close()
    assert committed(acc.pk) == 500


def test_async_calls_inside_a_transaction_see_its_writes_and_fill_nothing() -> None:
    acc = AccountFactory(balance=500)
    Account.objects.get_cached(pk=acc.pk)  # L1 holds 500

    @tiered_cache.cached(depends_on=[Account])
    async def balance_of(pk: int) -> int:
        return int((await Account.objects.aget(pk=pk)).balance)

    try:
        with pytest.raises(RuntimeError):
            with transaction.atomic():
                Account.objects.filter(pk=acc.pk).update(balance=7)
                assert async_to_sync(Account.objects.aget_cached)(pk=acc.pk).balance == 7
                assert async_to_sync(balance_of)(acc.pk) == 7
                raise RuntimeError
        assert committed(acc.pk) == 500
        assert async_to_sync(balance_of)(acc.pk) == 500
    finally:
        balance_of.unregister()


def test_warmup_inside_a_transaction_that_wrote_the_model_stores_nothing() -> None:
    acc = AccountFactory(balance=500)

    def warm_uncommitted() -> None:
        Account.objects.filter(pk=acc.pk).update(balance=7)
        maintenance.warmup(Account)

    rolled_back(warm_uncommitted)
    assert committed(acc.pk) == 500


def test_a_receiver_that_queries_does_not_break_the_commit() -> None:
    acc = AccountFactory(balance=500)
    seen: list[int] = []

    def rewarm(sender: Any, **kwargs: Any) -> None:
        seen.append(int(Account.objects.get_cached(pk=acc.pk).balance))

    cache_invalidated.connect(rewarm)
    try:
        with transaction.atomic():
            Account.objects.filter(pk=acc.pk).update(balance=7)
    finally:
        cache_invalidated.disconnect(rewarm)
    assert seen and seen[-1] == 7
    assert connection.get_autocommit()


def test_a_commit_whose_reply_is_lost_still_invalidates() -> None:
    """The server committed, then the connection failed before the reply: Django raises,
    and the row changed; the cache must not keep the old one."""
    acc = AccountFactory(balance=500)
    Account.objects.get_cached(pk=acc.pk)
    with pytest.raises(OperationalError):
        with transaction.atomic():
            Account.objects.filter(pk=acc.pk).update(balance=7)
            raw = connection.connection
            real_commit = raw.commit

            def commit_then_fail() -> None:
                real_commit()
                raise psycopg.OperationalError("connection lost after COMMIT")

            raw.commit = commit_then_fail
    connection.close()
    assert Account.objects.get(pk=acc.pk).balance == 7
    assert Account.objects.get_cached(pk=acc.pk).balance == 7
    assert committed(acc.pk) == 7


def test_aliases_of_one_database_share_invalidation(monkeypatch: Any) -> None:
    """A read replica named without a router, or the same server spelled another way, is
    the same database for invalidation: writes through one drop what the other cached."""
    from tiered_cache.groups import database_of

    default = connections.settings["default"]
    monkeypatch.setitem(
        connections.settings, "replica", {**default, "HOST": "replica.internal", "PORT": "6432"}
    )
    monkeypatch.setitem(connections.settings, "elsewhere", {**default, "NAME": "another_db"})
    assert database_of("replica") == "default"
    assert database_of("elsewhere") == "elsewhere"
