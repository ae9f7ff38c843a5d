"""Transactions and connections: what a transaction wrote never reaches a tier, its
invalidation is never lost, and our hooks never change what Django does around a commit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.db import OperationalError, connection, connections, transaction

import tiered_cache
from tests.cache_fixtures import in_thread, l2_keys
from tests.testapp.factories import AccountFactory, TenantFactory
from tests.testapp.models import Account, Tenant
from tiered_cache import maintenance
from tiered_cache.signals import cache_invalidated
from tiered_cache.tiers import redis_tier
from tiered_cache.transactions import open_writes

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


# -- transactions the driver ends: psycopg's commit(), rollback() and transaction() --------


def served(pk: int) -> tuple[int, int]:
    """The balance another thread reads (this process's L1), then the one L2 serves."""
    other = in_thread(lambda: int(Account.objects.get_cached(pk=pk).balance))
    return other, committed(pk)


@contextmanager
def autocommit_off() -> Iterator[None]:
    """set_autocommit(False) for the block, then True again (after a rollback if the block
    raised: a failed assertion must not leave the connection in a transaction)."""
    transaction.set_autocommit(False)
    try:
        yield
    except BaseException:
        transaction.rollback()
        raise
    finally:
        transaction.set_autocommit(True)


def test_a_driver_transaction_block_invalidates_at_its_exit() -> None:
    """psycopg's own transaction() on Django's connection in autocommit: the driver sends
    BEGIN and COMMIT itself; the UPDATE between them runs through Django's cursor."""
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    before = open_writes()
    seen: list[Any] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append(sender)

    cache_invalidated.connect(receiver)
    try:
        connection.ensure_connection()
        with connection.connection.transaction():
            Account.objects.filter(pk=acc.pk).update(balance=2)
        # Committed, and no statement has run on this connection since.
        assert len(seen) == 1  # its signal too: Django is in autocommit
        assert served(acc.pk) == (2, 2)
    finally:
        cache_invalidated.disconnect(receiver)
    assert Account.objects.get_cached(pk=acc.pk).balance == 2
    assert open_writes() == before


def test_a_driver_transaction_block_in_a_thread_whose_connection_is_then_closed() -> None:
    """The same at the end of a request: the worker's connection is closed right after."""
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)

    def worker() -> None:
        from django.db import connection as conn

        conn.ensure_connection()
        with conn.connection.transaction():
            Account.objects.filter(pk=acc.pk).update(balance=2)

    assert in_thread(worker) is None  # and in_thread closes its connections
    assert Account.objects.get(pk=acc.pk).balance == 2
    assert Account.objects.get_cached(pk=acc.pk).balance == 2
    assert served(acc.pk) == (2, 2)


def test_the_drivers_commit_with_autocommit_off_invalidates() -> None:
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    with autocommit_off():
        Account.objects.filter(pk=acc.pk).update(balance=2)
        connection.connection.commit()
        assert served(acc.pk) == (2, 2)  # while Django still holds autocommit off
    assert Account.objects.get_cached(pk=acc.pk).balance == 2
    assert served(acc.pk) == (2, 2)


def test_a_commit_the_driver_sent_unseen_is_noticed_before_the_next_statement() -> None:
    """A COMMIT run on psycopg's connection directly (no wrapper of ours sees it) while
    Django holds autocommit off: the next statement through Django finds the server
    holding no transaction, and what was held runs first."""
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    with autocommit_off():
        Account.objects.filter(pk=acc.pk).update(balance=2)
        connection.connection.execute("COMMIT")
        Tenant.objects.count()
        assert served(acc.pk) == (2, 2)
        transaction.rollback()  # Django's: nothing of it is left to drop
    assert served(acc.pk) == (2, 2)


def test_an_invalidate_queued_before_a_blocks_first_statement_waits_for_its_commit() -> None:
    """invalidate() in atomic() before any statement: the server holds no transaction yet,
    which is not a transaction the driver ended. The write it is for (here one Django
    does not see) is invalidated at the commit, after a reader refilled the old row."""
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    with transaction.atomic():
        Account.objects.invalidate(acc.pk)
        Tenant.objects.count()  # the first statement: BEGIN
        assert in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance) == 1
        connection.connection.execute(
            'UPDATE "testapp_account" SET "balance" = 2 WHERE "id" = %s', [acc.pk]
        )
    assert served(acc.pk) == (2, 2)


