"""get_cached() answers exactly what the ORM's own .get() on the same manager answers
(guarantee 11), on every model shape of the test app (tests/testapp): related managers,
proxies, multi-table inheritance, write paths that send no signals, several databases,
threads, on_commit, derived functions, manual transactions, snapshots, odd primary keys.

Each test names the behaviour it checks; a failure says what get_cached() and .get()
answered. "tier" runs a read from L1 (as warmed) or from L2 (this process's L1 emptied
first, as another process would read it).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from asgiref.sync import async_to_sync
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, connections, models, transaction
from django.db.models import F, Q, Value
from django.db.models.expressions import RawSQL
from django.db.models.functions import Lower, Now
from django.db.models.lookups import Exact, IExact
from django.test import override_settings
from django.test.utils import CaptureQueriesContext, isolate_apps
from django.utils import timezone
from psycopg.adapt import Dumper

import tiered_cache
from tests.cache_fixtures import in_thread
from tests.testapp.factories import (
    AccountFactory,
    CachedUserFactory,
    CodeFactory,
    DocumentFactory,
    FlowFactory,
    GadgetFactory,
    ItalianRestaurantFactory,
    ItemFactory,
    LabelFactory,
    NoteFactory,
    OwnerFactory,
    ProviderModelFactory,
    TenantFactory,
)
from tests.testapp.models import (
    Account,
    Badge,
    Book,
    Bookmark,
    CachedUser,
    Code,
    Document,
    Flow,
    Gadget,
    ItalianRestaurant,
    Item,
    Label,
    Loan,
    Note,
    Place,
    ProviderModel,
    ProxyAccount,
    Restaurant,
    Shelf,
    Shipment,
    Tenant,
    Tracked,
)
from tests.testapp.models import User as ProjectUser  # the project's AUTH_USER_MODEL
from tiered_cache import registry
from tiered_cache.exceptions import UndeclaredLookup

pytestmark = pytest.mark.django_db(transaction=True)

TIERS = ["l1", "l2"]
MULTI_DB = pytest.mark.django_db(transaction=True, databases=["default", "other"])
SNAPSHOT_DB = pytest.mark.django_db(transaction=True, databases=["default", "snapshot"])


# -- helpers ---------------------------------------------------------------------------


def at(tier: str) -> None:
    """Make the next read come from the given tier: "l1" leaves this process's L1 as it
    is; "l2" empties it (after pending L2 fills landed), as if another process read."""
    if tier == "l2":
        from tiered_cache.tiers import redis_tier

        wait = getattr(redis_tier, "wait_for_fills", None)
        if callable(wait):
            wait()
        tiered_cache.clear_local()


def row(obj: models.Model) -> tuple[str, str | None, dict[str, Any]]:
    """What a read returned: its class, its database, and every concrete field's value."""
    return (
        type(obj).__qualname__,
        obj._state.db,
        {f.attname: f.value_from_object(obj) for f in obj._meta.concrete_fields},
    )


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        value = fn()
    except Exception as exc:  # compared, not hidden
        return ("raises", type(exc).__qualname__)
    if isinstance(value, models.Model):
        return ("row", row(value))
    return ("value", value)


def assert_same(cached: Callable[[], Any], orm: Callable[[], Any], what: str) -> tuple[str, Any]:
    """get_cached() first (the tier under test), then the ORM as the oracle."""
    got = outcome(cached)
    expected = outcome(orm)
    assert got == expected, (
        f"{what}: get_cached() answered {got!r} but .get() answered {expected!r}"
    )
    return expected


def assert_rows_as_orm(rows: list[tuple[type[models.Model], Any]], tier: str, when: str) -> None:
    """get_cached(pk=...) of each (model, pk) from the tier, against the ORM's get()."""
    for model, pk in rows:
        at(tier)
        assert_same(
            lambda m=model, p=pk: m._default_manager.get_cached(pk=p),
            lambda m=model, p=pk: m._default_manager.get(pk=p),
            f"{model.__name__} pk={pk} {when}",
        )


def start_loop(fn: Callable[[], Any], stop: threading.Event, errors: list[Any]) -> threading.Thread:
    def run() -> None:
        try:
            while not stop.is_set():
                fn()
        except Exception as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class Boom(Exception):
    pass


# -- 1. related managers ---------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_related_manager_get_cached_applies_the_relation_filter(tier: str) -> None:
    tenant_a, tenant_b = TenantFactory(), TenantFactory()
    acc_of_b = AccountFactory(tenant=tenant_b)
    Account.objects.get_cached(pk=acc_of_b.pk)  # warm, unscoped
    at(tier)
    expected = assert_same(
        lambda: tenant_a.accounts.get_cached(pk=acc_of_b.pk),
        lambda: tenant_a.accounts.get(pk=acc_of_b.pk),
        "tenant_a.accounts, row of tenant_b",
    )
    assert expected == ("raises", "Account.DoesNotExist")  # the oracle, as Django defines it
    at(tier)
    assert_same(
        lambda: tenant_b.accounts.get_cached(pk=acc_of_b.pk),
        lambda: tenant_b.accounts.get(pk=acc_of_b.pk),
        "tenant_b.accounts, its own row",
    )
    at(tier)
    assert_same(
        lambda: Account.objects.get_cached(pk=acc_of_b.pk),
        lambda: Account.objects.get(pk=acc_of_b.pk),
        "Account.objects after a scoped miss",
    )


@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_a_related_manager_of_a_prefetched_instance_reads_the_prefetchs_queryset(
    tier: str,
) -> None:
    """A related manager of an instance that holds the relation prefetched reads through the
    Prefetch's own queryset (Django's get_queryset() returns it): its filter applies, and
    its only() leaves fields deferred."""
    from django.db.models import Prefetch

    tenant = TenantFactory()
    rich = AccountFactory(tenant=tenant, balance=500)
    poor = AccountFactory(tenant=tenant, balance=1)
    Account.objects.get_many_cached([rich.pk, poor.pk])
    filtered = Tenant.objects.prefetch_related(
        Prefetch("accounts", queryset=Account.objects.filter(balance__gte=100))
    ).get(pk=tenant.pk)
    narrow = Tenant.objects.prefetch_related(
        Prefetch("accounts", queryset=Account.objects.only("id", "tenant_id", "email"))
    ).get(pk=tenant.pk)
    at(tier)
    for pk in (rich.pk, poor.pk):
        assert_same(
            lambda p=pk: filtered.accounts.get_cached(pk=p),
            lambda p=pk: filtered.accounts.get(pk=p),
            f"a filtered prefetch, pk={pk}",
        )
    assert_same(
        lambda: sorted(filtered.accounts.get_many_cached([rich.pk, poor.pk])),
        lambda: sorted(filtered.accounts.in_bulk([rich.pk, poor.pk])),
        "a filtered prefetch, many",
    )
    cached = narrow.accounts.get_cached(pk=rich.pk)
    assert cached.get_deferred_fields() == narrow.accounts.get(pk=rich.pk).get_deferred_fields()


@isolate_apps("tests.testapp")
def test_related_manager_by_a_lookup_that_finds_other_instances_rows() -> None:
    """A lookup unique only with the relation (a code per club: warning W001), or unique
    but given NULL, finds other clubs' rows through the model's manager: the relation's own
    filter must pick this club's, as .get() on the related manager does."""

    class Club(models.Model):
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    class Seat(models.Model):
        club = models.ForeignKey(Club, on_delete=models.CASCADE, related_name="seats")
        code = models.CharField(max_length=20)
        badge = models.CharField(max_length=20, null=True, unique=True)  # noqa: DJ001
        objects = tiered_cache.CachedManager(lookups=["code", "badge"])

        class Meta:
            app_label = "testapp"
            constraints = [models.UniqueConstraint(fields=["club", "code"], name="seat_code")]

    with connection.schema_editor() as editor:
        editor.create_model(Club)
        editor.create_model(Seat)
    try:
        one, two, empty = Club.objects.create(), Club.objects.create(), Club.objects.create()
        Seat.objects.create(club=one, code="x")
        Seat.objects.create(club=two, code="x")
        Seat.objects.create(club=one, code="y", badge="b")
        for club in (one, two, empty):
            for lookup in ({"code": "x"}, {"badge": None}, {"badge": "b"}, {"code": "y"}):
                for read in ("get_cached", "aget_cached"):
                    assert_same(
                        lambda c=club, lk=lookup, r=read: (
                            async_to_sync(c.seats.aget_cached)(**lk)
                            if r == "aget_cached"
                            else c.seats.get_cached(**lk)
                        ),
                        lambda c=club, lk=lookup: c.seats.get(**lk),
                        f"club {club.pk}.seats.{read}({lookup})",
                    )
    finally:
        with connection.schema_editor() as editor:
            editor.delete_model(Seat)
            editor.delete_model(Club)


@pytest.mark.parametrize("tier", TIERS)
def test_scoped_miss_is_not_remembered_as_missing_for_the_unscoped_manager(tier: str) -> None:
    tenant_a, tenant_b = TenantFactory(), TenantFactory()
    acc_of_b = AccountFactory(tenant=tenant_b)
    # Cold cache: the first read of the row goes through the related manager and misses.
    assert_same(
        lambda: tenant_a.accounts.get_cached(pk=acc_of_b.pk),
        lambda: tenant_a.accounts.get(pk=acc_of_b.pk),
        "tenant_a.accounts, row of tenant_b, cold cache",
    )
    at(tier)
    assert_same(
        lambda: Account.objects.get_cached(pk=acc_of_b.pk),
        lambda: Account.objects.get(pk=acc_of_b.pk),
        "Account.objects after a scoped miss on a cold cache",
    )
    at(tier)
    assert_same(
        lambda: tenant_a.accounts.get_cached(email=acc_of_b.email),
        lambda: tenant_a.accounts.get(email=acc_of_b.email),
        "tenant_a.accounts by email, row of tenant_b",
    )


@pytest.mark.parametrize("tier", TIERS)
def test_related_manager_built_on_a_named_manager_applies_that_managers_filter(
    tier: str,
) -> None:
    tenant = TenantFactory()
    poor, rich = (
        AccountFactory(tenant=tenant, balance=1),
        AccountFactory(tenant=tenant, balance=500),
    )
    for acc in (poor, rich):
        Account.objects.get_cached(pk=acc.pk)  # warm the default manager's entries
        at(tier)
        assert_same(
            lambda a=acc: tenant.accounts(manager="rich").get_cached(pk=a.pk),
            lambda a=acc: tenant.accounts(manager="rich").get(pk=a.pk),
            f"tenant.accounts(manager='rich'), balance {acc.balance}",
        )
        assert_same(
            lambda a=acc: tenant.accounts.get_cached(pk=a.pk),
            lambda a=acc: tenant.accounts.get(pk=a.pk),
            f"tenant.accounts, balance {acc.balance}",
        )


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("many", [False, True], ids=["get_cached", "get_many_cached"])
def test_a_related_managers_rows_hold_its_own_instance_as_the_orms_do(
    tier: str, many: bool
) -> None:
    """The ORM's related manager gives its rows the manager's instance as their related
    object (its queryset's known related objects): unsaved changes to it show through,
    and reading the relation runs no query."""
    tenant = TenantFactory(name="saved")
    acc = AccountFactory(tenant=tenant)
    tenant.name = "unsaved"
    expected = tenant.accounts.get(pk=acc.pk)
    assert expected.tenant is tenant  # the oracle
    for _ in range(2):  # a miss, then from the tier under test
        at(tier)
        if many:
            got = tenant.accounts.get_many_cached([acc.pk])[acc.pk]
        else:
            got = tenant.accounts.get_cached(pk=acc.pk)
        with CaptureQueriesContext(connection) as queries:
            related = got.tenant
        assert related is tenant, f"the row's tenant is {related.name!r}, a copy read again"
        assert len(queries) == 0


def _fetch_mode(obj: models.Model) -> Any:
    return getattr(obj._state, "fetch_mode", None)  # Django 6.1+


@pytest.mark.parametrize("tier", TIERS)
def test_a_managers_fetch_mode_reaches_cached_instances(tier: str) -> None:
    """A manager whose queryset sets a fetch mode (Django 6.1+; on older versions these
    managers set none and the answers are Django's default): FETCH_RAISE blocks a lazy
    load of the instance's relation, from the cache as from the ORM."""
    acc = AccountFactory()
    Account.raising.get_cached(email=acc.email)  # warm
    at(tier)
    got = Account.raising.get_cached(email=acc.email)
    expected = Account.raising.get(email=acc.email)
    assert _fetch_mode(got) == _fetch_mode(expected)
    assert outcome(lambda: got.tenant) == outcome(lambda: expected.tenant)
    if hasattr(models, "FETCH_RAISE"):
        assert outcome(lambda: expected.tenant) == ("raises", "FieldFetchBlocked")
        assert Account.raising.get_cached(email=acc.email) is not None
        assert tiered_cache.stats()[Account._meta.label_lower]["l1_hits"] >= 1


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("many", [False, True], ids=["get_cached", "get_many_cached"])
def test_a_related_managers_rows_take_its_instances_fetch_mode(tier: str, many: bool) -> None:
    """Django 6.1's related manager gives its rows the fetch mode of the instance it hangs
    from, over its own manager's (on older versions there is none to give)."""
    acc = AccountFactory()
    tenants = Tenant.objects.all()
    if hasattr(models, "FETCH_RAISE"):
        tenants = tenants.fetch_mode(models.FETCH_RAISE)
    tenant = tenants.get(pk=acc.tenant_id)
    for manager in (tenant.accounts, tenant.accounts(manager="raising")):
        expected = manager.get(pk=acc.pk)
        for _ in range(2):  # a miss, then from the tier under test
            at(tier)
            got = (
                manager.get_many_cached([acc.pk])[acc.pk] if many else manager.get_cached(pk=acc.pk)
            )
            assert _fetch_mode(got) == _fetch_mode(expected)


@pytest.mark.parametrize("tier", TIERS)
def test_get_many_cached_links_its_rows_as_peers_as_in_bulk_does(tier: str) -> None:
    """Under FETCH_PEERS (Django 6.1+) the rows of one in_bulk() fetch a relation for all of
    them with one query; the rows of one get_many_cached() the same."""
    accs = [AccountFactory(tenant=TenantFactory()) for _ in range(3)]
    pks = [a.pk for a in accs]
    Account.peers.get_many_cached(pks)  # warm
    at(tier)

    def queries_to_read_tenants(rows: dict[Any, Account]) -> tuple[int, list[str]]:
        with CaptureQueriesContext(connection) as queries:
            names = [rows[pk].tenant.name for pk in pks]
        return len(queries), names

    got = queries_to_read_tenants(Account.peers.get_many_cached(pks))
    expected = queries_to_read_tenants(Account.peers.in_bulk(pks))
    assert got == expected
    if hasattr(models, "FETCH_PEERS"):
        assert expected[0] == 1


def test_a_fetch_mode_over_selected_relations_sends_reads_to_the_database() -> None:
    """select_related() under FETCH_RAISE: the ORM's instance holds the tenant, a cached one
    would not and would raise. Such a manager's reads go to the database (under any fetch
    mode), and the system check says why."""
    if not hasattr(models, "FETCH_RAISE"):
        assert not hasattr(models.QuerySet, "fetch_mode")  # nothing to check before 6.1
        return
    from tests.testapp.models import FetchModeAccountManager
    from tiered_cache.registry import uncacheable_reason

    class Joined(FetchModeAccountManager):
        fetch_mode = models.FETCH_RAISE

        def get_queryset(self) -> models.QuerySet:
            return super().get_queryset().select_related("tenant")

    manager = Joined(lookups=["email"])
    manager.model, manager.name = Account, "joined"  # bound as contribute_to_class would
    acc = AccountFactory()
    for _ in range(2):
        got = manager.get_cached(email=acc.email)
        assert got.tenant.pk == acc.tenant_id  # selected: no lazy load, nothing raised
    assert uncacheable_reason(manager) == "its queryset selects or prefetches related objects"


