"""App config: system checks, invalidation receivers and fork safety, set up in ready()."""

from __future__ import annotations

import atexit
import os

from django.apps import AppConfig
from django.core import checks


class TieredCacheConfig(AppConfig):
    name = "tiered_cache"
    verbose_name = "Tiered cache"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import setting_changed
        from django.db import connections
        from django.db.backends.signals import connection_created

        from . import checks as tc_checks
        from . import transactions
        from .conf import conf
        from .serialization import forget_mac_key

        checks.register(tc_checks.check_settings, checks.Tags.caches)
        checks.register(tc_checks.check_lookups, checks.Tags.models)

        # Every write statement on every connection is seen, whatever runs it.
        connection_created.connect(transactions.install, dispatch_uid="tiered_cache:watch")
        for conn in connections.all(initialized_only=True):
            transactions.install(conn)

        setting_changed.connect(forget_mac_key, dispatch_uid="tiered_cache:secret_key")
        setting_changed.connect(conf.forget, dispatch_uid="tiered_cache:settings")
        setting_changed.connect(_key_space_changed, dispatch_uid="tiered_cache:key_space")
        setting_changed.connect(
            transactions.forget_databases, dispatch_uid="tiered_cache:databases"
        )
        os.register_at_fork(after_in_child=_after_fork)
        atexit.register(_at_exit)


def _key_space_changed(setting: str, **kwargs: object) -> None:
    """CACHES or TIERED_CACHE changed (override_settings in tests): key names anew."""
    if setting in ("CACHES", "TIERED_CACHE"):
        from .groups import forget
        from .registry import reset_registry

        forget()
        reset_registry()


def _at_exit() -> None:
    """Stop the listener before the interpreter (and the database) go away under it."""
    from .bus import bus

    bus.stop()


def _after_fork() -> None:
    """A forked child (gunicorn --preload, Celery prefork) starts with an empty L1, its own
    Redis connections and its own listener, started on its first read. Every lock is made
    anew: the parent may have forked while another of its threads held one."""
    import sys
    import threading

    from . import groups, invalidation, reads, registry, transactions
    from .breaker import breaker
    from .bus import bus
    from .tiers.local import local_tier
    from .tiers.remote import fresh_token, redis_tier

    local_tier._lock = threading.Lock()
    breaker._lock = threading.Lock()
    redis_tier._lock = threading.Lock()
    reads._flights_lock = threading.Lock()
    registry._registry_lock = threading.Lock()
    groups._lock = threading.Lock()
    transactions._open_lock = threading.Lock()
    transactions._open[0] = 0  # the parent's transactions are not the child's
    # Optional front ends: renew their locks only if this process loaded them.
    metrics = sys.modules.get("tiered_cache.metrics")
    if metrics is not None:
        metrics._lock = threading.Lock()
    ops = sys.modules.get("tiered_cache.ops")
    if ops is not None:
        ops._publish_lock = threading.Lock()
        ops._publisher_lock = threading.Lock()
        ops.l2_latency._lock = threading.Lock()
    invalidation._outbox.lock = threading.Lock()
    bus.after_fork()
    local_tier.clear()
    redis_tier._client = None
    redis_tier._local = threading.local()
    breaker.reset()
    reads._flights.clear()
    fresh_token.renew()
    invalidation.origin["id"] = fresh_token()
