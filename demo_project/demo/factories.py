"""factory-boy factories for the demo models; tests and load_demo_data share them."""

import uuid
from decimal import Decimal

import factory
from django.utils import timezone
from factory.django import DjangoModelFactory, Password

from .models import FlowInstance, FlowStatus, GlobalModel, Model, PlainFlowInstance, Provider, User

TENANTS = 10


class UserFactory(DjangoModelFactory):
    class Meta:
        model = User

    username = factory.Sequence(lambda n: f"user{n:05d}")
    email = factory.LazyAttribute(lambda o: f"{o.username}@example.com")
    password = Password("password")
    first_name = factory.Faker("first_name")
    last_name = factory.Faker("last_name")
    role = User.Role.USER
    quota_usd = factory.Sequence(lambda n: None if n % 5 == 0 else Decimal(10 + n % 90))
    used_usd = factory.Sequence(lambda n: Decimal(n % 1000) / 100)
    model_capability_settings = factory.Sequence(
        lambda n: {"gpt-4o": {"vision": n % 2 == 0}} if n % 3 == 0 else {}
    )


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
    default_tiered_pricing = factory.LazyFunction(
        lambda: {"tiers": [{"up_to": 1_000_000, "input": "2.50", "output": "10.00"}]}
    )
    default_price_per_request = Decimal("0.002")
    is_active = True


class ModelFactory(DjangoModelFactory):
    class Meta:
        model = Model

    provider = factory.SubFactory(ProviderFactory)
    global_model = factory.SubFactory(GlobalModelFactory)
    provider_model_name = factory.LazyAttribute(
        lambda o: f"{o.provider.name}/{o.global_model.name}"
    )
    provider_model_aliases = factory.LazyAttribute(lambda o: [o.global_model.name])
    price_per_request = Decimal("0.0025")
    supports_streaming = True
    supports_function_calling = True
    config = factory.LazyFunction(lambda: {"timeout_s": 60})


class BaseFlowInstanceFactory(DjangoModelFactory):
    # Sessions are numbered across all tenants, so (tenant, session) never repeats.
    tenant_id = factory.Sequence(lambda n: f"tenant-{n % TENANTS:02d}")
    session_id = factory.Sequence(lambda n: f"session-{n:06d}")
    flow_id = factory.LazyFunction(uuid.uuid4)
    current_step = factory.Sequence(lambda n: n % 7)
    # Mostly active, as in production; the rest are finished.
    status = factory.Iterator(
        [FlowStatus.ACTIVE] * 8 + [FlowStatus.COMPLETED, FlowStatus.CANCELLED]
    )
    context = factory.Sequence(lambda n: {"channel": ("web", "app", "api")[n % 3], "turns": n % 11})
    completed_at = factory.LazyAttribute(
        lambda o: None if o.status == FlowStatus.ACTIVE else timezone.now()
    )


class FlowInstanceFactory(BaseFlowInstanceFactory):
    class Meta:
        model = FlowInstance


class PlainFlowInstanceFactory(BaseFlowInstanceFactory):
    class Meta:
        model = PlainFlowInstance