def test_derived_function_sees_many_to_many_add_and_remove() -> None:
    item, label = ItemFactory(), LabelFactory()

    def names(pk: int) -> list[str]:
        return sorted(Item.objects.get(pk=pk).tags.values_list("name", flat=True))

    cached_names = tiered_cache.cached(depends_on=[Item, Label])(names)
    try:
        assert cached_names(item.pk) == names(item.pk) == []
        item.tags.add(label)
        assert cached_names(item.pk) == names(item.pk) == [label.name]
        tiered_cache.clear_local()
        assert in_thread(lambda: cached_names(item.pk)) == [label.name]
        label.items.remove(item)
        assert cached_names(item.pk) == names(item.pk) == []
    finally:
        cached_names.unregister()


@pytest.mark.parametrize("tier", TIERS)
def test_many_to_many_related_manager_get_cached_follows_add_and_remove(tier: str) -> None:
    label = LabelFactory()
    item = ItemFactory()
    Item.objects.get_cached(pk=item.pk)  # warm, unscoped

    def check(when: str) -> None:
        at(tier)
        assert_same(
            lambda: label.items.get_cached(pk=item.pk),
            lambda: label.items.get(pk=item.pk),
            f"label.items {when}",
        )
        at(tier)
        assert_same(
            lambda: Item.objects.get_cached(pk=item.pk),
            lambda: Item.objects.get(pk=item.pk),
            f"Item.objects {when}",
        )

    check("before add()")
    label.items.add(item)
    check("after add()")
    label.items.remove(item)
    check("after remove()")
    item.tags.add(label)  # the other side of the relation
    check("after item.tags.add()")


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_related_manager_is_its_managers_class_built_with_no_arguments(tier: str) -> None:
    """Django builds a related manager on the class of the default manager (or the one
    named in `club.wallets(manager=...)`) and calls it with no arguments: a filter set by a
    model manager's arguments is not its filter, and of two managers of one class the
    lookups are those of the one that declares the lookup read."""

    class Club(models.Model):
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    class AtLeast(tiered_cache.CachedManager):
        def __init__(self, minimum: int = 0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.minimum = minimum

        def get_queryset(self) -> Any:
            return super().get_queryset().filter(balance__gte=self.minimum)

    class Wallet(models.Model):
        club = models.ForeignKey(Club, on_delete=models.CASCADE, related_name="wallets")
        balance = models.IntegerField()
        code = models.CharField(max_length=20, unique=True)
        objects = AtLeast(minimum=100)
        by_code = AtLeast(minimum=100, lookups=["code"])

        class Meta:
            app_label = "testapp"

    with installed(Club, Wallet):
        club = Club.objects.create()
        poor = Wallet.objects.create(club=club, balance=5, code="k")
        for what, cached, orm in [
            (
                "club.wallets.get_cached(pk=)",
                lambda: club.wallets.get_cached(pk=poor.pk),
                lambda: club.wallets.get(pk=poor.pk),
            ),
            (
                "club.wallets.aget_cached(pk=)",
                lambda: async_to_sync(club.wallets.aget_cached)(pk=poor.pk),
                lambda: club.wallets.get(pk=poor.pk),
            ),
            (
                "club.wallets.get_many_cached()",
                lambda: club.wallets.get_many_cached([poor.pk]),
                lambda: club.wallets.in_bulk([poor.pk]),
            ),
            (
                "club.wallets(manager='by_code').get_cached(code=)",
                lambda: club.wallets(manager="by_code").get_cached(code="k"),
                lambda: club.wallets(manager="by_code").get(code="k"),
            ),
            (
                "Wallet.by_code.get_cached(code=)",
                lambda: Wallet.by_code.get_cached(code="k"),
                lambda: Wallet.by_code.get(code="k"),
            ),
        ]:
            for _ in range(2):  # the second read from the tier the first filled
                at(tier)
                assert_same(cached, orm, what)


# -- 2. proxies --------------------------------------------------------------------------

PROXY_WRITES = ["account_save", "account_queryset_update", "proxy_save", "proxy_queryset_update"]


def _write_account(how: str, pk: int, balance: int, email: str) -> None:
    if how == "account_save":
        obj = Account.objects.get(pk=pk)
        obj.balance, obj.email = balance, email
        obj.save()
    elif how == "account_queryset_update":
        Account.objects.filter(pk=pk).update(balance=balance, email=email)
    elif how == "proxy_save":
        pobj = ProxyAccount.objects.get(pk=pk)
        pobj.balance, pobj.email = balance, email
        pobj.save()
    elif how == "proxy_queryset_update":
        ProxyAccount.objects.filter(pk=pk).update(balance=balance, email=email)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", PROXY_WRITES)
def test_proxy_and_concrete_model_see_each_others_writes(how: str, tier: str) -> None:
    acc = AccountFactory(balance=1)
    old_email = acc.email
    for model in (Account, ProxyAccount):
        model.objects.get_cached(pk=acc.pk)
        model.objects.get_cached(email=old_email)
    _write_account(how, acc.pk, balance=2, email="renamed-" + old_email)
    for model in (Account, ProxyAccount):
        at(tier)
        assert_same(
            lambda m=model: m.objects.get_cached(pk=acc.pk),
            lambda m=model: m.objects.get(pk=acc.pk),
            f"{model.__name__} by pk after {how}",
        )
        at(tier)
        assert_same(
            lambda m=model: m.objects.get_cached(email=old_email),
            lambda m=model: m.objects.get(email=old_email),
            f"{model.__name__} by the old email after {how}",
        )
        at(tier)
        assert_same(
            lambda m=model: m.objects.get_cached(email="renamed-" + old_email),
            lambda m=model: m.objects.get(email="renamed-" + old_email),
            f"{model.__name__} by the new email after {how}",
        )


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", ["account_instance", "account_queryset", "proxy_instance"])
def test_proxy_sees_a_delete(how: str, tier: str) -> None:
    acc = AccountFactory()
    ProxyAccount.objects.get_cached(pk=acc.pk)
    ProxyAccount.objects.get_cached(email=acc.email)
    Account.objects.get_cached(pk=acc.pk)
    if how == "account_instance":
        Account.objects.get(pk=acc.pk).delete()
    elif how == "account_queryset":
        Account.objects.filter(pk=acc.pk).delete()
    else:
        ProxyAccount.objects.get(pk=acc.pk).delete()
    at(tier)
    expected = assert_same(
        lambda: ProxyAccount.objects.get_cached(pk=acc.pk),
        lambda: ProxyAccount.objects.get(pk=acc.pk),
        f"ProxyAccount by pk after delete via {how}",
    )
    assert expected == ("raises", "ProxyAccount.DoesNotExist")
    at(tier)
    assert_same(
        lambda: ProxyAccount.objects.get_cached(email=acc.email),
        lambda: ProxyAccount.objects.get(email=acc.email),
        f"ProxyAccount by email after delete via {how}",
    )


def _user_via(via: str, pk: int) -> ProjectUser:
    return (ProjectUser if via == "project_user" else CachedUser).objects.get(pk=pk)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("via", ["project_user", "proxy"])
def test_cached_user_proxy_sees_deactivation(via: str, tier: str) -> None:
    user = CachedUserFactory(is_active=True)
    assert CachedUser.objects.get_cached(pk=user.pk).is_active
    assert CachedUser.objects.get_cached(username=user.username).is_active
    u = _user_via(via, user.pk)
    u.is_active = False
    u.save()
    at(tier)
    got = CachedUser.objects.get_cached(pk=user.pk)
    assert got.is_active is False, f"cached proxy user by pk still active after save via {via}"
    at(tier)
    got = CachedUser.objects.get_cached(username=user.username)
    assert got.is_active is False, (
        f"cached proxy user by username still active after save via {via}"
    )


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("via", ["project_user", "proxy"])
def test_cached_user_proxy_sees_a_new_password(via: str, tier: str) -> None:
    user = CachedUserFactory()
    assert CachedUser.objects.get_cached(pk=user.pk).check_password("password")
    u = _user_via(via, user.pk)
    u.set_password("new")
    u.save()
    at(tier)
    got = CachedUser.objects.get_cached(pk=user.pk)
    assert got.password == CachedUser.objects.get(pk=user.pk).password, (
        f"cached proxy user serves the old password hash after set_password via {via}"
    )
    assert got.check_password("new")


def test_proxy_models_raise_no_non_unique_lookup_warning() -> None:
    proxies = {ProxyAccount, CachedUser}
    found = [
        m
        for m in checks.run_checks()
        if m.id == "tiered_cache.W001" and getattr(m, "obj", None) in proxies
    ]
    assert found == [], f"system checks warn about the proxies' unique lookups: {found}"


# -- 3. multi-table inheritance ------------------------------------------------------------

MTI_WRITES = [
    "place_save",
    "place_queryset_update",
    "restaurant_save",
    "restaurant_queryset_update",
    "italian_save",
    "italian_queryset_update",
]


def _write_mti(how: str, pk: int) -> None:
    if how == "place_save":
        p = Place.objects.get(pk=pk)
        p.name, p.address = "renamed", "1 New Street"
        p.save()
    elif how == "place_queryset_update":
        Place.objects.filter(pk=pk).update(name="renamed", address="1 New Street")
    elif how == "restaurant_save":
        r = Restaurant.objects.get(pk=pk)
        r.name, r.serves_pizza = "renamed", True
        r.save()
    elif how == "restaurant_queryset_update":
        # serves_pizza is Restaurant's own field, name is the parent's: two UPDATEs.
        Restaurant.objects.filter(pk=pk).update(serves_pizza=True, name="renamed")
    elif how == "italian_save":
        i = ItalianRestaurant.objects.get(pk=pk)
        i.name, i.serves_pizza, i.has_oven = "renamed", True, True
        i.save()
    elif how == "italian_queryset_update":
        ItalianRestaurant.objects.filter(pk=pk).update(
            name="renamed", serves_pizza=True, has_oven=True
        )
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", MTI_WRITES)
def test_multi_table_inheritance_writes_reach_every_level(how: str, tier: str) -> None:
    it = ItalianRestaurantFactory(name="old", address="1 Old Street")
    for model in (Place, Restaurant, ItalianRestaurant):
        model.objects.get_cached(pk=it.pk)
    _write_mti(how, it.pk)
    for model in (Place, Restaurant, ItalianRestaurant):
        at(tier)
        assert_same(
            lambda m=model: m.objects.get_cached(pk=it.pk),
            lambda m=model: m.objects.get(pk=it.pk),
            f"{model.__name__} after {how}",
        )


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", ["place_instance", "place_queryset", "restaurant_instance"])
def test_deleting_the_parent_row_deletes_every_level(how: str, tier: str) -> None:
    it = ItalianRestaurantFactory()
    for model in (Place, Restaurant, ItalianRestaurant):
        model.objects.get_cached(pk=it.pk)
    if how == "place_instance":
        Place.objects.get(pk=it.pk).delete()
    elif how == "place_queryset":
        Place.objects.filter(pk=it.pk).delete()
    else:
        Restaurant.objects.get(pk=it.pk).delete()
    for model in (Place, Restaurant, ItalianRestaurant):
        at(tier)
        expected = assert_same(
            lambda m=model: m.objects.get_cached(pk=it.pk),
            lambda m=model: m.objects.get(pk=it.pk),
            f"{model.__name__} after deleting via {how}",
        )
        assert expected[0] == "raises"


# -- 4. write paths that send no signals ----------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("field", ["owner_set_null", "owner_set_default", "owner_set"])
def test_on_delete_set_null_set_default_and_set_reach_the_cache(field: str, tier: str) -> None:
    owner = OwnerFactory()
    item = ItemFactory(**{field: owner})
    assert getattr(Item.objects.get_cached(pk=item.pk), field + "_id") == owner.pk
    owner.delete()
    at(tier)
    assert_same(
        lambda: Item.objects.get_cached(pk=item.pk),
        lambda: Item.objects.get(pk=item.pk),
        f"Item after deleting the Owner its {field} pointed to",
    )
    assert getattr(Item.objects.get_cached(pk=item.pk), field + "_id") is None


@pytest.mark.parametrize("tier", TIERS)
def test_on_delete_cascade_reaches_the_cache(tier: str) -> None:
    item = ItemFactory()
    Item.objects.get_cached(pk=item.pk)
    item.owner_cascade.delete()
    at(tier)
    expected = assert_same(
        lambda: Item.objects.get_cached(pk=item.pk),
        lambda: Item.objects.get(pk=item.pk),
        "Item after deleting its owner_cascade",
    )
    assert expected == ("raises", "Item.DoesNotExist")


REVERSE_FK_OPS = ["add", "set", "remove", "clear"]


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("op", REVERSE_FK_OPS)
def test_reverse_foreign_key_manager_bulk_writes_reach_the_cache(op: str, tier: str) -> None:
    owner = OwnerFactory()
    in_set = ItemFactory(owner_set_null=owner if op in ("set", "remove", "clear") else None)
    other = ItemFactory()
    items = [in_set, other]
    for it in items:
        Item.objects.get_cached(pk=it.pk)
    if op == "add":
        owner.set_null_items.add(in_set)  # bulk=True: an UPDATE through _base_manager
    elif op == "set":
        owner.set_null_items.set([other])  # in_set leaves, other joins
    elif op == "remove":
        owner.set_null_items.remove(in_set)
    else:
        owner.set_null_items.clear()
    for it in items:
        at(tier)
        assert_same(
            lambda i=it: Item.objects.get_cached(pk=i.pk).owner_set_null_id,
            lambda i=it: Item.objects.get(pk=i.pk).owner_set_null_id,
            f"Item {it.name}.owner_set_null_id after owner.set_null_items.{op}()",
        )


@pytest.mark.parametrize("tier", TIERS)
def test_remembered_missing_row_is_found_after_bulk_create(tier: str) -> None:
    owner = OwnerFactory()
    pk = (Item.objects.order_by("-pk").values_list("pk", flat=True).first() or 0) + 1000
    assert_same(
        lambda: Item.objects.get_cached(pk=pk),
        lambda: Item.objects.get(pk=pk),
        "a pk that does not exist yet",
    )
    Item.objects.bulk_create([Item(pk=pk, name="bulk", owner_cascade=owner)])
    at(tier)
    expected = assert_same(
        lambda: Item.objects.get_cached(pk=pk),
        lambda: Item.objects.get(pk=pk),
        "the pk after bulk_create() created it",
    )
    assert expected[0] == "row"


# -- 5. several databases ------------------------------------------------------------------


@MULTI_DB
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("first", ["default", "other"])
def test_database_alias_is_part_of_the_key(first: str, tier: str) -> None:
    t = Tenant.objects.create(name="default-row")
    Tenant.objects.using("other").create(pk=t.pk, name="other-row")
    order = ["default", "other"] if first == "default" else ["other", "default"]
    for alias in order + order:  # the second round reads what the first one cached
        at(tier)
        expected = assert_same(
            lambda a=alias: Tenant.objects.db_manager(a).get_cached(pk=t.pk),
            lambda a=alias: Tenant.objects.db_manager(a).get(pk=t.pk),
            f"Tenant pk={t.pk} on {alias!r} (read {first!r} first)",
        )
        assert expected[1][1] == alias  # _state.db, as Django sets it
    for alias, name in (("default", "default-row"), ("other", "other-row")):
        at(tier)
        assert_same(
            lambda a=alias, n=name: Tenant.objects.db_manager(a).get_cached(name=n),
            lambda a=alias, n=name: Tenant.objects.db_manager(a).get(name=n),
            f"Tenant name={name!r} on {alias!r}",
        )
        at(tier)
        wrong = "other-row" if alias == "default" else "default-row"
        assert_same(
            lambda a=alias, n=wrong: Tenant.objects.db_manager(a).get_cached(name=n),
            lambda a=alias, n=wrong: Tenant.objects.db_manager(a).get(name=n),
            f"Tenant name={wrong!r} on {alias!r} (only in the other database)",
        )


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", ["delete", "queryset_delete", "raw_sql"])
def test_a_delete_the_database_carries_on_is_seen(tier: str, how: str) -> None:
    """Foreign keys with a database-level on_delete (Django 6.1's DB_CASCADE, DB_SET_NULL;
    Django's own before): deleting a shelf deletes its books and their bookmarks and
    empties its loans in the database, through no statement of Django's for them. Raw SQL
    counts as well: Django sees the statement, the database does the rest."""
    shelf, other = Shelf.objects.create(name="s"), Shelf.objects.create(name="o")
    book, kept = (
        Book.objects.create(shelf=shelf, title="b"),
        Book.objects.create(shelf=other, title="k"),
    )
    mark = Bookmark.objects.create(book=book)
    loan, kept_loan = (
        Loan.objects.create(shelf=shelf, who="l"),
        Loan.objects.create(shelf=other, who="k"),
    )
    rows = [(Book, book.pk), (Book, kept.pk), (Bookmark, mark.pk), (Loan, loan.pk)]
    rows.append((Loan, kept_loan.pk))
    for model, pk in rows:  # cached
        model.objects.get_cached(pk=pk)
    if how == "delete":
        shelf.delete()
    elif how == "queryset_delete":
        Shelf.objects.filter(name="s").delete()
    else:
        with connection.cursor() as cursor:
            if not hasattr(models, "DB_CASCADE"):  # Django's own on_delete: it is ours too
                books, loans = Book._meta.db_table, Loan._meta.db_table
                cursor.execute(f"DELETE FROM {Bookmark._meta.db_table}")
                cursor.execute(f"DELETE FROM {books} WHERE shelf_id = %s", [shelf.pk])
                cursor.execute(
                    f"UPDATE {loans} SET shelf_id = NULL WHERE shelf_id = %s", [shelf.pk]
                )
            cursor.execute(f"DELETE FROM {Shelf._meta.db_table} WHERE id = %s", [shelf.pk])
    assert_rows_as_orm(rows, tier, f"after the shelf's {how}")


@pytest.mark.parametrize("tier", TIERS)
def test_a_truncate_cascade_empties_the_tables_that_point_at_it(tier: str) -> None:
    """TRUNCATE ... CASCADE (raw SQL) empties every table whose foreign keys point at the
    one named, of any on_delete, and on along their own."""
    tenant, shelf = TenantFactory(), Shelf.objects.create(name="s")
    acc = AccountFactory(tenant=tenant)
    book = Book.objects.create(shelf=shelf, title="b")
    mark = Bookmark.objects.create(book=book)
    rows = [(Account, acc.pk), (Book, book.pk), (Bookmark, mark.pk), (Tenant, tenant.pk)]
    for model, pk in rows:
        model.objects.get_cached(pk=pk)
    with connection.cursor() as cursor:
        cursor.execute(
            f"TRUNCATE {Tenant._meta.db_table}, {Shelf._meta.db_table} RESTART IDENTITY CASCADE"
        )
    assert_rows_as_orm(rows, tier, "after TRUNCATE ... CASCADE")


class StartedFlows(tiered_cache.CachedManager):
    """Flows whose start has come: a filter the database evaluates against its clock."""

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(started_at__lte=Now())


def test_a_filter_on_the_databases_clock_is_answered_as_the_orm_does_when_it_lapses() -> None:
    """No write changes whether a row passes `started_at__lte=Now()`: time does. A cached
    answer would outlive it (here "no such row" after the start had come)."""
    manager = StartedFlows()
    manager.model, manager.name = Flow, "started"  # bound as contribute_to_class would
    flow = FlowFactory(started_at=timezone.now() + timedelta(seconds=1))
    for step in ("before its start", "after its start"):
        for _ in range(2):
            expected = assert_same(
                lambda: manager.get_cached(pk=flow.pk), lambda: manager.get(pk=flow.pk), step
            )
        assert expected[0] == ("raises" if step == "before its start" else "row")
        time.sleep(max(0.0, (flow.started_at - timezone.now()).total_seconds() + 0.05))
    reason = registry.uncacheable_reason(manager) or ""
    assert "the database computes" in reason
    for qs, cacheable in (
        (Flow.objects.filter(started_at__lte=RawSQL("now()", [])), False),
        (Flow.objects.extra(where=["started_at <= now()"]), False),
        (Flow.objects.extra(tables=["testapp_tenant"]), False),
        (Flow.objects.filter(current_step=F("current_step")), True),  # the row's own columns
        (Flow.objects.filter(Exact(Lower("tenant_id"), "t")), True),  # of a column
        (Flow.objects.filter(tenant_id=Lower(Value("T"))), False),  # constants alone
    ):
        got = registry._scope_reason(Flow, qs)
        assert (got is None) == cacheable, (str(qs.query), got)


class LockingTenants(tiered_cache.CachedManager):
    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().select_for_update()


def test_a_manager_whose_queryset_locks_rows_reads_as_the_orm_does() -> None:
    """select_for_update() in get_queryset(): the ORM's get() needs a transaction and locks
    the row; a cached read would do neither, so these reads go to the database."""
    manager = LockingTenants()
    manager.model, manager.name = Tenant, "locking"  # bound as contribute_to_class would
    t = TenantFactory()
    for step in ("outside a transaction", "again"):
        expected = assert_same(
            lambda: manager.get_cached(pk=t.pk), lambda: manager.get(pk=t.pk), step
        )
        assert expected == ("raises", "TransactionManagementError")
    for _ in range(2):  # the second read would find the first one's row cached
        with transaction.atomic():
            with CaptureQueriesContext(connection) as queries:
                assert manager.get_cached(pk=t.pk) == t
            assert "FOR UPDATE" in queries[-1]["sql"]
    assert "locks rows" in (registry.uncacheable_reason(manager) or "")


class OtherDatabaseTenants(tiered_cache.CachedManager):
    """A manager whose queryset picks its database itself (using()), not through
    db_manager() or a router."""

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().using("other")


@MULTI_DB
@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("many", [False, True], ids=["get_cached", "get_many_cached"])
def test_a_manager_whose_queryset_picks_a_database_serves_that_databases_rows(
    tier: str, many: bool
) -> None:
    manager = OtherDatabaseTenants()
    manager.model, manager.name = Tenant, "on_other"  # bound as contribute_to_class would

    def cached() -> Tenant:
        return manager.get_many_cached([t.pk])[t.pk] if many else manager.get_cached(pk=t.pk)

    t = Tenant.objects.create(name="default-row")
    Tenant.objects.using("other").create(pk=t.pk, name="other-row")
    for step in ("first", "again"):
        at(tier)
        assert_same(cached, lambda: manager.get(pk=t.pk), f"{step} read")
    Tenant.objects.using("other").filter(pk=t.pk).update(name="other-renamed")
    for step in ("after the other database's write", "again"):
        at(tier)
        assert_same(cached, lambda: manager.get(pk=t.pk), step)
    Tenant.objects.filter(pk=t.pk).update(name="default-renamed")
    at(tier)
    assert_same(cached, lambda: manager.get(pk=t.pk), "after the default database's write")


@MULTI_DB
@pytest.mark.parametrize("tier", TIERS)
def test_saving_an_instance_read_from_another_database_changes_only_that_one(tier: str) -> None:
    t = Tenant.objects.create(name="default-row")
    Tenant.objects.using("other").create(pk=t.pk, name="other-row")
    Tenant.objects.get_cached(pk=t.pk)
    got = Tenant.objects.db_manager("other").get_cached(pk=t.pk)
    assert (got.name, got._state.db) == ("other-row", "other")
    got.name = "other-renamed"
    got.save()
    assert Tenant.objects.get(pk=t.pk).name == "default-row"  # plain Django, the oracle
    assert Tenant.objects.using("other").get(pk=t.pk).name == "other-renamed"
    for alias in ("default", "other"):
        at(tier)
        assert_same(
            lambda a=alias: Tenant.objects.db_manager(a).get_cached(pk=t.pk),
            lambda a=alias: Tenant.objects.db_manager(a).get(pk=t.pk),
            f"Tenant on {alias!r} after saving the instance read from 'other'",
        )


# -- 6. the writer's own L1, with reader threads -------------------------------------------


def test_writer_thread_reads_its_own_saves_while_readers_load() -> None:
    acc = AccountFactory(balance=0)
    Account.objects.get_cached(pk=acc.pk)
    stop = threading.Event()
    errors: list[Any] = []
    readers = [
        start_loop(lambda: Account.objects.get_cached(pk=acc.pk), stop, errors) for _ in range(2)
    ]
    stale: list[tuple[str, int, Any]] = []

    def writer() -> None:
        obj = Account.objects.get(pk=acc.pk)
        for i in range(1, 201):
            obj.balance = i
            obj.save()
            mine = Account.objects.get_cached(pk=acc.pk).balance
            if mine != i:
                stale.append(("writer", i, mine))
            fresh = in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance)
            if fresh != i:
                stale.append(("new reader thread", i, fresh))

    try:
        result = in_thread(writer)
    finally:
        stop.set()
        for r in readers:
            r.join(10)
    assert not isinstance(result, Exception), f"the writer thread failed: {result!r}"
    assert errors == [], f"reader threads failed: {errors[:3]}"
    assert stale == [], (
        f"{len(stale)} stale reads right after save() returned "
        f"(who, saved, read), first ones: {stale[:5]}"
    )


