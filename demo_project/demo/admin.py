from django.contrib import admin
from django.contrib.auth.admin import UserAdmin as DjangoUserAdmin

from tiered_cache.admin import CacheAdminMixin

from .models import FlowInstance, GlobalModel, Model, PlainFlowInstance, Provider, User


@admin.register(User)
class UserAdmin(CacheAdminMixin, DjangoUserAdmin):
    list_display = (
        "username",
        "email",
        "role",
        "is_active",
        "is_staff",
        "quota_usd",
        "used_usd",
        "last_login_at",
    )
    list_filter = (*DjangoUserAdmin.list_filter, "role")
    search_fields = ("username", "email", "first_name", "last_name")
    fieldsets = (
        *DjangoUserAdmin.fieldsets,
        (
            "Usage",
            {
                "fields": (
                    "role",
                    "quota_usd",
                    "used_usd",
                    "model_capability_settings",
                    "last_login_at",
                )
            },
        ),
    )
    add_fieldsets = (
        (None, {"classes": ("wide",), "fields": ("username", "email", "password1", "password2")}),
    )


@admin.register(Provider)
class ProviderAdmin(CacheAdminMixin, admin.ModelAdmin):
    list_display = ("name", "display_name", "is_active")
    list_filter = ("is_active",)
    search_fields = ("name", "display_name")
    ordering = ("name",)


@admin.register(GlobalModel)
class GlobalModelAdmin(CacheAdminMixin, admin.ModelAdmin):
    list_display = ("name", "display_name", "default_price_per_request", "is_active", "updated_at")
    list_filter = ("is_active",)
    search_fields = ("name", "display_name")
    ordering = ("name",)


@admin.register(Model)
class ModelAdmin(CacheAdminMixin, admin.ModelAdmin):
    list_display = (
        "provider_model_name",
        "provider",
        "global_model",
        "price_per_request",
        "is_active",
        "is_available",
    )
    list_filter = ("provider", "is_active", "is_available")
    list_select_related = ("provider", "global_model")
    search_fields = ("provider_model_name", "provider__name", "global_model__name")
    autocomplete_fields = ("provider", "global_model")


class FlowInstanceAdminBase(admin.ModelAdmin):
    list_display = (
        "tenant_id",
        "session_id",
        "status",
        "current_step",
        "started_at",
        "completed_at",
    )
    list_filter = ("status", "tenant_id")
    search_fields = ("tenant_id", "session_id", "flow_id")
    ordering = ("tenant_id", "session_id")


@admin.register(FlowInstance)
class FlowInstanceAdmin(CacheAdminMixin, FlowInstanceAdminBase):
    pass


@admin.register(PlainFlowInstance)
class PlainFlowInstanceAdmin(FlowInstanceAdminBase):
    pass
