"""factory-boy factories for the test app's models."""

import uuid

import factory
from factory.django import DjangoModelFactory, Password

from .models import (
    Account,
    CachedUser,
    Code,
    Document,
    Flow,
    FlowStatus,
    Gadget,
    GlobalModel,
    ItalianRestaurant,
    Item,
    Label,
    Note,
    Owner,
    Place,
    Provider,
    ProviderModel,
    Restaurant,
    Shipment,
    Tenant,
    User,
)

TENANTS = 10


class UserFactory(DjangoModelFactory):
    class Meta:
        model = User

    username = factory.Sequence(lambda n: f"user{n:05d}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = Password("password")
    first_name = factory.Sequence(lambda n: f"First{n}")
    last_name = factory.Sequence(lambda n: f"Last{n}")
    preferences = factory.Sequence(lambda n: {"theme": ("light", "dark")[n % 2]})


class ProviderFactory(DjangoModelFactory):
    class Meta:
        model = Provider

    name = factory.Sequence(lambda n: f"provider-{n}")
    display_name = factory.LazyAttribute(lambda o: o.name.replace("-", " ").title())
    is_active = True


class GlobalModelFactory(DjangoModelFactory):
    class Meta:
        model = GlobalModel

    name = factory.Sequence(lambda n: f"model-{n}")
    display_name = factory.LazyAttribute(lambda o: o.name.upper())
    supported_capabilities = factory.LazyFunction(lambda: ["chat", "streaming"])
    config = factory.LazyFunction(lambda: {"context_window": 128_000})
    is_active = True


class ProviderModelFactory(DjangoModelFactory):
    class Meta:
        model = ProviderModel

    provider = factory.SubFactory(ProviderFactory)
    global_model = factory.SubFactory(GlobalModelFactory)
    provider_model_name = factory.LazyAttribute(
        lambda o: f"{o.provider.name}/{o.global_model.name}"
    )
    is_active = True


class FlowFactory(DjangoModelFactory):
    class Meta:
        model = Flow

    # Sessions are numbered across all tenants, so (tenant, session) never repeats.
    tenant_id = factory.Sequence(lambda n: f"tenant-{n % TENANTS:02d}")
    session_id = factory.Sequence(lambda n: f"session-{n:06d}")
    flow_id = factory.LazyFunction(uuid.uuid4)
    current_step = factory.Sequence(lambda n: n % 7)
    status = FlowStatus.ACTIVE
    context = factory.Sequence(lambda n: {"channel": ("web", "app", "api")[n % 3], "turns": n % 11})


class TenantFactory(DjangoModelFactory):
    class Meta:
        model = Tenant

    name = factory.Sequence(lambda n: f"tenant-{n}")


class AccountFactory(DjangoModelFactory):
    class Meta:
        model = Account

    tenant = factory.SubFactory(TenantFactory)
    email = factory.Sequence(lambda n: f"account{n}@example.com")
    balance = 0
    data = factory.LazyFunction(dict)
    tags = factory.LazyFunction(list)


class CachedUserFactory(DjangoModelFactory):
    class Meta:
        model = CachedUser

    username = factory.Sequence(lambda n: f"cached-user{n:05d}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = Password("password")
    is_active = True


class PlaceFactory(DjangoModelFactory):
    class Meta:
        model = Place

    name = factory.Sequence(lambda n: f"place-{n}")
    address = factory.Sequence(lambda n: f"{n} Main Street")


class RestaurantFactory(PlaceFactory):
    class Meta:
        model = Restaurant

    serves_pizza = False


class ItalianRestaurantFactory(RestaurantFactory):
    class Meta:
        model = ItalianRestaurant

    has_oven = False


class NoteFactory(DjangoModelFactory):
    class Meta:
        model = Note

    text = factory.Sequence(lambda n: f"note {n}")


class OwnerFactory(DjangoModelFactory):
    class Meta:
        model = Owner

    name = factory.Sequence(lambda n: f"owner-{n}")


class LabelFactory(DjangoModelFactory):
    class Meta:
        model = Label

    name = factory.Sequence(lambda n: f"label-{n}")


class ItemFactory(DjangoModelFactory):
    class Meta:
        model = Item

    name = factory.Sequence(lambda n: f"item-{n}")
    owner_cascade = factory.SubFactory(OwnerFactory)


class DocumentFactory(DjangoModelFactory):
    class Meta:
        model = Document

    title = factory.Sequence(lambda n: f"document {n}")


class CodeFactory(DjangoModelFactory):
    class Meta:
        model = Code

    code = factory.Sequence(lambda n: f"C{n:05d}")
    description = factory.Sequence(lambda n: f"code {n}")


class GadgetFactory(DjangoModelFactory):
    class Meta:
        model = Gadget

    name = factory.Sequence(lambda n: f"gadget-{n}")


class ShipmentFactory(DjangoModelFactory):
    class Meta:
        model = Shipment

    tenant_code = factory.Sequence(lambda n: f"T{n % 3}")
    number = factory.Sequence(lambda n: n)
    note = ""