# -- 7. on_commit order --------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", ["save", "queryset_update"])
def test_on_commit_callback_registered_before_the_write_reads_the_new_value(
    how: str, tier: str
) -> None:
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    seen: list[Any] = []

    def callback() -> None:
        at(tier)
        seen.append(outcome(lambda: Account.objects.get_cached(pk=acc.pk).balance))

    with transaction.atomic():
        transaction.on_commit(callback)
        if how == "save":
            obj = Account.objects.get(pk=acc.pk)
            obj.balance = 2
            obj.save()
        else:
            Account.objects.filter(pk=acc.pk).update(balance=2)
    assert seen == [("value", 2)], (
        f"an on_commit callback registered before the write read {seen}, not balance 2"
    )


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", ["save", "queryset_update"])
def test_raising_on_commit_callback_does_not_keep_the_old_value_cached(how: str, tier: str) -> None:
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)

    def boom() -> None:
        raise Boom("a callback that is not robust")

    with pytest.raises(Boom):
        with transaction.atomic():
            transaction.on_commit(boom)  # not robust: Django runs no later callback
            if how == "save":
                obj = Account.objects.get(pk=acc.pk)
                obj.balance = 2
                obj.save()
            else:
                Account.objects.filter(pk=acc.pk).update(balance=2)
    assert Account.objects.get(pk=acc.pk).balance == 2  # committed: the oracle
    at(tier)
    assert_same(
        lambda: Account.objects.get_cached(pk=acc.pk),
        lambda: Account.objects.get(pk=acc.pk),
        "after a commit whose first on_commit callback raised",
    )
    elsewhere = in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance)
    assert elsewhere == 2, f"another thread read {elsewhere!r} after the commit, not 2"


# -- 8. derived functions ------------------------------------------------------------------


@tiered_cache.cached(depends_on=[Account])
def tenant_balance(tenant_id: int) -> int:
    return sum(Account.objects.filter(tenant_id=tenant_id).values_list("balance", flat=True))


def _orm_tenant_balance(tenant_id: int) -> int:
    return sum(Account.objects.filter(tenant_id=tenant_id).values_list("balance", flat=True))


@pytest.mark.parametrize("tier", TIERS)
def test_derived_result_dropped_by_a_queryset_update_committed_in_atomic(tier: str) -> None:
    acc = AccountFactory(balance=1)
    assert tenant_balance(acc.tenant_id) == 1
    with transaction.atomic():
        Account.objects.filter(pk=acc.pk).update(balance=5)
    at(tier)
    got = tenant_balance(acc.tenant_id)
    assert got == _orm_tenant_balance(acc.tenant_id) == 5, (
        f"the derived function returned {got} after the committed update to 5"
    )


@pytest.mark.parametrize("tier", TIERS)
def test_derived_invalidate_inside_rolled_back_block_leaves_no_uncommitted_result(
    tier: str,
) -> None:
    acc = AccountFactory(balance=1)
    assert tenant_balance(acc.tenant_id) == 1
    inside: dict[str, Any] = {}
    with pytest.raises(Boom):
        with transaction.atomic():
            Account.objects.filter(pk=acc.pk).update(balance=99)
            tenant_balance.invalidate(acc.tenant_id)
            inside["cached"] = tenant_balance(acc.tenant_id)
            inside["orm"] = _orm_tenant_balance(acc.tenant_id)
            raise Boom("roll back")
    at(tier)
    after = tenant_balance(acc.tenant_id)
    assert after == _orm_tenant_balance(acc.tenant_id) == 1, (
        f"after the rollback the derived function returned {after}, computed from "
        "uncommitted data (the committed value is 1)"
    )
    elsewhere = in_thread(lambda: tenant_balance(acc.tenant_id))
    assert elsewhere == 1, f"another thread got {elsewhere!r} after the rollback, not 1"
    assert inside["cached"] == inside["orm"] == 99, (
        f"inside the block the derived function returned {inside['cached']}, "
        f"the ORM {inside['orm']}"
    )


def _forget_derived(fn: Any) -> None:
    """Best effort: unregister a cached function defined by a test, so later system
    checks do not report it (the registry's internals may change)."""
    from tiered_cache import derived

    label = getattr(fn, "label", None)
    functions = getattr(derived, "_functions", None)
    if isinstance(functions, dict) and label is not None:
        functions.pop(label, None)
    dependents = getattr(derived, "_dependents", None)
    if isinstance(dependents, dict) and label is not None:
        for labels in dependents.values():
            if isinstance(labels, set):
                labels.discard(label)


def test_derived_function_depending_on_a_model_without_cached_manager_is_refused_clearly() -> None:
    Shipment.objects.create(tenant_code="T", number=1)  # behind a plain models.Manager
    fn: Any = None
    try:
        try:

            @tiered_cache.cached(depends_on=[Shipment])
            def shipment_count() -> int:
                return Shipment.objects.count()

            fn = shipment_count
        except ImproperlyConfigured as exc:
            assert "shipment" in str(exc).lower(), f"the error does not name the model: {exc}"
            return
        messages = [
            m
            for m in checks.run_checks()
            if (m.id or "").startswith("tiered_cache.") and "shipment" in m.msg.lower()
        ]
        if messages:
            assert any(m.is_serious() for m in messages), (
                f"the check reports the uncached dependency only as {messages}"
            )
            return
        with pytest.raises(ImproperlyConfigured) as info:
            fn()
        assert "shipment" in str(info.value).lower(), (
            f"the error does not name the model: {info.value}"
        )
    finally:
        if fn is not None:
            _forget_derived(fn)


# -- 9. autocommit off ---------------------------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", ["save", "queryset_update"])
def test_manual_transaction_rollback_leaves_the_committed_value(how: str, tier: str) -> None:
    acc = AccountFactory(balance=1)
    Account.objects.get_cached(pk=acc.pk)
    transaction.set_autocommit(False)
    try:
        if how == "save":
            obj = Account.objects.get(pk=acc.pk)
            obj.balance = 2
            obj.save()
        else:
            Account.objects.filter(pk=acc.pk).update(balance=2)
        assert_same(
            lambda: Account.objects.get_cached(pk=acc.pk),
            lambda: Account.objects.get(pk=acc.pk),
            "in the manual transaction, after the uncommitted write",
        )
        transaction.rollback()
    finally:
        if not transaction.get_autocommit():
            transaction.rollback()
            transaction.set_autocommit(True)
    elsewhere = in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance)
    assert elsewhere == 1, f"another thread read {elsewhere!r} after the rollback, not 1"
    at(tier)
    assert_same(
        lambda: Account.objects.get_cached(pk=acc.pk),
        lambda: Account.objects.get(pk=acc.pk),
        "after the rollback, autocommit on again",
    )
    at(tier)
    elsewhere = in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance)
    assert elsewhere == 1, f"another thread read {elsewhere!r} after the rollback, not 1"


