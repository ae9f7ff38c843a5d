"""Admin: flush actions for cached models, the outbox, and the cache dashboard.

``CacheAdminMixin`` goes in front of any ModelAdmin of a cached model. The dashboard hangs
off the outbox's admin (so it needs no URLconf entry of its own) and the admin index links
to it (``admin.site.index_template``, unless the project set its own index template).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

from django.contrib import admin, messages
from django.contrib.auth import get_permission_codename
from django.core import checks
from django.core.exceptions import ImproperlyConfigured, PermissionDenied
from django.db import models
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.text import capfirst

from . import maintenance
from .bus import bus
from .dashboard import overview
from .inspection import CannotInspect, Inspection, inspect_entry
from .models import PendingInvalidation
from .registry import (
    UnknownModel,
    cached_managers,
    cached_models,
    declared_lookups,
    resolve_models,
)
from .reporting import publisher
from .tiers.remote import Unavailable

__all__ = ["CacheAdminMixin", "PendingInvalidationAdmin"]

# Tier colours of the chart (L1, L2, remembered absence, database).
TIER_COLORS = {"L1": "#2e7d32", "L2": "#1565c0", "negative": "#9e9e9e", "database": "#e65100"}
# The trend chart's: reads that skipped the tiers too (a transaction that wrote the model,
# a lookup that is not unique), and the hit ratio's line.
TREND_COLORS = {**TIER_COLORS, "bypassed": "#8d6e63"}
RATIO_COLOR = "#212121"
# The trend chart's size (SVG user units) and margins around its plot.
_CHART_W, _CHART_H = 640, 150
_LEFT, _RIGHT, _TOP, _BOTTOM = 52, 44, 10, 22
_NAMES_SHOWN = 5


class CacheAdminMixin:
    """Adds "Flush selected … from cache" and "Flush all … cache entries" to a ModelAdmin,
    for users with change permission. Put it first: ``class A(CacheAdminMixin, ModelAdmin)``.
    An ``actions`` list of the admin's own keeps its actions and gains these two;
    ``actions = None`` still turns actions off."""

    cache_actions = ("flush_selected_from_cache", "flush_all_from_cache")
    actions: Any = cache_actions

    model: type[models.Model]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        mro = cls.__mro__
        if admin.ModelAdmin in mro and mro.index(admin.ModelAdmin) < mro.index(CacheAdminMixin):
            # ModelAdmin's check() would hide the mixin's (a model without a cached manager
            # would pass the checks and fail at its first flush).
            others = ", ".join(b.__name__ for b in cls.__bases__ if b is not CacheAdminMixin)
            raise ImproperlyConfigured(
                f"{cls.__qualname__}: put CacheAdminMixin before ModelAdmin in its bases, "
                f"e.g. class {cls.__name__}(CacheAdminMixin, {others})."
            )
        # The actions the admin would have without the mixin: its own, or inherited.
        for klass in cls.__mro__:
            if klass is not CacheAdminMixin and "actions" in klass.__dict__:
                current = klass.__dict__["actions"]
                break
        else:  # pragma: no cover - ModelAdmin always defines actions
            current = ()
        if current is not None:
            cls.actions = [*current, *(a for a in cls.cache_actions if a not in current)]

    @admin.action(
        permissions=["change"],
        description="Flush selected %(verbose_name_plural)s from cache",
    )
    def flush_selected_from_cache(self, request: HttpRequest, queryset: Any) -> None:
        objs = list(queryset)
        maintenance.invalidate_rows(self.model, [o.pk for o in objs])
        opts = self.model._meta
        noun = opts.verbose_name if len(objs) == 1 else opts.verbose_name_plural
        names = ", ".join(str(o) for o in objs[:_NAMES_SHOWN])
        if len(objs) > _NAMES_SHOWN:
            names += f" and {len(objs) - _NAMES_SHOWN} more"
        self.message_user(  # type: ignore[attr-defined]  # the ModelAdmin mixed into has it
            request,
            f"Flushed {len(objs)} {noun} from the cache in every process: {names}.",
            messages.SUCCESS,
        )

    @admin.action(permissions=["change"], description="Flush all %(verbose_name)s cache entries")
    def flush_all_from_cache(self, request: HttpRequest, queryset: Any) -> None:
        try:
            (label,) = maintenance.flush([self.model])
        except UnknownModel as exc:  # no cached manager, and the check (E100) was skipped
            self.message_user(request, str(exc), messages.ERROR)  # type: ignore[attr-defined]
            return
        self.message_user(  # type: ignore[attr-defined]  # the ModelAdmin mixed into has it
            request,
            f"Flushed all {self.model._meta.verbose_name} cache entries ({label}, every "
            "lookup, every process).",
            messages.SUCCESS,
        )

    def check(self, **kwargs: Any) -> list[checks.CheckMessage]:
        # The ModelAdmin mixed into has check(); the mixin alone does not.
        errors: list[checks.CheckMessage] = super().check(**kwargs)  # type: ignore[misc]
        if not cached_managers(self.model):
            errors.append(
                checks.Error(
                    f"{type(self).__name__} uses CacheAdminMixin, but "
                    f"{self.model._meta.label} has no cached manager.",
                    hint="Give the model a CachedManager, or drop the mixin.",
                    obj=type(self),
                    id="tiered_cache.E100",
                )
            )
        return errors


# ModelAdmin[...] needs django_stubs_ext.monkeypatch() at run time: not a dependency of ours.
class PendingInvalidationAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The outbox, read-only (deleting a row would lose an invalidation), and the host of
    the cache dashboard at ``<admin>/tiered_cache/pendinginvalidation/dashboard/``."""

    list_display = ("created_at", "model_label", "flush", "rows")
    list_filter = ("model_label", "flush")
    ordering = ("-id",)
    change_list_template = "tiered_cache/admin/outbox_change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[Any]:
        view = self.admin_site.admin_view(self.dashboard_view)
        return [path("dashboard/", view, name="tiered_cache_dashboard"), *super().get_urls()]

    # -- the dashboard (staff only: admin_view; CSRF: admin_view's csrf_protect) ------
    def dashboard_view(self, request: HttpRequest) -> HttpResponse:
        if request.method == "POST":
            self._dashboard_post(request)
            return HttpResponseRedirect(request.path)
        publisher.start()
        bus.ensure_started()
        visible = [m for m in cached_models() if _can_view(request, m)]
        view = overview(visible)
        rows = [_row_context(request, row) for row in view["models"]]
        context = {
            **self._inspect_context(request, visible),
            **self.admin_site.each_context(request),
            "title": "Cache dashboard",
            "subtitle": None,
            "view": view,
            "rows": rows,
            "last_cleanup_at": _at(view["last_cleanup"]),
            "can_flush_all": all(_can_change(request, m) for m in cached_models()),
            "colors": TIER_COLORS,
            "quiet_models": [
                r["label"] for r in rows if r["trend"] is not None and r["trend_chart"] is None
            ],
            "trend_colors": TREND_COLORS,
            "ratio_color": RATIO_COLOR,
            "chart": {"width": _CHART_W, "height": _CHART_H},
            "outbox_url": reverse(
                f"{self.admin_site.name}:tiered_cache_pendinginvalidation_changelist"
            ),
        }
        return TemplateResponse(request, "tiered_cache/admin/dashboard.html", context)

    def _inspect_context(
        self, request: HttpRequest, visible: list[type[models.Model]]
    ) -> dict[str, Any]:
        """The inspect form (a GET: it changes nothing), and its answer when asked: for
        users who may view the model, as the dashboard lists it."""
        wanted = request.GET.get("inspect")
        text = request.GET.get("lookup", "").strip()
        out: dict[str, Any] = {
            "inspect_models": [(m._meta.label, ", ".join(declared_lookups(m))) for m in visible],
            "inspect_label": wanted or "",
            "inspect_lookup": text,
            "inspection": None,
            "inspect_error": None,
        }
        if wanted is None:
            return out
        try:
            (model,) = resolve_models([wanted])
            if not _can_view(request, model):
                raise PermissionDenied(f"You may not view {model._meta.verbose_name_plural}.")
            found = inspect_entry(model, text)
        except (UnknownModel, CannotInspect) as exc:
            out["inspect_error"] = str(exc)
            return out
        out["inspection"] = found
        out["inspect_tiers"] = _inspect_rows(found)
        out["inspect_diffs"] = found.differences()
        return out

    def _dashboard_post(self, request: HttpRequest) -> None:
        action = request.POST.get("action", "")
        label = request.POST.get("model", "")
        try:
            if action in ("flush", "warmup"):
                (model,) = resolve_models([label])
                _require_change(request, [model])
                if action == "flush":
                    maintenance.flush([model])
                    self.message_user(
                        request,
                        f"Flushed every {model._meta.label} entry (all processes).",
                        messages.SUCCESS,
                    )
                else:
                    self._start_warmup(request, model)
            elif action == "flush_all":
                _require_change(request, cached_models())
                labels = maintenance.flush()
                self.message_user(
                    request,
                    "Flushed every cached model: " + ", ".join(labels) + ".",
                    messages.SUCCESS,
                )
            elif action == "cleanup":
                _require_change(request, cached_models())
                r = maintenance.cleanup()
                gone = r["old_generation"] + r["stale_rows"] + r["old_schema"]
                self.message_user(
                    request,
                    f"Cleanup scanned {r['scanned']} keys and deleted {gone} that could no "
                    f"longer be served; pruned {r['l1_expired']} expired L1 entries here.",
                    messages.SUCCESS,
                )
            else:
                self.message_user(request, f"Unknown action {action!r}.", messages.ERROR)
        except UnknownModel as exc:
            self.message_user(request, str(exc), messages.ERROR)
        except Unavailable as exc:
            self.message_user(
                request, f"Redis is unavailable ({exc}); nothing was done.", messages.ERROR
            )

    def _start_warmup(self, request: HttpRequest, model: type[models.Model]) -> None:
        started = maintenance.start_warmup(model)
        label = model._meta.label
        if started["mode"] == "celery":
            self.message_user(
                request,
                f"Warmup of {label} queued on Celery (task {started['task_id']}); a worker "
                "runs it.",
                messages.SUCCESS,
            )
        else:
            r = started["result"]
            self.message_user(
                request,
                f"Warmup of {label} ran here, in this web process ({started['reason']}): "
                f"stored {r['stored']}, refused {r['refused']}.",
                messages.SUCCESS,
            )


