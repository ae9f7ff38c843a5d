"""Models of the test app: one of each shape the ORM offers (proxies, multi-table
inheritance, an abstract base carrying the manager, every on_delete, many-to-many, odd
primary keys, a composite primary key, a mutable value behind a custom field)."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib.auth.models import UserManager
from django.db import models

# The project's AUTH_USER_MODEL is "demo.User": django.contrib.auth.models.User is swapped
# out (it has no table), so CachedUser proxies the project's user model instead.
from demo_project.demo.models import User as ProjectUser
from tiered_cache import CachedManager, CachedManagerMixin


class ListField(models.CharField):
    """A list of str stored as one comma-separated string: a mutable Python value behind a
    field class (CharField) whose values are usually immutable."""

    description = "A list of strings stored comma-separated"

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> list[str] | None:
        if value is None:
            return None
        return self._split(value)

    def to_python(self, value: Any) -> list[str] | None:
        if value is None or isinstance(value, list):
            return value
        return self._split(str(value))

    def get_prep_value(self, value: Any) -> str | None:
        if value is None:
            return None
        if isinstance(value, (list, tuple)):
            return ",".join(str(v) for v in value)
        return str(value)

    def value_to_string(self, obj: models.Model) -> str:
        return self.get_prep_value(self.value_from_object(obj)) or ""

    @staticmethod
    def _split(value: str) -> list[str]:
        return [part for part in value.split(",") if part]


class Tenant(models.Model):
    name = models.CharField(max_length=100, unique=True)

    objects = CachedManager(lookups=["name"])

    def __str__(self) -> str:
        return self.name


class RichAccountManager(CachedManager):
    """A cached manager whose queryset filters on the model's own columns."""

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(balance__gte=100)


class Account(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="accounts")
    email = models.CharField(max_length=200, unique=True)
    balance = models.IntegerField(default=0)
    data = models.JSONField(default=dict)
    tags = ListField(max_length=200, default=list, blank=True)

    objects = CachedManager(lookups=["email", ("tenant", "email")])
    rich = RichAccountManager(lookups=["email"])

    def __str__(self) -> str:
        return self.email


class ProxyAccount(Account):
    objects = CachedManager(lookups=["email"])

    class Meta:
        proxy = True

    def __str__(self) -> str:
        return f"proxy {self.email}"


class CachedUserManager(CachedManagerMixin, UserManager):
    cache_lookups = ["username"]


class CachedUser(ProjectUser):
    objects = CachedUserManager()

    class Meta:
        proxy = True

    def __str__(self) -> str:
        return self.username


# -- multi-table inheritance, two levels ---------------------------------------------


class Place(models.Model):
    name = models.CharField(max_length=100)
    address = models.CharField(max_length=200, default="")

    objects = CachedManager()

    def __str__(self) -> str:
        return self.name


class Restaurant(Place):
    serves_pizza = models.BooleanField(default=False)

    objects = CachedManager()

    def __str__(self) -> str:
        return f"restaurant {self.name}"


class ItalianRestaurant(Restaurant):
    has_oven = models.BooleanField(default=False)

    objects = CachedManager()

    def __str__(self) -> str:
        return f"italian restaurant {self.name}"


# -- an abstract base that carries the manager -------------------------------------


class Stamped(models.Model):
    created = models.DateTimeField(auto_now_add=True)

    objects = CachedManager()

    class Meta:
        abstract = True


class Note(Stamped):
    text = models.CharField(max_length=200)

    def __str__(self) -> str:
        return self.text


# -- every on_delete, and many-to-many ---------------------------------------------


class Owner(models.Model):
    name = models.CharField(max_length=100)

    objects = CachedManager(lookups=[])

    def __str__(self) -> str:
        return self.name


def get_sentinel_owner_none() -> None:
    """on_delete=SET(...) with a callable: here the replacement value is None."""
    return None


class Item(models.Model):
    name = models.CharField(max_length=100)
    owner_cascade = models.ForeignKey(Owner, on_delete=models.CASCADE, related_name="cascade_items")
    owner_set_null = models.ForeignKey(
        Owner, on_delete=models.SET_NULL, null=True, blank=True, related_name="set_null_items"
    )
    owner_set_default = models.ForeignKey(
        Owner,
        on_delete=models.SET_DEFAULT,
        null=True,
        blank=True,
        default=None,
        related_name="set_default_items",
    )
    owner_set = models.ForeignKey(
        Owner,
        on_delete=models.SET(get_sentinel_owner_none),
        null=True,
        blank=True,
        related_name="set_items",
    )
    owner_protect = models.ForeignKey(
        Owner, on_delete=models.PROTECT, null=True, blank=True, related_name="protected_items"
    )
    tags = models.ManyToManyField("Label", related_name="items", blank=True)

    objects = CachedManager()

    def __str__(self) -> str:
        return self.name


class Label(models.Model):
    name = models.CharField(max_length=100, unique=True)

    objects = CachedManager(lookups=["name"])

    def __str__(self) -> str:
        return self.name


# -- odd primary keys ----------------------------------------------------------------


class Document(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4)
    title = models.CharField(max_length=200)

    objects = CachedManager()

    def __str__(self) -> str:
        return self.title


class Code(models.Model):
    code = models.CharField(primary_key=True, max_length=20)
    description = models.CharField(max_length=200)

    objects = CachedManager()

    def __str__(self) -> str:
        return self.code


class Gadget(models.Model):
    gadget_no = models.AutoField(primary_key=True)
    name = models.CharField(max_length=100)

    objects = CachedManager()

    def __str__(self) -> str:
        return self.name


class Shipment(models.Model):
    """A composite primary key, behind a plain manager: whether tiered_cache supports
    composite keys is decided elsewhere (the tests check it refuses them clearly)."""

    pk = models.CompositePrimaryKey("tenant_code", "number")
    tenant_code = models.CharField(max_length=20)
    number = models.IntegerField()
    note = models.CharField(max_length=200, blank=True, default="")

    objects = models.Manager()

    def __str__(self) -> str:
        return f"{self.tenant_code}/{self.number}"