def test_manual_transaction_commit_invalidates_at_commit_for_other_threads() -> None:
    """Under set_autocommit(False) Django runs no hook at commit(); the invalidation must
    still land at the COMMIT, not when autocommit is turned back on."""
    acc = AccountFactory(balance=1)
    assert in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance) == 1
    transaction.set_autocommit(False)
    try:
        Account.objects.filter(pk=acc.pk).update(balance=2)
        transaction.commit()
        elsewhere = in_thread(lambda: Account.objects.get_cached(pk=acc.pk).balance)
        assert elsewhere == 2, f"another thread read {elsewhere!r} after commit(), not 2"
    finally:
        if not transaction.get_autocommit():
            transaction.rollback()
            transaction.set_autocommit(True)


def test_capture_on_commit_callbacks_sees_only_the_projects_own_callbacks() -> None:
    """The invalidation is no on_commit callback: Django's captureOnCommitCallbacks (and
    pytest-django's django_capture_on_commit_callbacks) list exactly what the project
    registered, before and after a write."""
    from django.test import TestCase

    acc = AccountFactory(balance=1)
    seen: list[str] = []
    with transaction.atomic():
        transaction.on_commit(lambda: seen.append("before"))
        with TestCase.captureOnCommitCallbacks() as callbacks:
            Account.objects.filter(pk=acc.pk).update(balance=2)
            transaction.on_commit(lambda: seen.append("mine"))
        assert len(callbacks) == 1
        callbacks[0]()
    assert seen == ["mine", "before", "mine"]
    assert Account.objects.get_cached(pk=acc.pk).balance == 2


# -- 10. queryset update() filtered across joins -------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_queryset_update_filtered_on_a_nullable_join_works_like_django(tier: str) -> None:
    acc = AccountFactory(balance=0)
    Account.objects.get_cached(pk=acc.pk)
    qs = Account.objects.filter(tenant__name__isnull=True)
    expected = qs.count()
    n = qs.update(balance=1)
    assert n == expected
    at(tier)
    assert_same(
        lambda: Account.objects.get_cached(pk=acc.pk),
        lambda: Account.objects.get(pk=acc.pk),
        "after update() filtered on tenant__name__isnull",
    )


@pytest.mark.parametrize("tier", TIERS)
def test_queryset_update_filtered_with_or_across_a_join_works_like_django(tier: str) -> None:
    in_a = AccountFactory(tenant=TenantFactory(name="a"), balance=0)
    x = AccountFactory(email="x", balance=0)
    neither = AccountFactory(balance=0)
    accounts = [in_a, x, neither]
    for acc in accounts:
        Account.objects.get_cached(pk=acc.pk)
    n = Account.objects.filter(Q(tenant__name="a") | Q(email="x")).update(balance=2)
    assert n == 2
    for acc in accounts:
        at(tier)
        assert_same(
            lambda a=acc: Account.objects.get_cached(pk=a.pk),
            lambda a=acc: Account.objects.get(pk=a.pk),
            f"account {acc.email} after update() filtered with Q(...) | Q(...)",
        )


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("filter_kind", ["isnull", "or"])
def test_queryset_update_filtered_across_a_left_outer_join_works_like_django(
    filter_kind: str, tier: str
) -> None:
    # Account.tenant is NOT NULL, so Django joins it with an INNER JOIN; Item.owner_set_null
    # is nullable: these filters make a LEFT OUTER JOIN (where SELECT ... FOR UPDATE fails).
    owner_a = OwnerFactory(name="a")
    with_a = ItemFactory(owner_set_null=owner_a)
    without = ItemFactory()
    named_x = ItemFactory(name="x", owner_set_null=OwnerFactory(name="b"))
    items = [with_a, without, named_x]
    for it in items:
        Item.objects.get_cached(pk=it.pk)
    if filter_kind == "isnull":
        qs = Item.objects.filter(owner_set_null__name__isnull=True)
    else:
        qs = Item.objects.filter(Q(owner_set_null__name="a") | Q(name="x"))
    expected = qs.count()
    assert expected == (1 if filter_kind == "isnull" else 2)
    n = qs.update(owner_protect=owner_a)
    assert n == expected, f"update() changed {n} rows, the filter matches {expected}"
    for it in items:
        at(tier)
        assert_same(
            lambda i=it: Item.objects.get_cached(pk=i.pk),
            lambda i=it: Item.objects.get(pk=i.pk),
            f"item {it.name} after update() filtered by {filter_kind} across a LEFT OUTER JOIN",
        )


# -- 11. single flight ------------------------------------------------------------------------


def test_own_committed_save_is_not_hidden_by_an_in_flight_load() -> None:
    acc = AccountFactory(balance=0)
    Account.objects.get_cached(pk=acc.pk)
    stop = threading.Event()
    errors: list[Any] = []

    def cold_read() -> None:
        tiered_cache.clear_local()  # more misses: more loads in flight
        Account.objects.get_cached(pk=acc.pk)

    readers = [
        start_loop(lambda: Account.objects.get_cached(pk=acc.pk), stop, errors) for _ in range(3)
    ] + [start_loop(cold_read, stop, errors)]
    stale: list[tuple[int, Any]] = []
    obj = Account.objects.get(pk=acc.pk)
    try:
        for i in range(1, 151):
            obj.balance = i
            obj.save()
            got = Account.objects.get_cached(pk=acc.pk).balance
            if got != i:
                stale.append((i, got))
    finally:
        stop.set()
        for r in readers:
            r.join(10)
    assert errors == [], f"reader threads failed: {errors[:3]}"
    assert stale == [], f"{len(stale)} stale reads of our own save (saved, read): {stale[:5]}"


# -- 12. two projects on one Redis database -------------------------------------------------


def _rebuild_caches() -> None:
    """Make tiered_cache pick up changed CACHES settings. ASSUMPTION (tiered_cache at the
    time of writing): registry.ModelCache objects hold the key prefixes and are built once
    per manager, reset_registry() forgets them; redis_tier.reset() drops the L2 client
    built from the old CACHES. clear_local(): each project is a process of its own, with an
    L1 of its own, so project B never sees project A's L1 (only Redis is shared)."""
    from tiered_cache.registry import reset_registry
    from tiered_cache.tiers import redis_tier

    wait = getattr(redis_tier, "wait_for_fills", None)
    if callable(wait):
        wait()
    reset_registry()
    redis_tier.reset()
    tiered_cache.clear_local()


@contextmanager
def as_project(**cache_options: Any) -> Iterator[None]:
    caches = {"default": {**settings.CACHES["default"], **cache_options}}
    _rebuild_caches()
    try:
        with override_settings(CACHES=caches):
            _rebuild_caches()
            try:
                yield
            finally:
                _rebuild_caches()
    finally:
        _rebuild_caches()


def _queries_of(fn: Callable[[], Any]) -> int:
    with CaptureQueriesContext(connection) as queries:
        fn()
    return len(queries)


@pytest.mark.parametrize("setting", ["KEY_PREFIX", "VERSION"])
def test_projects_sharing_a_redis_database_are_kept_apart(setting: str) -> None:
    t = TenantFactory(name="shared")
    if setting == "KEY_PREFIX":
        a = {"KEY_PREFIX": settings.TEST_KEY_PREFIX + "-project-a"}
        b = {"KEY_PREFIX": settings.TEST_KEY_PREFIX + "-project-b"}
    else:
        a, b = {"VERSION": 1001}, {"VERSION": 1002}
    # TIERED_CACHE["KEY_PREFIX"] stays the same in both projects (settings.TIERED_CACHE).
    with as_project(**a):
        Tenant.objects.get_cached(pk=t.pk)  # project A caches the row in L2
        _rebuild_caches()  # another process of project A
        served_from_l2 = _queries_of(lambda: Tenant.objects.get_cached(pk=t.pk)) == 0
    with as_project(**b):
        n = _queries_of(lambda: Tenant.objects.get_cached(pk=t.pk))
    assert n == 1, (
        f"project B (CACHES {setting}={b[setting]!r}) read the row with {n} queries: it was "
        f"served project A's entry (CACHES {setting}={a[setting]!r}) from the shared Redis"
    )
    # The premise: project A itself is served from L2 (otherwise the check above proves
    # nothing about keys).
    assert served_from_l2, "project A's second process did not read its own entry from L2"


# -- 13. mutable values behind immutable field classes ---------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_mutating_a_returned_list_field_does_not_change_the_cache(tier: str) -> None:
    acc = AccountFactory(tags=["a", "b"])
    Account.objects.get_cached(pk=acc.pk)
    at(tier)
    got = Account.objects.get_cached(pk=acc.pk)
    assert got.tags == ["a", "b"]
    got.tags.append("zzz")
    again = Account.objects.get_cached(pk=acc.pk)
    assert again.tags == ["a", "b"], f"the next read served the caller's mutation: {again.tags}"
    again.tags.clear()
    assert Account.objects.get_cached(pk=acc.pk).tags == ["a", "b"]


@pytest.mark.parametrize("tier", TIERS)
def test_mutating_a_returned_json_field_does_not_change_the_cache(tier: str) -> None:
    acc = AccountFactory(data={"x": 0, "nested": {"list": [1]}})
    Account.objects.get_cached(pk=acc.pk)
    at(tier)
    got = Account.objects.get_cached(pk=acc.pk)
    got.data["k"] = 1
    got.data["nested"]["list"].append(2)
    again = Account.objects.get_cached(pk=acc.pk)
    assert again.data == {"x": 0, "nested": {"list": [1]}}, (
        f"the next read served the caller's mutation: {again.data}"
    )


# -- 15. an unsaved (or wrong) instance as a lookup value ------------------------------------


@pytest.mark.parametrize("value", ["unsaved_tenant", "instance_of_another_model"])
def test_instance_as_lookup_value_raises_like_get(value: str) -> None:
    def make() -> models.Model:
        return Tenant(name="x") if value == "unsaved_tenant" else OwnerFactory()

    owner_or_tenant = make()
    expected = assert_same(
        lambda: Account.objects.get_cached(tenant=owner_or_tenant, email="e"),
        lambda: Account.objects.get(tenant=owner_or_tenant, email="e"),
        f"tenant={value}",
    )
    assert expected == ("raises", "ValueError")


# -- 17. update() on annotated / distinct querysets under concurrency ------------------------


@pytest.mark.parametrize("variant", ["annotate", "distinct"])
def test_queryset_update_on_annotated_or_distinct_queryset_keeps_concurrent_increments(
    variant: str,
) -> None:
    acc = AccountFactory(balance=0)
    Account.objects.get_cached(pk=acc.pk)
    barrier = threading.Barrier(2)
    errors: list[Any] = []

    def qs() -> Any:
        if variant == "annotate":
            return Account.objects.annotate(x=F("balance")).filter(pk=acc.pk)
        return Account.objects.filter(pk=acc.pk).distinct()

    def worker() -> None:
        try:
            barrier.wait(10)
            for _ in range(5):
                qs().update(balance=F("balance") + 1)
        except Exception as exc:
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [], f"update() failed: {errors}"
    final = Account.objects.get(pk=acc.pk).balance
    assert final == 10, f"{10 - final} of 10 concurrent increments were lost ({variant})"
    for tier in TIERS:
        at(tier)
        assert_same(
            lambda: Account.objects.get_cached(pk=acc.pk),
            lambda: Account.objects.get(pk=acc.pk),
            f"after the concurrent increments ({variant}), {tier}",
        )


# -- 18. snapshot isolation ------------------------------------------------------------------


@SNAPSHOT_DB
@pytest.mark.parametrize("tier", TIERS)
def test_repeatable_read_transaction_reads_its_snapshot_and_leaves_no_trace(tier: str) -> None:
    t = TenantFactory(name="old")
    snap = Tenant.objects.db_manager("snapshot")
    Tenant.objects.get_cached(pk=t.pk)
    snap.get_cached(pk=t.pk)

    def rename() -> None:
        obj = Tenant.objects.get(pk=t.pk)
        obj.name = "new"
        obj.save()

    def create() -> int:
        return Tenant.objects.create(name="created-after-snapshot").pk

    with transaction.atomic(using="snapshot"):
        assert snap.get(pk=t.pk).name == "old"  # the snapshot is taken here
        result = in_thread(rename)
        assert not isinstance(result, Exception), f"the other thread failed: {result!r}"
        new_pk = in_thread(create)
        assert isinstance(new_pk, int), f"the other thread failed: {new_pk!r}"
        at(tier)
        expected = assert_same(
            lambda: snap.get_cached(pk=t.pk),
            lambda: snap.get(pk=t.pk),
            "inside the REPEATABLE READ block, after another connection committed a rename",
        )
        assert expected[1][2]["name"] == "old"
        at(tier)
        expected = assert_same(
            lambda: snap.get_cached(pk=new_pk),
            lambda: snap.get(pk=new_pk),
            "inside the REPEATABLE READ block, a row created after the snapshot",
        )
        assert expected == ("raises", "Tenant.DoesNotExist")
    for alias in ("default", "snapshot"):
        for pk in (t.pk, new_pk):
            at(tier)
            assert_same(
                lambda a=alias, p=pk: Tenant.objects.db_manager(a).get_cached(pk=p),
                lambda a=alias, p=pk: Tenant.objects.db_manager(a).get(pk=p),
                f"Tenant pk={pk} on {alias!r} after the REPEATABLE READ block",
            )
    elsewhere = in_thread(lambda: Tenant.objects.get_cached(pk=t.pk).name)
    assert elsewhere == "new", f"another thread read {elsewhere!r} after the block, not 'new'"


# Snapshot isolation and transactions asked for in SQL rather than in settings or atomic():
# (the statements opening the block, the statements closing it).
SQL_TRANSACTIONS = {
    "set transaction in atomic": (["SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"], []),
    "begin isolation level": (["BEGIN ISOLATION LEVEL SERIALIZABLE"], ["COMMIT"]),
    "start transaction then set": (
        ["START TRANSACTION", "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"],
        ["END"],
    ),
    "session characteristics": (
        ["SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ", "BEGIN"],
        ["COMMIT", "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED"],
    ),
    "session default": (
        ["SET default_transaction_isolation = 'serializable'", "BEGIN"],
        ["COMMIT", "RESET default_transaction_isolation"],
    ),
    "transaction_isolation in sql transaction": (
        ["/* tag */ BEGIN", "SET transaction_isolation = 'serializable'"],
        ["COMMIT"],
    ),
    "set local after a comment": (
        ["-- a comment\nSET LOCAL transaction_isolation TO 'repeatable read'"],
        [],
    ),
    # The session's level stays REPEATABLE READ: the SET that would change it rolled back.
    "session set rolled back": (
        [
            "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ",
            "BEGIN; SET default_transaction_isolation = 'read committed'; ROLLBACK",
            "BEGIN",
        ],
        ["COMMIT", "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED"],
    ),
}


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("how", list(SQL_TRANSACTIONS))
def test_snapshot_isolation_asked_for_in_sql_reads_its_snapshot_and_leaves_no_trace(
    tier: str, how: str
) -> None:
    """The alias's settings say READ COMMITTED; a statement says otherwise."""
    opening, closing = SQL_TRANSACTIONS[how]
    t = TenantFactory(name="old")
    Tenant.objects.get_cached(pk=t.pk)

    def rename() -> None:
        Tenant.objects.filter(pk=t.pk).update(name="new")

    with transaction.atomic() if not closing else contextlib.nullcontext():
        with connection.cursor() as cursor:
            for statement in opening:
                cursor.execute(statement)
        try:
            assert Tenant.objects.get(pk=t.pk).name == "old"  # the snapshot is taken here
            result = in_thread(rename)
            assert not isinstance(result, Exception), f"the other thread failed: {result!r}"
            at(tier)
            expected = assert_same(
                lambda: Tenant.objects.get_cached(pk=t.pk),
                lambda: Tenant.objects.get(pk=t.pk),
                f"inside the block ({how}), after another connection committed a rename",
            )
            assert expected[1][2]["name"] == "old"
        finally:
            with connection.cursor() as cursor:
                for statement in closing:
                    cursor.execute(statement)
    at(tier)
    assert_same(
        lambda: Tenant.objects.get_cached(pk=t.pk),
        lambda: Tenant.objects.get(pk=t.pk),
        f"after the block ({how})",
    )
    assert in_thread(lambda: Tenant.objects.get_cached(pk=t.pk).name) == "new"


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("begin", ["BEGIN", "/* tag */ begin", "-- c\nSTART TRANSACTION"])
@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK", "SELECT 1; COMMIT"])
def test_a_transaction_begun_in_sql_invalidates_at_its_commit(
    tier: str, begin: str, end: str
) -> None:
    """BEGIN through a cursor in autocommit: Django does not know of the transaction, whose
    writes are still uncommitted (a read must not store them) until its COMMIT (when a row
    another connection stored meanwhile must be dropped)."""
    t = TenantFactory(name="old")
    Tenant.objects.get_cached(pk=t.pk)
    with connection.cursor() as cursor:
        cursor.execute(begin)
        try:
            Tenant.objects.filter(pk=t.pk).update(name="new")
            at(tier)
            assert_same(
                lambda: Tenant.objects.get_cached(pk=t.pk),
                lambda: Tenant.objects.get(pk=t.pk),
                "inside the SQL transaction, after its update",
            )
            # Another connection stores the committed row meanwhile.
            tiered_cache.clear_local()
            assert in_thread(lambda: Tenant.objects.get_cached(pk=t.pk).name) == "old"
        finally:
            cursor.execute(end)
    at(tier)
    expected = assert_same(
        lambda: Tenant.objects.get_cached(pk=t.pk),
        lambda: Tenant.objects.get(pk=t.pk),
        f"after the SQL transaction's {end}",
    )
    assert expected[1][2]["name"] == ("old" if end == "ROLLBACK" else "new")
    assert in_thread(lambda: Tenant.objects.get_cached(pk=t.pk).name) == expected[1][2]["name"]


