"""factory-boy factories for the test app's models."""

import factory
from factory.django import DjangoModelFactory, Password

from .models import (
    Account,
    CachedUser,
    Code,
    Document,
    Gadget,
    ItalianRestaurant,
    Item,
    Label,
    Note,
    Owner,
    Place,
    Restaurant,
    Shipment,
    Tenant,
)


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
