"""Checked by mypy (tests/test_typing.py), never run: the cached managers are generic in
their model, so reads are typed as the model with the django-stubs plugin."""

from __future__ import annotations

from typing import Any, TypeVar, assert_type

from django.contrib.auth.models import UserManager as DjangoUserManager
from django.db import models

from tests.testapp.models import Account, Flow, ProxyAccount, Restaurant, Tenant, User
from tiered_cache import CachedManager, CachedManagerMixin

_M = TypeVar("_M", bound=models.Model)


# `objects = CachedManager(lookups=[...])` on a model: the plugin fills in the model.
def declared_on_the_model(tenant: Tenant) -> None:
    assert_type(Account.objects, CachedManager[Account])
    assert_type(Account.objects.get_cached(pk=1), Account)
    assert_type(Account.objects.get_cached(email="a@b.c"), Account)
    assert_type(Account.objects.get_many_cached([1, 2]), dict[Any, Account])
    assert_type(Tenant.objects.get_cached(name="t1"), Tenant)
    assert_type(Flow.objects.get_cached(tenant_id="t1", session_id="s1"), Flow)
    assert_type(ProxyAccount.objects.get_cached(pk=1), ProxyAccount)
    assert_type(Restaurant.objects.get_cached(pk=1), Restaurant)
    assert_type(tenant.accounts.get_cached(pk=1), Account)
    assert_type(Account.objects.db_manager("other").get_cached(pk=1), Account)


async def declared_on_the_model_async() -> None:
    assert_type(await Account.objects.aget_cached(pk=1), Account)
    assert_type(await Account.objects.aget_many_cached([1, 2]), dict[Any, Account])


# A manager of one's own: subclass CachedManager[Model], or stay generic.
class RichManager(CachedManager[Account]):
    pass


class AnyModelManager(CachedManager[_M]):
    pass


def subclassed(rich: RichManager, tenants: AnyModelManager[Tenant]) -> None:
    assert_type(rich.get_cached(pk=1), Account)
    assert_type(tenants.get_cached(pk=1), Tenant)


# The mixin in front of a manager the model already has, both given the model.
class TypedUserManager(CachedManagerMixin[User], DjangoUserManager[User]):
    cache_lookups = ["email"]


async def mixed_in(users: TypedUserManager) -> None:
    assert_type(users.get_cached(email="a@b.c"), User)
    assert_type(await users.aget_cached(pk=1), User)
    assert_type(users.get_many_cached([1]), dict[Any, User])
    assert_type(users.create_user("u"), User)