def test_sql_transaction_control_in_other_forms() -> None:
    """What ends, or seems to begin, a transaction in SQL is what the server says it is."""
    from django.db import DatabaseError

    t = TenantFactory(name="old")

    def served_elsewhere() -> str:
        return str(in_thread(lambda: Tenant.objects.get_cached(pk=t.pk).name))

    def rename(name: str) -> None:
        Tenant.objects.filter(pk=t.pk).update(name=name)

    with connection.cursor() as cursor:
        # A BEGIN that fails, or one Django's own commit() ends, leaves autocommit: a
        # write after it is dropped at once, not held for a COMMIT that never comes.
        with pytest.raises(DatabaseError):
            cursor.execute("BEGIN ISOLATION LEVEL BOGUS")
        assert served_elsewhere() == "old"
        rename("a")
        assert served_elsewhere() == "a"
        cursor.execute("BEGIN")
        transaction.commit()
        rename("b")
        assert served_elsewhere() == "b"
        # The write and its COMMIT in one execute.
        cursor.execute("BEGIN")
        cursor.execute(f"UPDATE testapp_tenant SET name = 'c' WHERE id = {t.pk}; COMMIT")
        assert served_elsewhere() == "c"
        # Rolling back to a savepoint (in a spelling Django does not use) ends nothing.
        cursor.execute("BEGIN")
        rename("d")
        cursor.execute("SAVEPOINT s")
        cursor.execute("ROLLBACK TRANSACTION TO s")
        tiered_cache.clear_local()
        assert served_elsewhere() == "c"  # stored by another connection meanwhile
        cursor.execute("COMMIT")
        assert served_elsewhere() == "d"
        # A commit and a new transaction in one execute: the write before it is committed.
        cursor.execute(
            f"BEGIN; UPDATE testapp_tenant SET name = 'e' WHERE id = {t.pk}; COMMIT; BEGIN"
        )
        try:
            assert served_elsewhere() == "e"
        finally:
            cursor.execute("ROLLBACK")
    # A COMMIT written as SQL while Django holds autocommit off: the write is committed,
    # whatever Django does next.
    transaction.set_autocommit(False)
    try:
        rename("f")
        with connection.cursor() as cursor:
            cursor.execute("COMMIT")
        assert served_elsewhere() == "f"
        transaction.rollback()
    finally:
        transaction.set_autocommit(True)
    assert served_elsewhere() == "f"


def test_a_read_in_an_aborted_transaction_raises_as_the_orms_does() -> None:
    """After a statement named an isolation level, the level is asked of the server; in a
    transaction an error aborted, the read raises Django's error, as .get() does."""
    from django.db import DatabaseError

    t = TenantFactory(name="old")
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
            with pytest.raises(DatabaseError):
                cursor.execute("SELECT 1/0")
        assert_same(
            lambda: Tenant.objects.get_cached(pk=t.pk),
            lambda: Tenant.objects.get(pk=t.pk),
            "in a transaction an error aborted",
        )
        transaction.set_rollback(True)


@pytest.mark.parametrize("tier", ["l1", "l2"])
@pytest.mark.parametrize(
    "how", ["caught_error", "inner_atomic_error", "integrity_error", "set_rollback"]
)
def test_a_read_in_a_transaction_an_error_broke_raises_as_the_orms_does(
    tier: str, how: str
) -> None:
    """Inside atomic(), once a caught database error aborted the transaction, or Django
    marked it for rollback (an error through an inner block or a create(), or
    set_rollback(True)), the ORM's read raises; so must get_cached() and get_many_cached(),
    from either tier. (The common "catch IntegrityError and carry on" pattern.)"""
    from django.db import DatabaseError, IntegrityError

    from tests.testapp.models import Label

    t = TenantFactory(name="old")
    Label.objects.create(name="dup")
    Tenant.objects.get_cached(pk=t.pk)
    at(tier)
    with transaction.atomic():
        if how == "caught_error":
            with pytest.raises(DatabaseError), connection.cursor() as cursor:
                cursor.execute("SELECT 1/0")
        elif how == "integrity_error":
            with pytest.raises(IntegrityError):
                Label.objects.create(name="dup")
        elif how == "inner_atomic_error":
            with pytest.raises(IntegrityError), transaction.atomic(savepoint=False):
                Label.objects.create(name="dup")
        else:
            transaction.set_rollback(True)
        assert_same(
            lambda: Tenant.objects.get_cached(pk=t.pk),
            lambda: Tenant.objects.get(pk=t.pk),
            f"in a transaction broken by {how}",
        )
        assert_same(
            lambda: Tenant.objects.get_many_cached([t.pk]),
            lambda: Tenant.objects.in_bulk([t.pk]),
            f"many in a transaction broken by {how}",
        )
        transaction.set_rollback(True)
    # A savepoint rolled back to mends the transaction: the tiers serve again.
    with transaction.atomic():
        with pytest.raises(IntegrityError), transaction.atomic():
            Label.objects.create(name="dup")
        before = registry.model_cache(Tenant.objects).counters.as_dict()["bypassed"]
        assert Tenant.objects.get_cached(pk=t.pk).name == "old"
        assert registry.model_cache(Tenant.objects).counters.as_dict()["bypassed"] == before


def test_an_alias_whose_session_default_is_a_snapshot_level_is_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tiered_cache.transactions import forget_databases, snapshot_aliases

    db = settings.DATABASES["default"]
    for alias, given in (
        ("rr", "-c default_transaction_isolation=repeatable\\ read"),
        ("ser", "--default-transaction-isolation=serializable"),
        ("rc", "-c default_transaction_isolation=read\\ committed"),
    ):
        monkeypatch.setitem(settings.DATABASES, alias, {**db, "OPTIONS": {"options": given}})
    forget_databases()
    try:
        assert {"rr", "ser"} <= snapshot_aliases() and "rc" not in snapshot_aliases()
    finally:
        forget_databases()


# -- 19. composite primary keys ----------------------------------------------------------------


def test_cached_manager_on_a_composite_primary_key_is_a_check_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from django.apps import apps as global_apps

    from tiered_cache import CachedManager
    from tiered_cache import checks as tc_checks

    with isolate_apps("tests.testapp"):

        class CachedShipment(models.Model):
            pk = models.CompositePrimaryKey("tenant_code", "number")
            tenant_code = models.CharField(max_length=20)
            number = models.IntegerField()

            objects = CachedManager()

            class Meta:
                app_label = "testapp"

        # System checks walk the global app registry; make it list the isolated model too.
        real_get_models = global_apps.get_models

        def get_models(*args: Any, **kwargs: Any) -> list[type[models.Model]]:
            return [*real_get_models(*args, **kwargs), CachedShipment]

        monkeypatch.setattr(global_apps, "get_models", get_models)
        messages = list(tc_checks.check_lookups())
        messages += [m for m in checks.run_checks() if m not in messages]
        monkeypatch.undo()

    found = [
        m
        for m in messages
        if (m.id or "").startswith("tiered_cache.")
        and m.is_serious()
        and "composite" in m.msg.lower()
    ]
    assert found, (
        "no tiered_cache Error about the composite primary key of a model with a "
        f"CachedManager; tiered_cache messages: "
        f"{[(m.id, m.msg) for m in messages if (m.id or '').startswith('tiered_cache')]}"
    )


# -- 20. warmup's limit --------------------------------------------------------------------------


def test_warmup_task_takes_a_numeric_string_limit() -> None:
    from tiered_cache.tasks import warmup

    TenantFactory.create_batch(5)
    try:
        result = warmup.run("testapp.tenant", limit="3")
    except (ValueError, TypeError) as exc:
        assert "limit" in str(exc), f"warmup(limit='3') failed without naming 'limit': {exc!r}"
        return
    assert isinstance(result, dict) and "stored" in result, f"unexpected result {result!r}"
    assert result["stored"] <= 3, f"warmup(limit='3') stored {result['stored']} rows"


# -- 21. a manager's filter, as the database runs it -----------------------------------------


def _loaded(obj: Any) -> tuple[Any, Any]:
    """What an instance came with besides its row: related objects and prefetched sets."""
    if not isinstance(obj, models.Model):
        return obj, None
    return sorted(obj._state.fields_cache), sorted(getattr(obj, "_prefetched_objects_cache", {}))


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_managers_filter_that_str_does_not_show_whole_keeps_its_scopes_apart(tier: str) -> None:
    """A filter on a JSON key chosen at run time, and on an hour in the active time zone:
    str(where) shows neither the key's name nor the zone, the SQL does. One scope's row
    (or its absence) is never served to another."""
    import contextvars
    from datetime import UTC, datetime

    key = contextvars.ContextVar("key", default="a")

    class ByKey(tiered_cache.CachedManager):
        def get_queryset(self) -> Any:
            return super().get_queryset().filter(**{f"grants__{key.get()}": True})

    class Morning(tiered_cache.CachedManager):
        def get_queryset(self) -> Any:
            return super().get_queryset().filter(at__hour__lt=12)

    class Grant(models.Model):
        grants = models.JSONField(default=dict)
        at = models.DateTimeField()
        objects = tiered_cache.CachedManager()
        visible = ByKey()
        morning = Morning()

        class Meta:
            app_label = "testapp"

    with installed(Grant):
        g = Grant.objects.create(grants={"a": True}, at=datetime(2024, 1, 1, 10, 30, tzinfo=UTC))
        for first, then in [("a", "b"), ("b", "a")]:
            tiered_cache.clear_local()
            key.set(first)
            outcome(lambda: Grant.visible.get_cached(pk=g.pk))
            key.set(then)
            at(tier)
            assert_same(
                lambda: Grant.visible.get_cached(pk=g.pk),
                lambda: Grant.visible.get(pk=g.pk),
                f"by key {then!r} after a read by key {first!r}",
            )
        for first, then in [("UTC", "Asia/Tokyo"), ("Asia/Tokyo", "UTC")]:
            tiered_cache.clear_local()
            with timezone.override(first):
                outcome(lambda: Grant.morning.get_cached(pk=g.pk))
            at(tier)
            with timezone.override(then):
                assert_same(
                    lambda: Grant.morning.get_cached(pk=g.pk),
                    lambda: Grant.morning.get(pk=g.pk),
                    f"at__hour__lt=12 under {then} after a read under {first}",
                )


class _Adapted:
    """A value as a custom field may hand the driver (as PostGIS's adapters are): its repr
    shows its address, which the next such object may take."""

    __slots__ = ("value",)

    def __init__(self, value: str) -> None:
        self.value = value


class _AdaptedDumper(Dumper):
    oid = psycopg.adapters.types["text"].oid

    def dump(self, obj: Any) -> bytes:
        return str(obj.value).encode()


psycopg.adapters.register_dumper(_Adapted, _AdaptedDumper)


class _AdaptedField(models.CharField):
    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        value = super().get_db_prep_value(value, connection, prepared)
        return None if value is None else _Adapted(value)


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_managers_filter_by_a_value_that_cannot_be_keyed_reads_the_database(tier: str) -> None:
    """A parameter whose repr shows no value (an adapter object) cannot tell two scopes
    apart: such a manager's reads go to the database."""
    wanted = {"code": "a"}

    class ByCode(tiered_cache.CachedManager):
        def get_queryset(self) -> Any:
            return super().get_queryset().filter(code=wanted["code"])

    class Coded(models.Model):
        code = _AdaptedField(max_length=10)
        name = models.CharField(max_length=10, unique=True)
        objects = ByCode(lookups=["name"])

        class Meta:
            app_label = "testapp"

    with installed(Coded):
        Coded.objects.create(code="a", name="n1")
        Coded.objects.create(code="b", name="n2")
        for _ in range(3):
            for code in ("a", "b"):
                wanted["code"] = code
                for name in ("n1", "n2"):
                    at(tier)
                    assert_same(
                        lambda n=name: Coded.objects.get_cached(name=n),
                        lambda n=name: Coded.objects.get(name=n),
                        f"code {code!r}, name {name!r}",
                    )


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_manager_that_selects_or_prefetches_related_rows_reads_as_the_orm_does(
    tier: str,
) -> None:
    """Its instances come with their related objects, and select_related()'s inner join
    drops a row whose related row is gone (no constraint): such reads are the database's."""

    class Org(models.Model):
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    class Joined(tiered_cache.CachedManager):
        def get_queryset(self) -> Any:
            return super().get_queryset().select_related("org", "loose")

    class Prefetched(tiered_cache.CachedManager):
        def get_queryset(self) -> Any:
            return super().get_queryset().prefetch_related("org__members")

    class Member(models.Model):
        org = models.ForeignKey(Org, on_delete=models.CASCADE, related_name="members")
        loose = models.ForeignKey(
            Org, on_delete=models.DO_NOTHING, db_constraint=False, related_name="+"
        )
        objects = tiered_cache.CachedManager()
        joined = Joined()
        prefetched = Prefetched()

        class Meta:
            app_label = "testapp"

    with installed(Org, Member):
        org, gone = Org.objects.create(), Org.objects.create()
        member = Member.objects.create(org=org, loose=gone)
        for manager in (Member.joined, Member.prefetched):
            for _ in range(2):
                at(tier)
                assert_same(
                    lambda m=manager: _loaded(m.get_cached(pk=member.pk)),
                    lambda m=manager: _loaded(m.get(pk=member.pk)),
                    f"Member.{manager.name}",
                )
        Member.joined.get_cached(pk=member.pk)
        Org.objects.filter(pk=gone.pk).delete()
        at(tier)
        assert_same(
            lambda: Member.joined.get_cached(pk=member.pk),
            lambda: Member.joined.get(pk=member.pk),
            "Member.joined once the row its inner join needs is gone",
        )


# -- 22. keys the database compares otherwise than Python ------------------------------------


@contextmanager
def installed(*made: type[models.Model]) -> Iterator[None]:
    """Tables for models made in a test, and the models known to the write capture (which
    maps tables from the app registry) as an installed model's are."""
    from django.apps import apps

    from tiered_cache import capture

    with connection.schema_editor() as editor:
        for m in made:
            editor.create_model(m)
    for m in made:
        apps.all_models[m._meta.app_label][m._meta.model_name] = m
    apps.clear_cache()
    capture.forget()
    try:
        for m in made:
            _cold(m)
        yield
    finally:
        with connection.schema_editor() as editor:  # seen: what the tables held is dropped
            for m in reversed(made):
                editor.delete_model(m)
        for m in made:
            apps.all_models[m._meta.app_label].pop(m._meta.model_name, None)
        apps.clear_cache()
        capture.forget()


