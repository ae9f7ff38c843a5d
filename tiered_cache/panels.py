"""A django-debug-toolbar panel: per request, every cached read (get_cached,
get_many_cached, their async twins, @cached functions) with the tier that served it, why
it bypassed the tiers or went to the database, and its time; and the invalidations the
request issued. Needs the [debug-toolbar] extra; add it to DEBUG_TOOLBAR_PANELS:

    DEBUG_TOOLBAR_PANELS = [*debug_toolbar.settings.PANELS_DEFAULTS,
                            "tiered_cache.panels.TieredCachePanel"]

Recording costs nothing while the panel is off: see tiered_cache.recording."""

from __future__ import annotations

from contextvars import Token
from typing import Any

from debug_toolbar.panels import Panel
from django.http import HttpRequest, HttpResponse

from . import recording

__all__ = ["TieredCachePanel"]

# The nav subtitle's tiers, in this order, under these names.
_SHORT = {
    recording.L1: "L1",
    recording.L2: "L2",
    recording.NEGATIVE: "negative",
    recording.DATABASE: "db",
    recording.BYPASSED: "bypassed",
}


class TieredCachePanel(Panel):
    """What tiered_cache did for this request."""

    title = "Tiered cache"
    nav_title = "TieredCache"
    template = "tiered_cache/panels/tiered_cache.html"
    # The recorder follows the request into async views and sync_to_async threads.
    is_async = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = recording.Recorder()
        self._token: Token[recording.Recorder | None] | None = None

    # -- instrumentation: on for this request's context only ----------------------------
    def enable_instrumentation(self) -> None:
        if self._token is None:
            self._token = recording.start(self.recorder)

    def disable_instrumentation(self) -> None:
        if self._token is not None:
            token, self._token = self._token, None
            recording.stop(token)

    # -- stats -----------------------------------------------------------------------
    def generate_stats(self, request: HttpRequest, response: HttpResponse) -> None:
        self.disable_instrumentation()  # idempotent: nothing after the response is ours
        rec = self.recorder
        calls = [c.as_dict() for c in rec.calls]
        self.record_stats(
            {
                "calls": calls,
                "invalidations": rec.invalidations,
                "reads": rec.reads,
                "totals": {_SHORT[t]: n for t, n in rec.totals.items()},
                "total_ms": sum(c["ms"] for c in calls if c["depth"] == 0),
                "dropped_calls": rec.dropped_calls,
                "dropped_invalidations": rec.dropped_invalidations,
            }
        )

    def generate_server_timing(self, request: HttpRequest, response: HttpResponse) -> None:
        stats = self.get_stats()
        self.record_server_timing(
            "total_ms", f"Tiered cache: {stats.get('reads', 0)} reads", stats.get("total_ms", 0)
        )

    @property
    def nav_subtitle(self) -> str:
        """ "12 reads, 9 L1, 2 L2, 1 db" (the tiers that served any)."""
        stats = self.get_stats()
        reads = stats.get("reads", 0)
        parts = [f"{reads} read{'' if reads == 1 else 's'}"]
        parts += [f"{n} {name}" for name, n in stats.get("totals", {}).items() if n]
        invalidations = len(stats.get("invalidations", ()))
        if invalidations:
            parts.append(f"{invalidations} invalidation{'' if invalidations == 1 else 's'}")
        return ", ".join(parts)
