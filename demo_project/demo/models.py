"""Models of an LLM gateway: users, providers, models and conversation flows."""

import uuid
from decimal import Decimal

from django.contrib.auth.models import AbstractUser
from django.contrib.auth.models import UserManager as DjangoUserManager
from django.db import models
from django.utils import timezone

from tiered_cache import CachedManager, CachedManagerMixin


class UserManager(CachedManagerMixin, DjangoUserManager):
    cache_lookups = ["email"]


class User(AbstractUser):
    class Role(models.TextChoices):
        USER = "user", "User"
        ADMIN = "admin", "Admin"

    email = models.EmailField("email address", unique=True)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.USER)
    quota_usd = models.DecimalField(
        max_digits=12, decimal_places=4, null=True, blank=True, help_text="Empty means unlimited."
    )
    used_usd = models.DecimalField(max_digits=12, decimal_places=4, default=Decimal("0"))
    model_capability_settings = models.JSONField(default=dict, blank=True)
    last_login_at = models.DateTimeField(null=True, blank=True)

    objects = UserManager()


class Provider(models.Model):
    name = models.CharField(max_length=100, unique=True)
    display_name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)

    objects = CachedManager(lookups=["name"])

    def __str__(self) -> str:
        return self.name


class GlobalModel(models.Model):
    """A model as users name it, whichever provider serves it."""

    name = models.CharField(max_length=100, unique=True)
    display_name = models.CharField(max_length=200)
    supported_capabilities = models.JSONField(default=list, blank=True)
    config = models.JSONField(default=dict, blank=True)
    default_tiered_pricing = models.JSONField(null=True, blank=True)
    default_price_per_request = models.DecimalField(
        max_digits=12, decimal_places=6, null=True, blank=True
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CachedManager(lookups=["name"])

    def __str__(self) -> str:
        return self.name


class Model(models.Model):
    """One provider's offer of a global model, with its own name, prices and abilities."""

    provider = models.ForeignKey(Provider, on_delete=models.CASCADE, related_name="models")
    global_model = models.ForeignKey(
        GlobalModel, on_delete=models.CASCADE, related_name="provider_models"
    )
    provider_model_name = models.CharField(max_length=200)
    provider_model_aliases = models.JSONField(null=True, blank=True)
    is_active = models.BooleanField(default=True)
    is_available = models.BooleanField(default=True)
    price_per_request = models.DecimalField(max_digits=12, decimal_places=6, null=True, blank=True)
    tiered_pricing = models.JSONField(null=True, blank=True)
    # None means "as the global model says".
    supports_vision = models.BooleanField(null=True, blank=True)
    supports_function_calling = models.BooleanField(null=True, blank=True)
    supports_streaming = models.BooleanField(null=True, blank=True)
    supports_extended_thinking = models.BooleanField(null=True, blank=True)
    supports_image_generation = models.BooleanField(null=True, blank=True)
    config = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CachedManager(lookups=[("provider", "global_model")])

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "global_model"], name="demo_model_provider_global_model_uniq"
            ),
        ]

    def __str__(self) -> str:
        return self.provider_model_name


class FlowStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    COMPLETED = "completed", "Completed"
    CANCELLED = "cancelled", "Cancelled"


class BaseFlowInstance(models.Model):
    """The state of one scripted conversation flow in one tenant's session."""

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


class FlowInstance(BaseFlowInstance):
    objects = CachedManager(lookups=[("tenant_id", "session_id")], timeout=3600, l1_timeout=300)


class PlainFlowInstance(BaseFlowInstance):
    """FlowInstance without a cache, so benchmarks can price what caching adds to writes."""

    objects = models.Manager()