class _PaddedChar(models.CharField):
    def db_type(self, connection: Any) -> str:
        return f"char({self.max_length})"


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_keys_the_database_finds_equal_in_other_spellings_read_as_the_orm(tier: str) -> None:
    """A pk and a to_field under a collation that ignores case, a datetime pk, a char(n) pk:
    a write may name a row by another spelling of its key ("BOB", another zone, no padding),
    and a row's foreign key may spell the key it points at otherwise. The database finds
    them equal; the cache must drop the row, and find the row the relation's."""
    from datetime import UTC, datetime
    from zoneinfo import ZoneInfo

    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE COLLATION IF NOT EXISTS tc_ci (provider = icu, locale = 'und-u-ks-level2', "
            "deterministic = false)"
        )

    class Handle(models.Model):
        name = models.CharField(max_length=20, primary_key=True, db_collation="tc_ci")
        code = models.CharField(max_length=20, unique=True, db_collation="tc_ci")
        note = models.CharField(max_length=20, default="")
        objects = tiered_cache.CachedManager(lookups=["code"])

        class Meta:
            app_label = "testapp"

    class Post(models.Model):
        handle = models.ForeignKey(Handle, on_delete=models.CASCADE, related_name="posts")
        by_code = models.ForeignKey(
            Handle, to_field="code", on_delete=models.CASCADE, related_name="posts_by_code"
        )
        slug = models.CharField(max_length=20, unique=True)
        objects = tiered_cache.CachedManager(lookups=["slug"])

        class Meta:
            app_label = "testapp"

    class Slot(models.Model):
        at = models.DateTimeField(primary_key=True)
        note = models.CharField(max_length=20, default="")
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    class Fixed(models.Model):
        code = _PaddedChar(max_length=6, primary_key=True)
        note = models.CharField(max_length=20, default="")
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    with installed(Handle, Post, Slot, Fixed):
        handle = Handle.objects.create(name="bob", code="c1", note="old")
        post = Post.objects.create(handle_id="BOB", by_code_id="C1", slug="s1")
        noon = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
        Slot.objects.create(at=noon, note="old")
        Fixed.objects.create(code="ab", note="old")
        padded = Fixed.objects.get().pk
        built = Handle(name="BoB", code="c1")
        reads = [
            (Handle.objects, {"pk": "bob"}),
            (Handle.objects, {"code": "c1"}),
            (Handle.objects, {"code": "C1"}),
            (Slot.objects, {"pk": noon}),
            (Fixed.objects, {"pk": padded}),
            (Fixed.objects, {"pk": "ab"}),
            *[(h.posts, {"slug": "s1"}) for h in (handle, built)],
            *[(h.posts, {"pk": post.pk}) for h in (handle, built)],
            *[(h.posts_by_code, {"slug": "s1"}) for h in (handle, built)],
        ]

        def same(when: str) -> None:
            for manager, lookup in reads:
                at(tier)
                assert_same(
                    lambda m=manager, lk=lookup: m.get_cached(**lk),
                    lambda m=manager, lk=lookup: m.get(**lk),
                    f"{manager.model.__name__} {lookup} {when}",
                )
            for manager, pks in [(Handle.objects, ["bob"]), (handle.posts, [post.pk])]:
                at(tier)
                assert_same(
                    lambda m=manager, p=pks: m.get_many_cached(p),
                    lambda m=manager, p=pks: m.in_bulk(p),
                    f"{manager.model.__name__} many {pks} {when}",
                )

        same("before")
        Handle.objects.filter(pk="BOB").update(note="new")
        Slot.objects.filter(pk=noon.astimezone(ZoneInfo("Europe/Paris"))).update(note="new")
        Fixed.objects.filter(pk="ab").update(note="new")
        same("after updates that spell the keys otherwise")
        Handle(name="BOB", code="c1", note="newer").save()
        Handle.objects.bulk_update([Handle(name="BOB", code="c1", note="newest")], ["note"])
        Handle.objects.invalidate("BOB")
        same("after a save and a bulk_update by another spelling")
        Handle.objects.filter(pk="BOB").delete()
        same("after a delete by another spelling")


def test_a_key_field_that_converts_as_its_base_counts_as_it() -> None:
    """A write to a row drops that row only, not its whole model, when the database compares
    its key as Python does; a subclass that changes nothing of that counts as its base."""
    from tiered_cache.keys import equal_as_in_python

    class Id(models.BigAutoField):
        pass

    class Slug(models.CharField):
        pass

    class Hashed(models.CharField):
        def get_prep_value(self, value: Any) -> Any:
            return super().get_prep_value(value).upper()

    assert equal_as_in_python(Id(primary_key=True), "postgresql")
    assert equal_as_in_python(Slug(max_length=5), "postgresql")
    assert not equal_as_in_python(Slug(max_length=5), "mysql")
    assert not equal_as_in_python(Slug(max_length=5, db_collation="tc_ci"), "postgresql")
    assert not equal_as_in_python(Hashed(max_length=5), "postgresql")
    assert not equal_as_in_python(_PaddedChar(max_length=5), "postgresql")
    assert not equal_as_in_python(models.DateTimeField(), "postgresql")


# -- odd primary keys ------------------------------------------------------------------------------


def _make(model: type[models.Model]) -> models.Model:
    if model is Account:
        return AccountFactory()
    if model is Document:
        return DocumentFactory()
    if model is Code:
        return CodeFactory(code="1")
    if model is Gadget:
        return GadgetFactory()
    raise AssertionError(model)


@pytest.mark.parametrize("model", [Account, Document, Code, Gadget], ids=lambda m: m.__name__)
def test_string_and_native_pk_share_one_entry(model: type[models.Model]) -> None:
    obj = _make(model)
    native = 1 if model is Code else obj.pk  # Code's pk is the string "1"
    spellings: list[dict[str, Any]] = [{"pk": native}, {"pk": str(obj.pk)}]
    if model is Gadget:
        spellings += [{"gadget_no": obj.pk}, {"gadget_no": str(obj.pk)}]
    if model is Document:
        spellings += [{"id": obj.pk}, {"pk": str(obj.pk).upper()}]
    first = spellings[0]
    assert_same(
        lambda: model.objects.get_cached(**first),
        lambda: model.objects.get(**first),
        f"{model.__name__} {first}",
    )
    for kwargs in spellings[1:]:
        expected = outcome(lambda k=kwargs: model.objects.get(**k))
        with CaptureQueriesContext(connection) as queries:
            got = outcome(lambda k=kwargs: model.objects.get_cached(**k))
        assert got == expected, (
            f"{model.__name__} {kwargs}: get_cached() answered {got!r} but .get() answered "
            f"{expected!r}"
        )
        assert len(queries) == 0, (
            f"{model.__name__}.objects.get_cached(**{kwargs}) ran {len(queries)} queries "
            f"after get_cached(**{first}): the spellings do not share one entry"
        )


# (model, lookup, what .get() raises for it: the oracle, checked too)
MALFORMED = [
    (Account, {"pk": "abc"}, "ValueError"),
    (Gadget, {"pk": "abc"}, "ValueError"),
    (Gadget, {"gadget_no": "abc"}, "ValueError"),
    (Document, {"pk": "not-a-uuid"}, "ValidationError"),
    (Document, {"pk": 12}, "Document.DoesNotExist"),  # UUID(int=12): valid, no such row
    (Code, {"pk": None}, "Code.DoesNotExist"),
]


@pytest.mark.parametrize(
    ("model", "kwargs", "raises"),
    MALFORMED,
    ids=[f"{m.__name__}-" + ",".join(f"{k}={v}" for k, v in kw.items()) for m, kw, _ in MALFORMED],
)
def test_malformed_pk_raises_what_get_raises(
    model: type[models.Model], kwargs: dict[str, Any], raises: str
) -> None:
    _make(model)
    for attempt in ("first", "second"):  # the second one must not be served from a tier
        expected = assert_same(
            lambda: model.objects.get_cached(**kwargs),
            lambda: model.objects.get(**kwargs),
            f"{model.__name__}.objects.get_cached(**{kwargs}), {attempt} call",
        )
        assert expected == ("raises", raises)


# -- the abstract base carrying the manager --------------------------------------------------


@pytest.mark.parametrize("tier", TIERS)
def test_manager_inherited_from_an_abstract_base_reads_like_get(tier: str) -> None:
    note = NoteFactory(text="old")
    Note.objects.get_cached(pk=note.pk)
    note.text = "new"
    note.save()
    at(tier)
    assert_same(
        lambda: Note.objects.get_cached(pk=note.pk),
        lambda: Note.objects.get(pk=note.pk),
        "Note after save()",
    )


@pytest.mark.parametrize("tier", TIERS)
def test_a_model_overriding_from_db_gets_the_field_names_as_from_the_orm(tier: str) -> None:
    row = Tracked.objects.create(name="tracked")
    expected = Tracked.objects.get(pk=row.pk).loaded_values
    assert expected == {"id": row.pk, "name": "tracked"}
    Tracked.objects.get_cached(pk=row.pk)  # a miss: built by the ORM
    at(tier)
    assert Tracked.objects.get_cached(pk=row.pk).loaded_values == expected


def test_a_lookup_by_none_answers_as_the_orm_however_many_rows_hold_null() -> None:
    """NULL equals no other NULL, so a nullable unique field may hold it in many rows:
    get_cached(code=None) answers as get(code=None) does, from the database, and stores
    nothing (an entry would go on serving one row once a second one holds NULL)."""
    from tiered_cache.registry import model_cache

    counters = model_cache(Badge.objects).counters
    bypassed = counters.bypassed
    with pytest.raises(Badge.DoesNotExist):
        Badge.objects.get_cached(code=None)
    first = Badge.objects.create(code=None)
    assert Badge.objects.get_cached(code=None) == first
    Badge.objects.create(code=None)
    with pytest.raises(Badge.MultipleObjectsReturned):
        Badge.objects.get_cached(code=None)
    assert counters.bypassed == bypassed + 3
    # A value is unique: cached as usual.
    coded = Badge.objects.create(code="gold")
    assert Badge.objects.get_cached(code="gold") == coded
    assert Badge.objects.get_cached(code="gold") == coded
    assert counters.bypassed == bypassed + 3


# -- lookup values: what the ORM compares, keyed injectively --------------------------------


def _check_lookups(model: Any, name: str, values: list[Any], tier: str) -> None:
    for value in values:
        at(tier)
        assert_same(
            lambda v=value: model.objects.get_cached(**{name: v}),
            lambda v=value: model.objects.get(**{name: v}),
            f"{model.__name__}.{name}={value!r}",
        )


class _SentAsText(models.Field):  # type: ignore[type-arg]
    """A field that leaves a value as given until it goes to the database, as text: the
    exact lookup sends get_db_prep_value(prepared=True), so 1, True and 1.0 are '1',
    'True' and '1.0'."""

    def db_type(self, connection: Any) -> str:
        return "text"

    def get_db_prep_value(self, value: Any, connection: Any, prepared: bool = False) -> Any:
        return None if value is None else str(value)


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_values_python_finds_equal_and_the_database_does_not_are_other_entries(
    tier: str,
) -> None:
    """L1's keys compare by Python's equality: a datetime and its fold (one wall time, two
    instants), aware times of one instant in two zones (timetz compares the zone too), and
    1, True and 1.0 of a field that sends each as it is, are other rows to the database,
    and each reads its own row or absence in either order."""
    from datetime import UTC, datetime, time
    from datetime import timezone as dt_timezone
    from zoneinfo import ZoneInfo

    new_york = ZoneInfo("America/New_York")

    class Stamp(models.Model):
        at = models.DateTimeField(unique=True)
        t = models.TimeField(unique=True, null=True)
        code = _SentAsText(unique=True, null=True)
        objects = tiered_cache.CachedManager(lookups=["at", "t", "code"])

        class Meta:
            app_label = "testapp"

    first = datetime(2024, 11, 3, 1, 30, tzinfo=new_york)  # EDT, -04:00
    second = first.replace(fold=1)  # EST, -05:00
    utc = time(1, 0, tzinfo=UTC)
    plus_one = time(2, 0, tzinfo=dt_timezone(timedelta(hours=1)))
    assert first == second and utc == plus_one  # to Python
    with installed(Stamp):
        Stamp.objects.create(at=first, t=time(1, 0), code="1")
        Stamp.objects.create(at=first + timedelta(days=1), code="1.0")
        _check_lookups(Stamp, "at", [first, second, first, second], tier)
        _check_lookups(Stamp, "t", [utc, plus_one, utc, plus_one], tier)
        for order in ([1, True, 1.0], [True, 1, 1.0], [1.0, 1, True]):
            Stamp.objects.flush_cache()
            _check_lookups(Stamp, "code", order + order, tier)
        pks = list(Stamp.objects.values_list("pk", flat=True))
        at(tier)
        assert_same(
            lambda: sorted(Stamp.objects.get_many_cached(pks)),
            lambda: sorted(Stamp.objects.in_bulk(pks)),
            "get_many_cached after them",
        )


class _Lowered(str):
    """A str whose psycopg dumper sends it lowercased: the database compares 'a' for
    _Lowered("A")."""


class _LoweredDumper(Dumper):
    oid = psycopg.adapters.types["text"].oid

    def dump(self, obj: Any) -> bytes:
        return str.lower(obj).encode()


psycopg.adapters.register_dumper(_Lowered, _LoweredDumper)


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_value_whose_class_the_driver_adapts_otherwise_is_the_databases(tier: str) -> None:
    """A str subclass with a dumper of its own is sent as something else than its text:
    a lookup by it reads the database, and a write whose pk is one drops its model (the
    row it names is not known)."""

    class Named(models.Model):
        name = models.CharField(max_length=20, primary_key=True)
        note = models.CharField(max_length=20, default="")
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    with installed(Named):
        Named.objects.create(name="a")
        Named.objects.create(name="A")
        _check_lookups(Named, "pk", ["A", _Lowered("A"), "A", _Lowered("A")], tier)
        _check_lookups(Named, "pk", ["a", "A"], tier)  # both rows in the tiers
        Named.objects.filter(pk=_Lowered("A")).update(note="written")  # row 'a'
        assert Named.objects.get(pk="a").note == "written"
        _check_lookups(Named, "pk", ["a", "A"], tier)

    class Tag(models.Model):
        named = models.ForeignKey(Named, models.CASCADE, related_name="tags")
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    with installed(Named, Tag):
        # An instance whose pk is the subclass: the related manager filters by 'a'.
        parent = Named.objects.create(name=_Lowered("A"))
        tag = Tag.objects.create(named=parent)
        for _ in range(2):
            at(tier)
            assert_same(
                lambda: parent.tags.get_cached(pk=tag.pk),
                lambda: parent.tags.get(pk=tag.pk),
                "parent.tags",
            )
            at(tier)
            assert_same(
                lambda: sorted(parent.tags.get_many_cached([tag.pk])),
                lambda: sorted(parent.tags.in_bulk([tag.pk])),
                "parent.tags, many",
            )


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_invalidate_by_a_pk_the_driver_adapts_otherwise_drops_the_row_it_names(
    tier: str,
) -> None:
    """invalidate() of a pk whose class psycopg sends as another value (_Lowered("A") is
    'a'): the row it names is not known, so the model drops, as a write bounded by one
    drops it."""

    class Keyed(models.Model):
        name = models.CharField(max_length=20, primary_key=True)
        note = models.CharField(max_length=20, default="")
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    with installed(Keyed):
        Keyed.objects.create(name="a")
        _check_lookups(Keyed, "pk", ["a"], tier)  # in the tiers
        with connection.cursor() as c:  # a write outside what the cache watches
            c.connection.execute("UPDATE testapp_keyed SET note = 'outside' WHERE name = 'a'")
        Keyed.objects.invalidate(_Lowered("A"))
        _check_lookups(Keyed, "pk", ["a"], tier)


