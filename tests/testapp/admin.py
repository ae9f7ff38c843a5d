"""The test app's admin: its service models with tiered_cache's flush actions, and one
uncached model without them (tests/test_admin.py, tests/test_browser.py)."""

from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin

from tiered_cache.admin import CacheAdminMixin

from .models import Flow, GlobalModel, PlainFlow, Provider, ProviderModel, User


@admin.register(User)
class UserAdmin(CacheAdminMixin, DjangoUserAdmin):
    list_display = ("username", "email", "first_name", "is_active", "is_staff")
    search_fields = ("username", "email", "first_name", "last_name")


@admin.register(Provider)
class ProviderAdmin(CacheAdminMixin, admin.ModelAdmin):
    list_display = ("name", "display_name", "is_active")
    search_fields = ("name", "display_name")


@admin.register(GlobalModel)
class GlobalModelAdmin(CacheAdminMixin, admin.ModelAdmin):
    list_display = ("name", "display_name", "is_active")
    search_fields = ("name", "display_name")


@admin.register(ProviderModel)
class ProviderModelAdmin(CacheAdminMixin, admin.ModelAdmin):
    list_display = ("provider_model_name", "provider", "global_model", "is_active")
    list_select_related = ("provider", "global_model")


class FlowAdminBase(admin.ModelAdmin):
    list_display = ("tenant_id", "session_id", "status", "current_step")
    search_fields = ("tenant_id", "session_id")


@admin.register(Flow)
class FlowAdmin(CacheAdminMixin, FlowAdminBase):
    pass


@admin.register(PlainFlow)
class PlainFlowAdmin(FlowAdminBase):
    pass
