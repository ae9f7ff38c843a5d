"""Managers: get_cached answers what .get() on the same manager answers, whatever the
manager filters on, and refuses to cache what it cannot keep exact."""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from typing import Any

import pytest
from django.db import models
from django.db.models import F
from django.test.utils import isolate_apps

import tiered_cache
from tests.testapp.factories import AccountFactory, TenantFactory
from tests.testapp.models import Account
from tiered_cache import CachedManager

pytestmark = pytest.mark.django_db(transaction=True)

current_domain: contextvars.ContextVar[str] = contextvars.ContextVar("domain", default="a.test")


class DomainManager(CachedManager):
    """Scoped at run time, as multi-tenant projects do with a request's tenant."""

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(email__endswith="@" + current_domain.get())


class DoubledManager(CachedManager):
    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().annotate(doubled=F("balance") * 2)


class ByBalanceManager(CachedManager):
    """A lookup that is not unique (system check W001)."""


@pytest.fixture
def extra_managers() -> Iterator[None]:
    added = {
        "by_domain": DomainManager(),
        "doubled": DoubledManager(),
        "by_balance": ByBalanceManager(lookups=["balance"]),
    }
    for name, manager in added.items():
        Account.add_to_class(name, manager)
    yield
    for name, manager in added.items():
        Account._meta.local_managers.remove(manager)
        delattr(Account, name)
    Account._meta._expire_cache()


def outcome(fn: Any) -> Any:
    try:
        obj = fn()
    except Exception as exc:
        return type(exc).__name__
    return (obj.pk, obj.balance, getattr(obj, "doubled", None))


@pytest.mark.parametrize("tier", ["l1", "l2"])
def test_a_manager_scoped_at_run_time_keys_its_filter(extra_managers: None, tier: str) -> None:
    tenant = TenantFactory()
    a = AccountFactory(tenant=tenant, email="x@a.test")
    for domain in ("a.test", "b.test", "a.test", "b.test"):
        token = current_domain.set(domain)
        try:
            assert outcome(lambda: Account.by_domain.get_cached(pk=a.pk)) == outcome(
                lambda: Account.by_domain.get(pk=a.pk)
            ), domain
        finally:
            current_domain.reset(token)
        if tier == "l2":
            tiered_cache.clear_local()


def test_an_annotating_manager_reads_the_database(extra_managers: None) -> None:
    a = AccountFactory(balance=21)
    for _ in range(2):
        assert Account.doubled.get_cached(pk=a.pk).doubled == 42


def test_a_lookup_that_is_not_unique_reads_the_database(extra_managers: None) -> None:
    tenant = TenantFactory()
    first = AccountFactory(tenant=tenant, balance=500)
    assert Account.by_balance.get_cached(balance=500).pk == first.pk
    AccountFactory(tenant=tenant, balance=500)
    with pytest.raises(Account.MultipleObjectsReturned):
        Account.by_balance.get(balance=500)
    with pytest.raises(Account.MultipleObjectsReturned):
        Account.by_balance.get_cached(balance=500)


@isolate_apps("tests.testapp")
def test_an_instance_as_a_to_field_foreign_key_value_uses_that_field() -> None:
    from tests.testapp.models import Tenant

    class Membership(models.Model):
        tenant = models.ForeignKey(Tenant, to_field="name", on_delete=models.CASCADE)
        note = models.CharField(max_length=20)
        objects = CachedManager(lookups=["tenant"])

        class Meta:
            app_label = "testapp"
            managed = False

    from tiered_cache.registry import model_cache

    tenant = TenantFactory(name="acme")
    lk, values = model_cache(Membership.objects).resolve({"tenant": tenant})
    assert values == ("acme",)  # the to_field's value, as .get(tenant=tenant) filters by
    assert lk.orm_kwargs(values) == {"tenant_id": "acme"}


# -- wrong input ------------------------------------------------------------------------