class _UpperExact(Exact):
    """An exact lookup that ignores case, registered by a project on its own field."""

    def as_sql(self, compiler: Any, connection: Any) -> Any:
        lhs, lhs_params = self.process_lhs(compiler, connection)
        rhs, rhs_params = self.process_rhs(compiler, connection)
        return f"UPPER({lhs}) = UPPER({rhs})", [*lhs_params, *rhs_params]


class _CaselessChar(models.CharField):  # type: ignore[type-arg]
    pass


_CaselessChar.register_lookup(_UpperExact)


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_lookup_through_an_exact_lookup_of_the_projects_is_the_databases(tier: str) -> None:
    """An exact lookup registered by the project may match several rows of a unique
    column ('a' and 'A' without case): such a lookup is not unique, its reads are the
    database's, and system check W001 says why."""
    from tiered_cache.checks import check_manager

    class Handle(models.Model):
        name = _CaselessChar(max_length=20, unique=True)
        objects = tiered_cache.CachedManager(lookups=["name"])

        class Meta:
            app_label = "testapp"

    named_exact = models.CharField(max_length=20, unique=True)
    named_exact.register_lookup(IExact, lookup_name="exact")  # Django's class, not equality
    output = models.CharField(max_length=20)
    output.register_lookup(_UpperExact)  # on the output field the ORM reads the column as

    class Other(models.Model):
        name = named_exact
        objects = tiered_cache.CachedManager(lookups=["name"])

        class Meta:
            app_label = "testapp"

    class Generated(models.Model):
        raw = models.CharField(max_length=20)
        name = models.GeneratedField(
            expression=F("raw"), output_field=output, db_persist=True, unique=True
        )
        objects = tiered_cache.CachedManager(lookups=["name"])

        class Meta:
            app_label = "testapp"

    with installed(Handle, Other, Generated):
        for model in (Handle, Other, Generated):
            field = "raw" if model is Generated else "name"
            model.objects.create(**{field: "a"})
            _check_lookups(model, "name", ["a", "A"], tier)
            model.objects.create(**{field: "A"})
            _check_lookups(model, "name", ["a", "A"], tier)
        warnings = [w for w in check_manager(Handle.objects) if w.id == "tiered_cache.W001"]
        assert len(warnings) == 1 and "registered by the project" in warnings[0].msg


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize(("first", "then"), [(1, True), (1, 1.0), ("True", True), (True, "1")])
@isolate_apps("tests.testapp")
def test_a_generated_fields_values_are_prepared_as_its_output_field_prepares_them(
    tier: str, first: Any, then: Any
) -> None:
    """The ORM reads a GeneratedField's column as its output field and prepares a lookup's
    value with it (code=True is 'True', code=1.0 is '1.0'): values Python finds equal are
    other rows, and neither a row nor the absence of one is served for another's value."""

    class Generated(models.Model):
        raw = models.CharField(max_length=20)
        code = models.GeneratedField(
            expression=F("raw"),
            output_field=models.CharField(max_length=20),
            db_persist=True,
            unique=True,
        )
        objects = tiered_cache.CachedManager(lookups=["code"])

        class Meta:
            app_label = "testapp"

    with installed(Generated):
        for raw in ("1", "True", "1.0"):
            Generated.objects.create(raw=raw)
        for value in (first, then, first, "nothing", first):
            at(tier)
            assert_same(
                lambda v=value: Generated.objects.get_cached(code=v),
                lambda v=value: Generated.objects.get(code=v),
                f"code={value!r} after code={first!r}",
            )
        Generated.objects.filter(raw="True").delete()
        for value in (True, "True", 1):
            at(tier)
            assert_same(
                lambda v=value: Generated.objects.get_cached(code=v),
                lambda v=value: Generated.objects.get(code=v),
                f"code={value!r} once 'True' is gone",
            )


def _two_apps_status() -> tuple[type[models.TextChoices], type[models.TextChoices]]:
    """Two apps' `Order.Status` choices: the same qualified name and member name, other
    values (a member's repr names its class and member, not its value)."""

    class Order:
        class Status(models.TextChoices):
            ACTIVE = "t1", "Active"

    first = Order.Status

    class Order:  # type: ignore[no-redef]
        class Status(models.TextChoices):
            ACTIVE = "t2", "Active"

    return first, Order.Status


@pytest.mark.parametrize("tier", TIERS)
def test_lookup_values_that_differ_only_past_what_a_repr_or_28_digits_show_read_their_own_rows(
    tier: str,
) -> None:
    """Keys are injective (guarantee 5) for every value a lookup takes: decimals wider than
    the default context's 28 digits, bytes given as a memoryview (whose repr is its
    address, reused once it is freed) or a bytearray, and choices members (whose repr is
    `Class.NAME`)."""
    from tests.testapp.models import Ledger

    wide = [Decimal("12345678901.123456789012345678"), Decimal("12345678901.123456789012345680")]
    digests = [b"\x01" * 8, b"\x02" * 8]
    rows = [Ledger.objects.create(amount=a, digest=d) for a, d in zip(wide, digests, strict=True)]
    for row_ in rows:  # warm under every lookup, then read each as another process would
        Ledger.objects.get_cached(amount=row_.amount)
        Ledger.objects.get_cached(digest=memoryview(bytes(row_.digest)))
    for value in [*wide, Decimal("12345678901.1234567890123456780")]:
        at(tier)
        assert_same(
            lambda v=value: Ledger.objects.get_cached(amount=v),
            lambda v=value: Ledger.objects.get(amount=v),
            f"Ledger amount={value}",
        )
    for raw in digests:
        for given in (memoryview(raw), bytearray(raw), raw):
            at(tier)
            assert_same(
                lambda g=given: Ledger.objects.get_cached(digest=g),
                lambda g=given: Ledger.objects.get(digest=g),
                f"Ledger digest={given!r}",
            )
    first, second = _two_apps_status()
    assert repr(first.ACTIVE) == repr(second.ACTIVE)
    Flow.objects.create(tenant_id="t1", session_id="s")
    Flow.objects.create(tenant_id="t2", session_id="s")
    Flow.objects.get_cached(tenant_id=first.ACTIVE, session_id="s")
    for member in (second.ACTIVE, first.ACTIVE, "t2"):
        at(tier)
        assert_same(
            lambda m=member: Flow.objects.get_cached(tenant_id=m, session_id="s"),
            lambda m=member: Flow.objects.get(tenant_id=m, session_id="s"),
            f"Flow tenant_id={member!r} ({member})",
        )


def test_values_the_tiers_do_not_key_are_answered_by_the_database() -> None:
    """A JSON value (unhashable, no injective key) and an expression (the ORM resolves it)
    read the database, as .get() would, where they raised TypeError."""
    from tests.testapp.models import Ledger

    ledger = Ledger.objects.create(amount=Decimal(1), doc={"n": 1})
    Ledger.objects.create(amount=Decimal(2), doc=True)
    Ledger.objects.create(amount=Decimal(3), doc=1)  # another jsonb value than true
    tenant = TenantFactory()
    for scalar in (True, 1, True, 1.0):  # each read after the other's (L1 keys: True == 1)
        assert_same(
            lambda v=scalar: Ledger.objects.get_cached(doc=v),
            lambda v=scalar: Ledger.objects.get(doc=v),
            f"doc={scalar!r}",
        )
    counters = registry.model_cache(Ledger.objects).counters
    bypassed = counters.bypassed
    for cached, orm, what in [
        (
            lambda: Ledger.objects.get_cached(doc={"n": 1}),
            lambda: Ledger.objects.get(doc={"n": 1}),
            "doc={'n': 1}",
        ),
        (
            lambda: Ledger.objects.get_cached(digest=bytearray(b"none")),
            lambda: Ledger.objects.get(digest=bytearray(b"none")),
            "digest=bytearray (no such row)",
        ),
        (
            lambda: Tenant.objects.get_cached(pk=Value(tenant.pk)),
            lambda: Tenant.objects.get(pk=Value(tenant.pk)),
            "pk=Value(pk)",
        ),
        (
            lambda: Tenant.objects.get_many_cached([Value(tenant.pk)]),
            lambda: Tenant.objects.in_bulk([Value(tenant.pk)]),
            "get_many_cached([Value(pk)])",
        ),
    ]:
        assert_same(cached, orm, what)
    assert Ledger.objects.get_cached(doc={"n": 1}) == ledger
    assert counters.bypassed > bypassed


def _instance_lookups() -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    """(what, get_cached, the ORM's get) of a model instance given as a lookup value."""
    from tests.testapp.models import Provider

    tenant, provider = TenantFactory(), Provider.objects.create(name="p-inst", display_name="P")
    assert str(provider) == provider.name  # what a CharField makes of the instance
    italian = ItalianRestaurantFactory()
    place, restaurant = Place.objects.get(pk=italian.pk), Restaurant.objects.get(pk=italian.pk)
    account = AccountFactory(tenant=tenant)
    cases = [
        # a field that is no relation: its get_prep_value takes the instance (a CharField:
        # its str(), here the provider's name) or refuses it (a number: TypeError)
        ("Provider name=<Provider>", Provider.objects, {"name": provider}),
        ("Tenant pk=<Tenant>", Tenant.objects, {"pk": tenant}),
        ("Tenant pk=<Provider>", Tenant.objects, {"pk": provider}),
        ("Place pk=<ItalianRestaurant>", Place.objects, {"pk": italian}),
        # a relation: its model's instance, an ancestor's or a descendant's
        ("ItalianRestaurant pk=<Place>", ItalianRestaurant.objects, {"pk": place}),
        ("ItalianRestaurant pk=<Restaurant>", ItalianRestaurant.objects, {"pk": restaurant}),
        ("Restaurant pk=<ItalianRestaurant>", Restaurant.objects, {"pk": italian}),
        ("Restaurant pk=<Tenant>", Restaurant.objects, {"pk": tenant}),
        (
            "Account tenant=<Tenant>, email",
            Account.objects,
            {"tenant": tenant, "email": account.email},
        ),
        (
            "Account tenant=<Account>, email",
            Account.objects,
            {"tenant": account, "email": account.email},
        ),
    ]
    out: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = []
    for what, manager, lookup in cases:
        out.append(
            (
                what,
                lambda m=manager, lk=lookup: m.get_cached(**lk),
                lambda m=manager, lk=lookup: m.get(**lk),
            )
        )
        if list(lookup) == ["pk"]:
            out.append(
                (
                    f"{what} in get_many_cached",
                    lambda m=manager, lk=lookup: m.get_many_cached([lk["pk"]]),
                    lambda m=manager, lk=lookup: m.in_bulk([lk["pk"]]),
                )
            )
    return out


@pytest.mark.parametrize("tier", TIERS)
def test_a_model_instance_as_a_lookup_value_is_taken_as_the_orm_takes_it(tier: str) -> None:
    """The ORM's checks and conversions of an instance: only a relation takes one (of its
    model, an ancestor or a descendant), any other field converts or refuses it."""
    for what, cached, orm in _instance_lookups():
        for _ in range(2):  # the second read from the tier the first filled
            at(tier)
            assert_same(cached, orm, what)


@pytest.mark.parametrize("tier", TIERS)
def test_a_multi_table_childs_pk_answers_to_every_ancestors_pk_name(tier: str) -> None:
    """`Restaurant.objects.get(id=...)` names Place's id, which is the child's pk too."""
    italian = ItalianRestaurantFactory()
    for model, names in [
        (Restaurant, ["pk", "id", "place_ptr", "place_ptr_id"]),
        (ItalianRestaurant, ["pk", "id", "place_ptr_id", "restaurant_ptr", "restaurant_ptr_id"]),
    ]:
        for name in names:
            for value in (italian.pk, str(italian.pk), 10**9):
                at(tier)
                assert_same(
                    lambda m=model, n=name, v=value: m.objects.get_cached(**{n: v}),
                    lambda m=model, n=name, v=value: m.objects.get(**{n: v}),
                    f"{model.__name__} {name}={value!r}",
                )


@pytest.mark.parametrize("tier", TIERS)
def test_a_lookup_spelled_as_get_also_takes_it_answers_as_get(tier: str) -> None:
    """`pk__exact=`, `email__exact=` and a relation's `tenant__pk=` or `tenant__id=` are
    the plain lookups to .get(); a value given through the related field is prepared as
    that field's (an instance there is its error). Other lookups stay refused."""
    from tests.testapp.models import Specimen

    tenant = TenantFactory()
    account = AccountFactory(tenant=tenant)
    italian = ItalianRestaurantFactory()
    specimen = Specimen.objects.create(code=Code.objects.create(code="c-1", description="d"))
    offer = ProviderModelFactory()
    other = TenantFactory()
    cases: list[tuple[Any, dict[str, Any]]] = [
        (Account.objects, {"pk__exact": account.pk}),
        (Account.objects, {"pk__exact": str(account.pk)}),
        (Account.objects, {"id__exact": account.pk}),
        (Account.objects, {"email__exact": account.email}),
        (Account.objects, {"email__exact": "nobody@example.com"}),
        (Account.objects, {"tenant__pk": tenant.pk, "email": account.email}),
        (Account.objects, {"tenant__id": tenant.pk, "email__exact": account.email}),
        (Account.objects, {"email": account.email, "tenant__id__exact": str(tenant.pk)}),
        (Account.objects, {"tenant_id__exact": tenant.pk, "email": account.email}),
        (Account.objects, {"tenant__exact": tenant, "email": account.email}),
        (Account.objects, {"tenant__pk": other.pk, "email": account.email}),
        (Account.objects, {"tenant__pk": tenant, "email": account.email}),
        (Account.objects, {"tenant__id": "x", "email": account.email}),
        (tenant.accounts, {"pk__exact": account.pk}),
        (other.accounts, {"pk__exact": account.pk}),
        (Restaurant.objects, {"place_ptr__id": italian.pk}),
        (ItalianRestaurant.objects, {"restaurant_ptr__pk__exact": italian.pk}),
        (ItalianRestaurant.objects, {"restaurant_ptr__pk": Restaurant.objects.get(pk=italian.pk)}),
        (ItalianRestaurant.objects, {"restaurant_ptr__place_ptr": italian.pk}),
        (
            ProviderModel.objects,
            {"provider__pk": offer.provider_id, "global_model": offer.global_model},
        ),
        (
            ProviderModel.objects,
            {"global_model__id__exact": offer.global_model_id, "provider__id": offer.provider_id},
        ),
        (Specimen.objects, {"pk__exact": specimen.pk}),
    ]
    for manager, lookup in cases:
        for _ in range(2):  # the second read from the tier the first filled
            at(tier)
            assert_same(
                lambda m=manager, lk=lookup: m.get_cached(**lk),
                lambda m=manager, lk=lookup: m.get(**lk),
                f"{lookup}",
            )
    for refused, why in [
        ({"email__iexact": account.email}, "not other lookup expressions ('email__iexact')"),
        ({"tenant__name": "x", "email": "e"}, "not other lookup expressions ('tenant__name')"),
        ({"pk": account.pk, "pk__exact": account.pk}, "'pk' and 'pk__exact' name one field"),
        ({"tenant": 1, "tenant__pk": 1, "email": "e"}, "'tenant' and 'tenant__pk' name one field"),
        ({"tenant_id": 1, "tenant": 1, "email": "e"}, "'tenant' and 'tenant_id' name one field"),
    ]:
        with pytest.raises(UndeclaredLookup) as exc:
            Account.objects.get_cached(**refused)
        assert why in str(exc.value)


