"""App config: system checks, invalidation receivers and fork safety, set up in ready()."""

from __future__ import annotations

import atexit
import os

from django.apps import AppConfig, apps
from django.core import checks
from django.db.models.signals import post_delete, post_save


class TieredCacheConfig(AppConfig):
    name = "tiered_cache"
    verbose_name = "Tiered cache"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import checks as tc_checks
        from .invalidation import _caches_for, on_delete, on_save

        checks.register(tc_checks.check_settings, checks.Tags.caches)
        checks.register(tc_checks.check_lookups, checks.Tags.models)

        # Proxies and multi-table children of a cached model write its rows too.
        for model in apps.get_models():
            if _caches_for(model):
                uid = f"tiered_cache:{model._meta.label_lower}"
                post_save.connect(on_save, sender=model, dispatch_uid=uid, weak=False)
                post_delete.connect(on_delete, sender=model, dispatch_uid=uid, weak=False)

        from django.core.signals import setting_changed

        from .serialization import forget_mac_key

        from .conf import conf

        setting_changed.connect(forget_mac_key, dispatch_uid="tiered_cache:secret_key")
        setting_changed.connect(conf.forget, dispatch_uid="tiered_cache:settings")
        os.register_at_fork(after_in_child=_after_fork)
        atexit.register(_at_exit)


def _at_exit() -> None:
    """Stop the listener before the interpreter (and the database) go away under it."""
    from .bus import bus

    bus.stop()


def _after_fork() -> None:
    """A forked child (gunicorn --preload, Celery prefork) starts with an empty L1, its own
    Redis connections and its own listener, started on its first read. Every lock is made
    anew: the parent may have forked while another of its threads held one."""
    import threading

    from . import invalidation, reads
    from .breaker import breaker
    from .bus import bus
    from .tiers.local import local_tier
    from .tiers.remote import fresh_token, redis_tier

    local_tier._lock = threading.Lock()
    breaker._lock = threading.Lock()
    redis_tier._lock = threading.Lock()
    reads._flights_lock = threading.Lock()
    invalidation._outbox.lock = threading.Lock()
    bus.after_fork()
    local_tier.clear()
    redis_tier._client = None
    redis_tier._local = threading.local()
    breaker.reset()
    reads._flights.clear()
    fresh_token.renew()
    invalidation.origin["id"] = fresh_token()
