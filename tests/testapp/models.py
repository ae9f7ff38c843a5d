"""Models of the test app: the shapes of a real service (the project's user model with a
cached manager mixed into its own, providers and their models for derived functions, flows
behind a composite lookup), and one of each shape the ORM offers (proxies, multi-table
inheritance, an abstract base carrying the manager, every on_delete, many-to-many, odd
primary keys, a composite primary key, a mutable value behind a custom field)."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib.auth.models import AbstractUser, Group, Permission
from django.contrib.auth.models import UserManager as DjangoUserManager
from django.db import models
from django.utils import timezone

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


# -- the shapes of a real service -----------------------------------------------------


class UserManager(CachedManagerMixin, DjangoUserManager):
    """A cached manager mixed into the manager a user model already has."""

    cache_lookups = ["email"]


class User(AbstractUser):
    """The suite's AUTH_USER_MODEL (tests/settings.py): the admin logs in with it."""

    email = models.EmailField("email address", unique=True)
    preferences = models.JSONField(default=dict, blank=True)
    # Own reverse names: the demo's user model (installed for its own tests) keeps
    # AbstractUser's "user_set".
    groups = models.ManyToManyField(
        Group, blank=True, related_name="testapp_users", related_query_name="testapp_user"
    )
    user_permissions = models.ManyToManyField(
        Permission, blank=True, related_name="testapp_users", related_query_name="testapp_user"
    )

    objects = UserManager()


class Provider(models.Model):
    name = models.CharField(max_length=100, unique=True)
    display_name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)

    objects = CachedManager(lookups=["name"])

    def __str__(self) -> str:
        return self.name


class GlobalModel(models.Model):
    """A model as clients name it, whichever provider serves it."""

    name = models.CharField(max_length=100, unique=True)
    display_name = models.CharField(max_length=200)
    supported_capabilities = models.JSONField(default=list, blank=True)
    config = models.JSONField(default=dict, blank=True)
    is_active = models.BooleanField(default=True)

    objects = CachedManager(lookups=["name"])

    def __str__(self) -> str:
        return self.name


class ProviderModel(models.Model):
    """One provider's offer of a global model: a lookup by two foreign keys."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="offers")
    global_model = models.ForeignKey(GlobalModel, on_delete=models.CASCADE, related_name="offers")
    provider_model_name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)

    objects = CachedManager(lookups=[("provider", "global_model")])

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "global_model"], name="testapp_providermodel_pair_uniq"
            ),
        ]

    def __str__(self) -> str:
        return self.provider_model_name


class FlowStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    COMPLETED = "completed", "Completed"
    CANCELLED = "cancelled", "Cancelled"


class BaseFlow(models.Model):
    """The state of one conversation flow in one tenant's session."""

    tenant_id = models.CharField(max_length=64)
    session_id = models.CharField(max_length=64)
    flow_id = models.UUIDField(default=uuid.uuid4)
    current_step = models.IntegerField(default=0)
    status = models.CharField(max_length=16, choices=FlowStatus.choices, default=FlowStatus.ACTIVE)
    context = models.JSONField(default=dict, blank=True)
    started_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True
        constraints = [
            models.UniqueConstraint(
                fields=["tenant_id", "session_id"],
                name="%(app_label)s_%(class)s_tenant_session_uniq",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.session_id}"


class Flow(BaseFlow):
    objects = CachedManager(lookups=[("tenant_id", "session_id")], timeout=3600, l1_timeout=300)


class PlainFlow(BaseFlow):
    """Flow without a cache: what the admin, the commands and the checks must refuse."""

    objects = models.Manager()


# -- one of each shape the ORM offers -----------------------------------------------


class Tenant(models.Model):
    name = models.CharField(max_length=100, unique=True)

    objects = CachedManager(lookups=["name"])

    def __str__(self) -> str:
        return self.name


class RichAccountManager(CachedManager):
    """A cached manager whose queryset filters on the model's own columns."""

    def get_queryset(self) -> models.QuerySet:
        return super().get_queryset().filter(balance__gte=100)


class FetchModeAccountManager(CachedManager):
    """A cached manager whose queryset sets a fetch mode (Django 6.1+), the way Django's
    docs make one a model's default; None leaves Django's own."""

    fetch_mode: Any = None

    def get_queryset(self) -> models.QuerySet:
        qs = super().get_queryset()
        return qs if self.fetch_mode is None else qs.fetch_mode(self.fetch_mode)


class RaisingAccountManager(FetchModeAccountManager):
    fetch_mode = getattr(models, "FETCH_RAISE", None)


class PeersAccountManager(FetchModeAccountManager):
    fetch_mode = getattr(models, "FETCH_PEERS", None)


class Account(models.Model):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="accounts")
    email = models.CharField(max_length=200, unique=True)
    balance = models.IntegerField(default=0)
    data = models.JSONField(default=dict)
    tags = ListField(max_length=200, default=list, blank=True)

    objects = CachedManager(lookups=["email", ("tenant", "email")])
    rich = RichAccountManager(lookups=["email"])
    raising = RaisingAccountManager(lookups=["email"])
    peers = PeersAccountManager()

    def __str__(self) -> str:
        return self.email