@pytest.mark.parametrize("tier", TIERS)
def test_a_related_manager_of_an_instance_built_with_a_str_pk_filters_as_the_orm_does(
    tier: str,
) -> None:
    """`Tenant(pk="3").accounts`, as a view builds it from a URL to save a query: the ORM
    filters by the pk as its field prepares it; the row keeps its own value of the key."""
    tenant = TenantFactory()
    account = AccountFactory(tenant=tenant)
    document = DocumentFactory()
    from tests.testapp.models import Specimen

    specimen = Specimen.objects.create(document=document)
    by_str = Tenant(pk=str(tenant.pk), name=tenant.name)
    doc_by_str = Document(pk=str(document.pk).upper(), title=document.title)
    for what, cached, orm in [
        (
            "Tenant(pk=str).accounts",
            lambda: by_str.accounts.get_cached(pk=account.pk),
            lambda: by_str.accounts.get(pk=account.pk),
        ),
        (
            "Tenant(pk=str).accounts, many",
            lambda: by_str.accounts.get_many_cached([account.pk]),
            lambda: by_str.accounts.in_bulk([account.pk]),
        ),
        (
            "Tenant(pk='abc').accounts",
            lambda: Tenant(pk="abc").accounts.get_cached(pk=account.pk),
            lambda: Tenant(pk="abc").accounts.get(pk=account.pk),
        ),
        (
            "Document(pk=UPPER).specimens",
            lambda: doc_by_str.specimens.get_cached(pk=specimen.pk),
            lambda: doc_by_str.specimens.get(pk=specimen.pk),
        ),
    ]:
        at(tier)
        got = assert_same(cached, orm, what)
        assert got[0] != "raises" or "abc" in what, got
    assert async_to_sync(by_str.accounts.aget_cached)(pk=account.pk) == account


# -- what the tiers store: the row as the database returned it --------------------------------


def _cold(model: type[models.Model]) -> None:
    """Nothing of the model in either tier (pending fills landed first, then flushed)."""
    at("l2")
    model._default_manager.flush_cache()  # type: ignore[attr-defined]
    at("l2")


@pytest.mark.parametrize("tier", TIERS)
@pytest.mark.parametrize("hook", ["from_db", "post_init", "init", "descriptor"])
@isolate_apps("tests.testapp")
def test_load_hooks_that_change_values_run_once_on_a_row_from_the_tiers(
    tier: str, hook: str
) -> None:
    """A model whose from_db(), __init__, post_init receiver or field descriptor changes
    the values it is given (decrypts a token, counts loads in a JSON value in place, keeps
    the value first given for change tracking): the ORM runs it once per load, on the
    database's values. The tiers store those values, not the changed ones, so a read from
    them runs it once too: get_cached, get_many_cached and warmup's fills alike."""
    from django.db.models.query_utils import DeferredAttribute
    from django.db.models.signals import post_init

    from tiered_cache import maintenance

    def loaded(inst: Any) -> None:
        inst.token = f"dec({inst.token})"
        inst.doc["loads"] = inst.doc.get("loads", 0) + 1

    class Wrapping(DeferredAttribute):
        def __set__(self, inst: Any, value: Any) -> None:
            inst.__dict__.setdefault("given", value)
            inst.__dict__[self.field.attname] = None if value is None else f"dec({value})"

    class WrappedField(models.CharField):  # type: ignore[type-arg]
        descriptor_class = Wrapping

    class Hooked(models.Model):
        token = (
            WrappedField(max_length=100)
            if hook == "descriptor"
            else models.CharField(max_length=100)
        )
        doc = models.JSONField(default=dict)
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

        if hook == "from_db":

            @classmethod
            def from_db(cls, db: Any, field_names: Any, values: Any) -> Any:
                inst = super().from_db(db, field_names, values)
                loaded(inst)
                return inst

        if hook == "init":

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                if args:  # as from_db() builds it
                    loaded(self)

    def receiver(sender: Any, instance: Any, **kwargs: Any) -> None:
        if instance.pk is not None:  # as from_db() builds it (create() gives no pk)
            loaded(instance)

    if hook == "post_init":
        post_init.connect(receiver, sender=Hooked, weak=False)

    def seen(obj: Any) -> tuple[Any, ...]:
        return (row(obj), obj.__dict__.get("given"))

    try:
        with installed(Hooked):
            first = Hooked.objects.create(token="raw", doc={"a": 1})
            second = Hooked.objects.create(token="raw", doc={"a": 2})
            # The rows as stored, whatever creating them ran.
            Hooked.objects.update(token="raw")
            pks = [first.pk, second.pk]
            reads = [
                (
                    "get_cached",
                    lambda: seen(Hooked.objects.get_cached(pk=first.pk)),
                    lambda: seen(Hooked.objects.get(pk=first.pk)),
                ),
                (
                    "get_many_cached",
                    lambda: {k: seen(v) for k, v in Hooked.objects.get_many_cached(pks).items()},
                    lambda: {k: seen(v) for k, v in Hooked.objects.in_bulk(pks).items()},
                ),
            ]
            for what, cached, orm in reads:
                _cold(Hooked)
                got = assert_same(cached, orm, f"{hook}: {what}, a miss")
                assert "dec(raw)" in repr(got), got  # the hook ran
                for again in range(2):
                    at(tier)
                    assert_same(cached, orm, f"{hook}: {what} from {tier} ({again})")
                at(tier)
                assert_same(reads[0][1], reads[0][2], f"{hook}: get_cached after {what}")
            _cold(Hooked)
            assert maintenance.warmup(Hooked)["stored"] == 2
            for what, cached, orm in reads:
                at(tier)
                assert_same(cached, orm, f"{hook}: {what} after warmup, from {tier}")
    finally:
        post_init.disconnect(receiver, sender=Hooked)


class _Handle:
    """A value of a from_db_value() that pickle cannot copy (it holds a lock)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = threading.Lock()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Handle) and other.name == self.name

    __hash__ = None  # type: ignore[assignment]


@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_a_from_db_of_the_projects_gets_what_the_orm_passes_it(tier: str) -> None:
    """Django 6.1 passes fetch_mode= to a from_db() that takes it (FETCH_ONE for a default
    queryset): a cached read passes the same (it passed nothing)."""
    with isolate_apps("tests.testapp"):

        class Hooked(models.Model):
            name = models.CharField(max_length=20)
            objects = tiered_cache.CachedManager()

            class Meta:
                app_label = "testapp"

            @classmethod
            def from_db(cls, db: Any, field_names: Any, values: Any, **kwargs: Any) -> Any:
                obj = super().from_db(db, field_names, values, **kwargs)
                obj.loaded_with = kwargs  # type: ignore[attr-defined]
                return obj

        with installed(Hooked):
            h = Hooked.objects.create(name="h")
            Hooked.objects.get_cached(pk=h.pk)
            at(tier)
            cached = Hooked.objects.get_cached(pk=h.pk)
            assert cached.loaded_with == Hooked.objects.get(pk=h.pk).loaded_with


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_values_pickle_refuses_are_served_as_the_orm_gives_them(tier: str) -> None:
    """A memoryview (what BinaryField gives under psycopg2, or a from_db_value() of one's
    own) is stored and served as a memoryview; a value no copy can be made of is read
    from the database on every read, as the ORM reads it. Neither raises."""

    class ViewField(models.BinaryField):
        def from_db_value(self, value: Any, expression: Any, conn: Any) -> Any:
            return None if value is None else memoryview(value)

    class HandleField(models.CharField):  # type: ignore[type-arg]
        def from_db_value(self, value: Any, expression: Any, conn: Any) -> Any:
            return None if value is None else _Handle(value)

        def get_prep_value(self, value: Any) -> Any:
            return value.name if isinstance(value, _Handle) else value

    class Blob(models.Model):
        data = ViewField(null=True)
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    class Held(models.Model):
        handle = HandleField(max_length=20)
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    with installed(Blob, Held):
        blob = Blob.objects.create(data=b"abc")
        held = Held.objects.create(handle="h1")
        for model, pk in ((Blob, blob.pk), (Held, held.pk)):
            reads = [
                (
                    lambda m=model, p=pk: m.objects.get_cached(pk=p),
                    lambda m=model, p=pk: m.objects.get(pk=p),
                ),
                (
                    lambda m=model, p=pk: {
                        k: row(v) for k, v in m.objects.get_many_cached([p]).items()
                    },
                    lambda m=model, p=pk: {k: row(v) for k, v in m.objects.in_bulk([p]).items()},
                ),
            ]
            for cached, orm in reads:
                _cold(model)
                assert_same(cached, orm, f"{model.__name__}, a miss")
                for again in range(2):
                    at(tier)
                    assert_same(cached, orm, f"{model.__name__} from {tier} ({again})")
        at(tier)
        with CaptureQueriesContext(connection) as ctx:
            served = Blob.objects.get_cached(pk=blob.pk)
        assert type(served.data) is memoryview and bytes(served.data) == b"abc"
        assert len(ctx.captured_queries) == 0, "a memoryview row is cached"
        at(tier)
        with CaptureQueriesContext(connection) as ctx:
            assert Held.objects.get_cached(pk=held.pk).handle == _Handle("h1")
        assert len(ctx.captured_queries) == 1, "a row no copy can be made of is the database's"


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_manager_whose_queryset_builds_its_own_instances_reads_as_the_orm_does(
    tier: str,
) -> None:
    """A queryset whose _iterable_class builds the instances (another class per row, as
    django-polymorphic's does, or attributes of its own): a cached instance would be built
    from its row alone, so such reads are the database's (and system check W003 says so)."""
    from django.db.models.query import ModelIterable

    from tiered_cache.registry import uncacheable_reason

    class Tagging(ModelIterable):  # type: ignore[type-arg]
        def __iter__(self) -> Iterator[Any]:
            for obj in super().__iter__():
                obj.loaded_through = "tagging"
                yield obj

    class TaggingManager(tiered_cache.CachedManager):
        def get_queryset(self) -> Any:
            qs = super().get_queryset()
            qs._iterable_class = Tagging
            return qs

    class MadeTagging(models.QuerySet):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._iterable_class = Tagging

    class Tagged(models.Model):
        name = models.CharField(max_length=10)
        objects = TaggingManager()
        made = tiered_cache.CachedManager.from_queryset(MadeTagging)()

        class Meta:
            app_label = "testapp"

    def tags(objs: Any) -> list[Any]:
        return [getattr(o, "loaded_through", None) for o in objs]

    with installed(Tagged):
        obj = Tagged.objects.create(name="a")
        for manager in (Tagged.objects, Tagged.made):
            assert uncacheable_reason(manager) == (
                "its queryset builds instances with an iterable of its own (_iterable_class)"
            ), manager.name
            for _ in range(2):
                at(tier)
                assert_same(
                    lambda m=manager: tags([m.get_cached(pk=obj.pk)]),
                    lambda m=manager: tags([m.get(pk=obj.pk)]),
                    f"Tagged.{manager.name}",
                )
                at(tier)
                assert_same(
                    lambda m=manager: tags(m.get_many_cached([obj.pk]).values()),
                    lambda m=manager: tags(m.in_bulk([obj.pk]).values()),
                    f"Tagged.{manager.name}, many",
                )


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_queryset_class_that_filters_as_it_is_made_is_read_as_the_orm_reads_it(
    tier: str,
) -> None:
    """Manager.from_queryset(QS) where QS's __init__ filters by the current tenant (a
    context variable): its reads are keyed by that filter as it is when they run, as
    those of a manager overriding get_queryset() are, and one tenant's row is never
    served to another."""
    import contextvars

    tenant = contextvars.ContextVar("tenant", default="a")

    class OfTenant(models.QuerySet):  # type: ignore[type-arg]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.query.add_q(Q(owner=tenant.get()))

    class Memo(models.Model):
        owner = models.CharField(max_length=10)
        objects = tiered_cache.CachedManager()
        mine = tiered_cache.CachedManager.from_queryset(OfTenant)()

        class Meta:
            app_label = "testapp"

    with installed(Memo):
        memo = Memo.objects.create(owner="a")
        for who in ("a", "b", "a", "b"):
            token = tenant.set(who)
            try:
                at(tier)
                assert_same(
                    lambda: Memo.mine.get_cached(pk=memo.pk),
                    lambda: Memo.mine.get(pk=memo.pk),
                    f"Memo.mine as tenant {who}",
                )
            finally:
                tenant.reset(token)


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_a_model_whose_new_picks_the_class_reads_as_the_orm_does(tier: str) -> None:
    """Model.__new__ of its own, given the row's values by from_db(), picks a proxy class
    by a column (a hand-written polymorphism): a row from the tiers is built through
    from_db() as well."""
    classes: dict[str, type[models.Model]] = {}

    class Animal(models.Model):
        kind = models.CharField(max_length=10)
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            if len(args) > 1 and args[1] in classes:
                cls = classes[args[1]]
            return super().__new__(cls)

    class Dog(Animal):
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"
            proxy = True

    classes["dog"] = Dog
    with installed(Animal):
        dog = Animal.objects.create(kind="dog")
        cat = Animal.objects.create(kind="cat")
        reads = [
            (
                lambda: row(Animal.objects.get_cached(pk=dog.pk)),
                lambda: row(Animal.objects.get(pk=dog.pk)),
            ),
            (
                lambda: {
                    k: row(v) for k, v in Animal.objects.get_many_cached([dog.pk, cat.pk]).items()
                },
                lambda: {k: row(v) for k, v in Animal.objects.in_bulk([dog.pk, cat.pk]).items()},
            ),
        ]
        for cached, orm in reads:
            _cold(Animal)
            got = assert_same(cached, orm, "a miss")
            assert "Dog" in repr(got), got
            for again in range(2):
                at(tier)
                assert_same(cached, orm, f"from {tier} ({again})")


@pytest.mark.parametrize("tier", TIERS)
@isolate_apps("tests.testapp")
def test_get_many_cached_keys_rows_by_their_pk_as_in_bulk_does(tier: str) -> None:
    """in_bulk() keys each row by its pk as read, which a case-insensitive collation lets
    differ from the value asked for ("BOB" reads the row "bob", and "bob" and "BOB" one
    row). get_many_cached() answers the same keys from a miss and from either tier, and
    what its miss stores answers get_cached() as .get() answers."""
    collation = "tc_parity_ci"
    with connection.cursor() as c:
        c.execute(
            f"CREATE COLLATION IF NOT EXISTS {collation}"
            " (provider = icu, locale = 'und-u-ks-level2', deterministic = false)"
        )

    class Handle(models.Model):
        name = models.CharField(max_length=20, primary_key=True, db_collation=collation)
        objects = tiered_cache.CachedManager()

        class Meta:
            app_label = "testapp"

    def many(read: Callable[[list[str]], dict[Any, Any]], pks: list[str]) -> dict[Any, Any]:
        return {k: row(v) for k, v in read(pks).items()}

    try:
        with installed(Handle):
            Handle.objects.create(name="bob")
            Handle.objects.create(name="Ann")
            for pks in (["BOB"], ["bob", "BOB"], ["BOB", "ann", "nobody"], ["Bob", "bob"]):
                _cold(Handle)
                for when in ("a miss", f"from {tier}", f"from {tier} again"):
                    if when != "a miss":
                        at(tier)
                    assert_same(
                        lambda p=pks: many(Handle.objects.get_many_cached, p),
                        lambda p=pks: many(Handle.objects.in_bulk, p),
                        f"get_many_cached({pks}), {when}",
                    )
                for pk in pks:
                    at(tier)
                    assert_same(
                        lambda p=pk: Handle.objects.get_cached(pk=p),
                        lambda p=pk: Handle.objects.get(pk=p),
                        f"get_cached(pk={pk!r}) after get_many_cached({pks})",
                    )
            # Entries stored by get_cached() under each spelling.
            _cold(Handle)
            for pk in ("bob", "BOB", "ANN"):
                Handle.objects.get_cached(pk=pk)
            at(tier)
            assert_same(
                lambda: many(Handle.objects.get_many_cached, ["bob", "BOB", "ANN"]),
                lambda: many(Handle.objects.in_bulk, ["bob", "BOB", "ANN"]),
                f"get_many_cached of get_cached's entries, from {tier}",
            )
    finally:
        with connection.cursor() as c:
            c.execute(f"DROP COLLATION IF EXISTS {collation}")