def test_djangos_rollback_still_drops_what_was_held() -> None:
    """Django's rollback() calls the driver's: what the transaction held is dropped, not
    applied (the row cached before stays in L1 and L2), with atomic() and without."""
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    hits = tiered_cache.stats()[Account._meta.label_lower]["l1_hits"]

    before = open_writes()
    rolled_back(lambda: Account.objects.filter(pk=acc.pk).update(balance=2))
    with autocommit_off():
        Account.objects.filter(pk=acc.pk).update(balance=3)
        transaction.rollback()

    assert Account.objects.get_cached(pk=acc.pk).balance == 1
    assert tiered_cache.stats()[Account._meta.label_lower]["l1_hits"] == hits + 1
    assert l2_keys(Account) != []  # not dropped either
    assert open_writes() == before


def test_a_driver_rollback_leaves_correct_reads_and_the_cache_in_use() -> None:
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    before = open_writes()
    with pytest.raises(RuntimeError):
        with connection.connection.transaction():
            Account.objects.filter(pk=acc.pk).update(balance=2)
            raise RuntimeError("rolled back by psycopg")
    assert open_writes() == before  # nothing held any more
    assert Account.objects.get_cached(pk=acc.pk).balance == 1
    assert served(acc.pk) == (1, 1)

    with autocommit_off():
        Account.objects.filter(pk=acc.pk).update(balance=3)
        connection.connection.rollback()
        assert open_writes() == before
        assert Account.objects.get_cached(pk=acc.pk).balance == 1
        assert served(acc.pk) == (1, 1)
        Account.objects.filter(pk=acc.pk).update(balance=4)  # a new transaction
        assert in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance) == 1
        transaction.commit()
    assert served(acc.pk) == (4, 4)


def test_closing_a_connection_mid_sql_transaction_gives_back_its_count() -> None:
    """A BEGIN run as SQL, a write, and the request ends (close()): what was held runs (it
    rolled back, so that only drops right entries) and open_writes() is given back."""
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    before = open_writes()

    def worker() -> int:
        from django.db import connection as conn

        with conn.cursor() as cursor:
            cursor.execute("BEGIN")
        Account.objects.filter(pk=acc.pk).update(balance=2)
        return open_writes()

    assert in_thread(worker) == before + 1
    assert open_writes() == before
    assert served(acc.pk) == (1, 1)


def test_a_transaction_that_ended_unseen_is_applied_when_next_looked_at() -> None:
    """The driver committed unseen, then the connection was closed inside the atomic block
    (Django sends no ROLLBACK then): the next read finds what was held on a connection
    holding no transaction, and applies it, since that transaction may have committed."""
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    before = open_writes()
    with transaction.atomic():
        Account.objects.filter(pk=acc.pk).update(balance=2)
        connection.connection.execute("COMMIT")
        connection.close()
    assert connection.connection is None
    assert Account.objects.get_cached(pk=acc.pk).balance == 2
    assert open_writes() == before
    assert served(acc.pk) == (2, 2)


@pytest.mark.parametrize("call", ["commit", "rollback"])
def test_a_commit_or_rollback_django_refuses_inside_atomic_leaves_what_the_block_holds(
    call: str,
) -> None:
    """transaction.commit() or rollback() inside atomic() raise and reach no database: the
    block goes on, and its invalidations run at its own commit, not before nor never."""
    acc = AccountFactory(balance=500)
    Account.objects.get_cached(pk=acc.pk)
    with transaction.atomic():
        Account.objects.filter(pk=acc.pk).update(balance=7)
        with pytest.raises(transaction.TransactionManagementError):
            getattr(transaction, call)()
        # Still open: another thread reads the committed row, and may cache it.
        redis_tier.wait_for_fills()
        assert in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance) == 500
    assert served(acc.pk) == (7, 7)