class ProxyAccount(Account):
    objects = CachedManager(lookups=["email"])

    class Meta:
        proxy = True

    def __str__(self) -> str:
        return f"proxy {self.email}"


class CachedUserManager(CachedManagerMixin, DjangoUserManager):
    cache_lookups = ["username"]


class CachedUser(User):
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


class Tracked(models.Model):
    """Overrides from_db() as Django's documentation shows (to track changed fields): a
    cached read must call it with the field names, as the ORM does."""

    name = models.CharField(max_length=100)

    objects = CachedManager()

    def __str__(self) -> str:
        return self.name

    @classmethod
    def from_db(cls, db: str | None, field_names: Any, values: Any) -> Tracked:
        instance = super().from_db(db, field_names, values)
        instance.loaded_values = dict(zip(field_names, values, strict=True))
        return instance


class Badge(models.Model):
    """A unique field that may be NULL: NULLs never equal each other, so get(code=None)
    may match any number of rows; only a value makes the lookup unique."""

    code = models.CharField(max_length=32, unique=True, null=True, blank=True)

    objects = CachedManager(lookups=["code"])

    def __str__(self) -> str:
        return self.code or "(no code)"


# -- foreign keys the database acts on -----------------------------------------------
# Django 6.1's DB_CASCADE and DB_SET_NULL: deleting a shelf deletes its books and their
# bookmarks, and empties its loans, in the database, with no statement of Django's for
# them. Before 6.1 these are Django's own CASCADE and SET_NULL.
DB_CASCADE: Any = getattr(models, "DB_CASCADE", models.CASCADE)
DB_SET_NULL: Any = getattr(models, "DB_SET_NULL", models.SET_NULL)


class Shelf(models.Model):
    """Not cached itself: its deletes still change cached rows."""

    name = models.CharField(max_length=100)

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    shelf = models.ForeignKey(Shelf, on_delete=DB_CASCADE, related_name="books")
    title = models.CharField(max_length=100)

    objects = CachedManager()

    def __str__(self) -> str:
        return self.title


class Bookmark(models.Model):
    book = models.ForeignKey(Book, on_delete=DB_CASCADE, related_name="bookmarks")
    page = models.IntegerField(default=1)

    objects = CachedManager()

    def __str__(self) -> str:
        return f"{self.book_id}:{self.page}"


class Loan(models.Model):
    shelf = models.ForeignKey(Shelf, null=True, on_delete=DB_SET_NULL, related_name="loans")
    who = models.CharField(max_length=100)

    objects = CachedManager()

    def __str__(self) -> str:
        return self.who


# -- every stored field type -------------------------------------------------------------


class Specimen(models.Model):
    """One field of each kind Django stores, every one nullable: what L2 holds of a row is
    encoded per field type (tiered_cache.serialization), and each must come back as the
    ORM gives it."""

    small = models.SmallIntegerField(null=True)
    big = models.BigIntegerField(null=True)
    positive = models.PositiveIntegerField(null=True)
    positive_small = models.PositiveSmallIntegerField(null=True)
    positive_big = models.PositiveBigIntegerField(null=True)
    ratio = models.FloatField(null=True)
    amount = models.DecimalField(max_digits=20, decimal_places=6, null=True)
    day = models.DateField(null=True)
    moment = models.DateTimeField(null=True)
    clock = models.TimeField(null=True)
    span = models.DurationField(null=True)
    token = models.UUIDField(null=True)
    address = models.GenericIPAddressField(null=True)
    flag = models.BooleanField(null=True)
    slug = models.SlugField(null=True)  # noqa: DJ001 (None and "" both stored)
    url = models.URLField(null=True)  # noqa: DJ001
    text = models.TextField(null=True)  # noqa: DJ001
    blob = models.BinaryField(null=True)
    data = models.JSONField(null=True)
    document = models.ForeignKey(
        Document, on_delete=models.SET_NULL, null=True, related_name="specimens"
    )
    code = models.ForeignKey(Code, on_delete=models.SET_NULL, null=True, related_name="specimens")

    objects = CachedManager()

    def __str__(self) -> str:
        return f"specimen {self.pk}"


# -- lookup values of the types keys are hardest to make injective for ----------------------


class Ledger(models.Model):
    """Unique lookups on a decimal wider than Python's default 28 digits, bytes (given as
    bytes, memoryview or bytearray) and a JSON value (which the tiers do not key: such a
    read goes to the database)."""

    amount = models.DecimalField(max_digits=40, decimal_places=18, unique=True)
    digest = models.BinaryField(unique=True, null=True)
    doc = models.JSONField(unique=True, null=True)

    objects = CachedManager(lookups=["amount", "digest", "doc"])

    def __str__(self) -> str:
        return f"ledger {self.amount}"
