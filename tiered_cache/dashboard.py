"""Everything the dashboard and `manage.py tiered_cache stats` show, gathered in one call:
per model its lookups, entries in each tier, counters of all processes and last warmup;
the breaker, the bus, the last cleanup and the outbox."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

from django.db import models

from .breaker import breaker
from .bus import bus
from .maintenance import by_group, last_runs
from .models import PendingInvalidation
from .registry import cached_models, declared_lookups
from .reporting import cluster_stats, process_name, publish_stats, stats, tier_split
from .tiers.local import local_tier
from .tiers.remote import Unavailable, redis_tier

__all__ = ["l2_entry_count", "l2_entry_counts", "overview"]

T = TypeVar("T")

_TOKEN = re.compile(rb"[\w:-]+")


def l2_entry_counts(selected: Sequence[type[models.Model]] | None = None) -> dict[str, int]:
    """Per model label, the L2 entries stored in the current generation and not expired
    (a replaced row's entry counts until cleanup or expiry): read from the indexes the
    fills keep, two round trips whatever the size of the database."""
    groups = [caches for caches in by_group(selected).values()]
    # One generation per shard of each group (one shard but on a cluster).
    shards = [(caches, shard) for caches in groups for shard in caches[0].home.shards]
    gens = redis_tier.call(partial(_get_all, [shard.gen_key for _, shard in shards]))
    now_ms = int(time.time() * 1000)
    queries: list[tuple[str, str]] = []
    for (caches, shard), gen in zip(shards, gens, strict=True):
        for label in dict.fromkeys(c.label for c in caches):
            # A generation is a token; anything else is junk no fill was stored under.
            if isinstance(gen, bytes) and _TOKEN.fullmatch(gen):
                queries.append((label, shard.index_key(label, gen)))
    found = redis_tier.call(partial(_count_all, [key for _, key in queries], now_ms))
    out = {c.label: 0 for caches in groups for c in caches}
    for (label, _), n in zip(queries, found, strict=True):
        out[label] += int(n) if isinstance(n, int) else 0
    chosen = cached_models() if selected is None else selected
    wanted = {m._meta.label_lower for m in chosen}
    return {label: n for label, n in out.items() if label in wanted}


def _get_all(keys: list[str]) -> list[Any]:
    pipe = redis_tier.client.pipeline(transaction=False)
    for k in keys:
        pipe.get(k)
    return pipe.execute(raise_on_error=False)


def _count_all(indexes: list[str], now_ms: int) -> list[Any]:
    pipe = redis_tier.client.pipeline(transaction=False)
    for k in indexes:
        pipe.zcount(k, now_ms, "+inf")
    return pipe.execute(raise_on_error=False)


def l2_entry_count(model: type[models.Model]) -> int:
    return l2_entry_counts([model]).get(model._meta.label_lower, 0)


def overview(selected: Sequence[type[models.Model]] | None = None) -> dict[str, Any]:
    """Per model: lookups, L1 entries here, L2 entries, counters of all processes (or of
    this one while Redis is away), tier split, last warmup; plus breaker, bus, last
    cleanup and the outbox. Never raises Unavailable: it reports it in "redis_error"."""
    chosen = list(selected) if selected is not None else cached_models()
    errors: list[str] = []

    def attempt(fn: Callable[[], T], default: T) -> T:
        try:
            return fn()
        except Unavailable as exc:
            if not errors:
                errors.append(str(exc) or "unavailable")
            return default

    attempt(publish_stats, None)
    local = stats()
    cluster = attempt(lambda: cluster_stats(chosen), None)
    l2 = attempt(lambda: l2_entry_counts(chosen), None)
    runs: dict[str, Any] = attempt(last_runs, {"cleanup": None, "warmup": {}})
    rows = []
    for model in chosen:
        label = model._meta.label_lower
        mine = local.get(label, {})
        counters = cluster[label] if cluster is not None else mine
        split = tier_split(counters)
        total = sum(n for _, n in split)
        rows.append(
            {
                "model": model,
                "label": model._meta.label,
                "label_lower": label,
                "verbose_name_plural": str(model._meta.verbose_name_plural),
                "lookups": declared_lookups(model),
                "l1_entries": mine.get("l1_entries", 0),
                "l2_entries": None if l2 is None else l2.get(label, 0),
                "counters": counters,
                "scope": "all processes" if cluster is not None else "this process",
                "processes": counters.get("processes"),
                "since": counters.get("since"),
                "tiers": [(tier, n, n / total if total else 0.0) for tier, n in split],
                "reads": total,
                "hit_ratio": (total - counters.get("misses", 0)) / total if total else None,
                "last_warmup": runs["warmup"].get(label),
            }
        )
    try:
        outbox: int | None = PendingInvalidation.objects.count()
    except Exception:  # the dashboard still shows the cache without the database
        outbox = None
    return {
        "models": rows,
        "redis_error": errors[0] if errors else None,
        "breaker": breaker.state,
        "breaker_opened": breaker.opened_count,
        "bus": bus.state(),
        "bus_latency": bus.last_latency,
        "last_cleanup": runs["cleanup"],
        "outbox": outbox,
        "l1_total": len(local_tier),
        "process": process_name(),
    }
