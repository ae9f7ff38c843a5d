"""App config: system checks, the connection watcher, and the wiring between layers."""

from __future__ import annotations

import atexit

from django.apps import AppConfig
from django.core import checks
from django.core.signals import setting_changed
from django.db import connections
from django.db.backends.signals import connection_created

from . import capture, groups, keys, registry
from .conf import conf
from .serialization import forget_mac_key
from .tiers.remote import redis_tier


class TieredCacheConfig(AppConfig):
    name = "tiered_cache"
    verbose_name = "Tiered cache"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # Imported here, as Django asks of anything that reaches models: these modules
        # import the outbox model, which cannot load before the app registry is ready.
        from . import bus, invalidation, reporting, transactions
        from . import checks as tc_checks

        checks.register(tc_checks.check_settings, checks.Tags.caches)
        checks.register(tc_checks.check_lookups, checks.Tags.models)

        # Every write statement on every connection is seen, whatever runs it.
        connection_created.connect(transactions.install, dispatch_uid="tiered_cache:watch")
        for conn in connections.all(initialized_only=True):
            transactions.install(conn)

        # Lower layers call up through these, never by import: the bus starts the
        # statistics publisher with its listener, and an invalidation that went to the
        # outbox makes the bus stop trusting the tiers until it is delivered.
        if reporting.publisher.start not in bus.bus.on_start:
            bus.bus.on_start.append(reporting.publisher.start)
        if bus.bus.undelivered not in invalidation.undelivered_hooks:
            invalidation.undelivered_hooks.append(bus.bus.undelivered)

        def key_space_changed(setting: str, **kwargs: object) -> None:
            """CACHES or TIERED_CACHE changed (override_settings in tests): key names anew;
            DATABASES: groups anew."""
            if setting in ("CACHES", "TIERED_CACHE"):
                redis_tier.settings_changed()
                keys.forget()
                groups.forget()
                capture.forget()
                registry.reset_registry()
            elif setting == "DATABASES":
                groups.forget()  # which aliases share a database, which are replicas

        setting_changed.connect(forget_mac_key, dispatch_uid="tiered_cache:secret_key")
        setting_changed.connect(conf.forget, dispatch_uid="tiered_cache:settings")
        setting_changed.connect(key_space_changed, weak=False, dispatch_uid="tiered_cache:keys")
        setting_changed.connect(
            transactions.forget_databases, dispatch_uid="tiered_cache:databases"
        )
        # Stop the listener before the interpreter (and the database) go away under it.
        atexit.register(bus.bus.stop)