def test_invalidate_takes_a_row_of_its_model_or_a_pk() -> None:
    from tests.cache_fixtures import write_outside_django
    from tests.testapp.models import Place, ProxyAccount, Restaurant

    account = AccountFactory(balance=1)
    proxy = ProxyAccount.objects.get(pk=account.pk)
    restaurant = Restaurant.objects.create(name="old")
    for manager, obj, table in (
        (Account.objects, proxy, "testapp_account"),
        (ProxyAccount.objects, account, "testapp_account"),
        (Place.objects, restaurant, "testapp_place"),
        (Restaurant.objects, Place.objects.get(pk=restaurant.pk), "testapp_place"),
    ):
        manager.get_cached(pk=obj.pk)
        column = "balance" if table == "testapp_account" else "name"
        write_outside_django(f"UPDATE {table} SET {column} = %s WHERE id = %s", ["7", obj.pk])
        manager.invalidate(obj)  # a proxy's or a parent's instance names the same row
        assert str(getattr(manager.get_cached(pk=obj.pk), column)) == "7", manager

    label = "testapp.Account"
    wrong = [
        (
            TenantFactory(),
            TypeError,
            f"{label}: invalidate\\(\\) takes a {label} or its pk, not a testapp.Tenant instance",
        ),
        (Account(email="new@a.test"), ValueError, "unsaved instance"),
        (None, TypeError, "not None"),
        ("abc", ValueError, r"invalidate\('abc'\): not a pk: .*value must be an integer"),
    ]
    for given, error, message in wrong:
        with pytest.raises(error, match=message):
            Account.objects.invalidate(given)


def test_an_unknown_database_is_the_orms_error() -> None:
    from django.utils.connection import ConnectionDoesNotExist

    for read in (
        Account.objects.db_manager("nope").get,
        Account.objects.db_manager("nope").get_cached,
    ):
        with pytest.raises(ConnectionDoesNotExist, match="The connection 'nope' doesn't exist"):
            read(email="a@a.test")


@isolate_apps("tests.testapp")
def test_invalidate_of_a_relative_with_a_pk_of_its_own_drops_the_row_it_names() -> None:
    """A child whose pk is its own (the parent link another field) holds its parent's row
    under the parent's pk; a OneToOne primary key takes the related instance, as
    filter(pk=instance) does."""
    from django.db import connection

    from tests.cache_fixtures import write_outside_django

    class Person(models.Model):
        name = models.CharField(max_length=20)
        objects = CachedManager()

        class Meta:
            app_label = "testapp"

    class Profile(models.Model):
        person = models.OneToOneField(Person, on_delete=models.CASCADE, primary_key=True)
        bio = models.CharField(max_length=20)
        objects = CachedManager()

        class Meta:
            app_label = "testapp"

    class Base(models.Model):
        name = models.CharField(max_length=20)
        objects = CachedManager()

        class Meta:
            app_label = "testapp"

    class Sub(Base):
        own = models.AutoField(primary_key=True)
        base = models.OneToOneField(Base, on_delete=models.CASCADE, parent_link=True)
        objects = CachedManager()

        class Meta:
            app_label = "testapp"

    made = [Person, Profile, Base, Sub]
    with connection.schema_editor() as editor:
        for model in made:
            editor.create_model(model)
    try:
        Base.objects.bulk_create([Base(name="other") for _ in range(3)])
        sub = Sub.objects.create(name="old")
        assert sub.own != sub.base_id  # the two pks differ
        Base.objects.get_cached(pk=sub.base_id)
        write_outside_django("UPDATE testapp_base SET name = 'new' WHERE id = %s", [sub.base_id])
        Base.objects.invalidate(sub)
        assert Base.objects.get_cached(pk=sub.base_id).name == "new"
        with pytest.raises(TypeError, match="not a testapp.Base instance"):
            Sub.objects.invalidate(Base.objects.get(pk=sub.base_id))  # its pk is not Sub's

        person = Person.objects.create(name="p")
        Profile.objects.create(person=person, bio="old")
        Profile.objects.get_cached(pk=person.pk)
        write_outside_django(
            "UPDATE testapp_profile SET bio = 'new' WHERE person_id = %s", [person.pk]
        )
        Profile.objects.invalidate(person)
        assert Profile.objects.get_cached(pk=person.pk).bio == "new"
        with pytest.raises(TypeError, match="not a testapp.Sub instance"):
            Profile.objects.invalidate(sub)
    finally:
        with connection.schema_editor() as editor:
            for model in reversed(made):
                editor.delete_model(model)