def _require_change(request: HttpRequest, chosen: list[type[models.Model]]) -> None:
    for model in chosen:
        if not _can_change(request, model):
            raise PermissionDenied(f"You may not change {model._meta.verbose_name_plural}.")


def _can_view(request: HttpRequest, model: type[models.Model]) -> bool:
    """The dashboard lists a model only to users who may see its rows in the admin."""
    opts = model._meta
    return any(
        request.user.has_perm(f"{opts.app_label}.{get_permission_codename(action, opts)}")
        for action in ("view", "change")
    )


def _can_change(request: HttpRequest, model: type[models.Model]) -> bool:
    opts = model._meta
    return request.user.has_perm(f"{opts.app_label}.{get_permission_codename('change', opts)}")


def _at(run: dict[str, Any] | None) -> datetime | None:
    return datetime.fromtimestamp(run["at"], UTC) if run else None


def _row_context(request: HttpRequest, row: dict[str, Any]) -> dict[str, Any]:
    """A model's dashboard row, with its chart drawn as SVG rectangles (percent widths)."""
    segments = []
    x = 0.0
    for tier, n, share in row["tiers"]:
        if not n:
            continue
        width = share * 100
        segments.append(
            {
                "tier": tier,
                "count": n,
                "pct": f"{share:.1%}",
                "x": f"{x:.3f}",
                "width": f"{width:.3f}",
                "color": TIER_COLORS[tier],
            }
        )
        x += width
    warm = row["last_warmup"]
    sampled = row.get("l2_sampled")
    return {
        **row,
        "trend_chart": _trend_chart(row["trend"]) if row.get("trend") is not None else None,
        "l2_memory_note": (
            f"Sampled MEMORY USAGE of {sampled} of {row['l2_entries']} entries, scaled to all "
            "of them, plus their indexes"
            if sampled
            else "No entry to sample: the indexes only"
        ),
        "name": capfirst(row["verbose_name_plural"]),
        "dom_id": "tc-" + row["label_lower"].replace(".", "-"),
        "segments": segments,
        "summary": ", ".join(f"{s['tier']} {s['pct']}" for s in segments) or "no reads yet",
        "since_at": datetime.fromtimestamp(row["since"], UTC) if row.get("since") else None,
        "last_warmup_at": _at(warm),
        "hit_ratio_text": "-" if row["hit_ratio"] is None else f"{row['hit_ratio']:.1%}",
        "can_change": _can_change(request, row["model"]),
    }


def _inspect_rows(found: Inspection) -> list[dict[str, Any]]:
    """The inspection's tiers as the dashboard's table shows them."""
    return [
        {
            "id": "tc-inspect-" + t.tier.lower(),
            "title": title,
            "key": key,
            "held": t.held,
            "valid": t.valid,
            "served": found.served_from == t.tier,
            "state": t.state_text(),
            "facts": t.facts,
        }
        for t, title, key in (
            (found.l1, "L1 (this process)", repr(found.l1_key)),
            (found.l2, "L2 (Redis)", found.l2_key or "-"),
        )
    ]


def _nice_ceiling(x: float) -> float:
    """The least of 1, 2, 5 times a power of ten that is at least x (an axis's top)."""
    if x <= 0:
        return 1.0
    power = 10.0 ** math.floor(math.log10(x))
    for step in (1, 2, 5, 10):
        if step * power >= x:
            return step * power
    return 10 * power  # pragma: no cover - the loop ends at 10


def _n(x: float) -> str:
    return f"{x:.2f}"


def _rate(x: float) -> str:
    """Reads per second as people read them: 1,234 / 12.3 / 0.123 / 0.005."""
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3f}".rstrip("0").rstrip(".") if x else "0"


def _trend_chart(series: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A model's last hour as an SVG chart's parts (drawn by the template, no script):
    per minute a column of reads per second stacked by tier, and the hit ratio as a line
    on a 0-100 % axis of its own. None when the hour had no reads."""
    total = sum(p["reads"] for p in series)
    if not total:
        return None
    plot_w = _CHART_W - _LEFT - _RIGHT
    plot_h = _CHART_H - _TOP - _BOTTOM
    bottom = _TOP + plot_h
    col = plot_w / len(series)
    top = _nice_ceiling(max(p["per_second"] for p in series))
    points = []
    for i, p in enumerate(series):
        if not p["reads"]:
            continue
        x = _LEFT + i * col
        y = float(bottom)
        rects = []
        for tier, rate in p["tiers_per_second"].items():
            if rate <= 0:
                continue
            h = rate / top * plot_h
            y -= h
            rects.append(
                {
                    "tier": tier,
                    "x": _n(x + 0.5),
                    "y": _n(y),
                    "width": _n(max(col - 1, 0.5)),
                    "height": _n(h),
                    "color": TREND_COLORS[tier],
                }
            )
        ratio = p["hit_ratio"]
        at = datetime.fromtimestamp(p["at"], UTC).strftime("%H:%M")
        by_tier = ", ".join(
            f"{tier} {_rate(rate)}/s" for tier, rate in p["tiers_per_second"].items() if rate > 0
        )
        points.append(
            {
                "minute": at,
                "rate": f"{p['per_second']:.3f}",
                "ratio": "" if ratio is None else f"{ratio:.4f}",
                "rects": rects,
                "cx": _n(x + col / 2),
                "cy": None if ratio is None else _n(_TOP + plot_h * (1 - ratio)),
                "title": f"{at} UTC: {p['reads']} reads, {_rate(p['per_second'])}/s ({by_tier})"
                + ("" if ratio is None else f", hit ratio {ratio:.1%}"),
            }
        )
    # The ratio's line runs through consecutive minutes with reads; a quiet minute breaks it.
    lines: list[str] = []
    run: list[str] = []
    last = -2
    for i, p in enumerate(series):
        ratio = p["hit_ratio"]
        if ratio is None or i != last + 1:
            if len(run) > 1:
                lines.append(" ".join(run))
            run = []
        if ratio is not None:
            run.append(f"{_n(_LEFT + i * col + col / 2)},{_n(_TOP + plot_h * (1 - ratio))}")
            last = i
    if len(run) > 1:
        lines.append(" ".join(run))
    hits = sum(
        p["counts"]["l1_hits"] + p["counts"]["l2_hits"] + p["counts"]["negative_hits"]
        for p in series
    )
    served = hits + sum(p["counts"]["misses"] for p in series)
    seconds = sum(p["seconds"] for p in series)
    peak = max(p["per_second"] for p in series)
    summary = (
        f"{total:,} reads in the last hour, {total / seconds:.2f}/s on average, peak {peak:.2f}/s"
    )
    if served:
        summary += f"; hit ratio {hits / served:.1%}"
    return {
        "points": points,
        "lines": lines,
        "summary": summary,
        "top_label": f"{top:g}/s",
        "left": _LEFT,
        "right": _CHART_W - _RIGHT,
        "top": _TOP,
        "bottom": bottom,
        "middle": _n(_TOP + plot_h / 2),
        "label_left": _LEFT - 4,
        "label_right": _CHART_W - _RIGHT + 4,
        "label_y": bottom + 15,
        "label_mid_x": _n(_LEFT + plot_w / 2),
    }


if not admin.site.is_registered(PendingInvalidation):
    admin.site.register(PendingInvalidation, PendingInvalidationAdmin)
if admin.site.index_template is None:
    admin.site.index_template = "tiered_cache/admin/index.html"
