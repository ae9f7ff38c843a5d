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
from .keys import TREND_FIELDS
from .maintenance import by_group, last_runs
from .models import PendingInvalidation
from .registry import cached_models, declared_lookups
from .reporting import cluster_stats, process_name, publish_stats, stats, tier_split, trends
from .tiers.local import local_tier
from .tiers.remote import Unavailable, redis_tier

__all__ = ["l2_entry_count", "l2_entry_counts", "l2_sizes", "overview", "trend_series"]

T = TypeVar("T")

_TOKEN = re.compile(rb"[\w:-]+")
# The trend chart's span, and the entries whose size is measured per model.
TREND_MINUTES = 60
MEMORY_SAMPLE = 16
# The tiers a trend shows, with their counters (keys.TREND_FIELDS).
_TREND_TIERS = (
    ("L1", "l1_hits"),
    ("L2", "l2_hits"),
    ("negative", "negative_hits"),
    ("database", "misses"),
    ("bypassed", "bypassed"),
)


def l2_entry_counts(selected: Sequence[type[models.Model]] | None = None) -> dict[str, int]:
    """Per model label, the L2 entries stored in the current generation and not expired
    (a replaced row's entry counts until cleanup or expiry): read from the indexes the
    fills keep, two round trips whatever the size of the database."""
    labels, queries = _current_indexes(selected)
    found = redis_tier.call(
        partial(_count_all, [key for _, key in queries], int(time.time() * 1000))
    )
    out = dict.fromkeys(labels, 0)
    for (label, _), n in zip(queries, found, strict=True):
        out[label] += int(n) if isinstance(n, int) else 0
    return out


def l2_sizes(
    selected: Sequence[type[models.Model]] | None = None, sample: int = MEMORY_SAMPLE
) -> dict[str, dict[str, Any]]:
    """Per model label: "entries" (as l2_entry_counts), and "bytes", the Redis memory they
    take with their indexes: `MEMORY USAGE` of at most `sample` of its entries picked at
    random from its indexes, their mean scaled by its entry count, plus the indexes'
    own (None when no sampled entry was left); "sampled": how many were measured. Three
    round trips whatever the size of the database."""
    labels, queries = _current_indexes(selected)
    # The sample spread over the model's indexes (one per shard: 12 on a cluster).
    per_label: dict[str, int] = {}
    for label, _ in queries:
        per_label[label] = per_label.get(label, 0) + 1
    picks = []
    seen: dict[str, int] = {}
    for label, _ in queries:
        i = seen[label] = seen.get(label, -1) + 1
        n = per_label[label]
        picks.append(sample // n + (1 if i < sample % n else 0))
    now_ms = int(time.time() * 1000)
    found = redis_tier.call(partial(_count_and_pick, [k for _, k in queries], picks, now_ms))
    out: dict[str, dict[str, Any]] = {
        label: {"entries": 0, "bytes": None, "sampled": 0} for label in labels
    }
    measured: list[tuple[str, str, bool]] = []  # (label, key, is an index)
    picked = iter(found[len(queries) :])
    for (label, index), count, n in zip(queries, found, picks, strict=False):
        out[label]["entries"] += int(count) if isinstance(count, int) else 0
        measured.append((label, index, True))
        members = next(picked) if n else None
        if isinstance(members, list):
            for m in members:
                measured.append((label, m.decode() if isinstance(m, bytes) else str(m), False))
    sizes = redis_tier.call(partial(_memory_all, [key for _, key, _ in measured]))
    entry_bytes: dict[str, list[int]] = {}
    index_bytes: dict[str, int] = {}
    for (label, _, is_index), size in zip(measured, sizes, strict=True):
        if not isinstance(size, int):
            continue  # gone (an expired entry its index still lists), or junk
        if is_index:
            index_bytes[label] = index_bytes.get(label, 0) + size
        else:
            entry_bytes.setdefault(label, []).append(size)
    for label, row in out.items():
        got = entry_bytes.get(label, [])
        row["sampled"] = len(got)
        if got:
            mean = sum(got) / len(got)
            row["bytes"] = round(mean * row["entries"]) + index_bytes.get(label, 0)
        elif not row["entries"]:
            row["bytes"] = index_bytes.get(label, 0)
    return out


def _current_indexes(
    selected: Sequence[type[models.Model]] | None,
) -> tuple[list[str], list[tuple[str, str]]]:
    """The selected model labels, and (label, index key) of each model's index of its
    current generation in every shard: one round trip (the generations)."""
    groups = [caches for caches in by_group(selected).values()]
    # One generation per shard of each group (one shard but on a cluster).
    shards = [(caches, shard) for caches in groups for shard in caches[0].home.shards]
    gens = redis_tier.call(partial(_get_all, [shard.gen_key for _, shard in shards]))
    chosen = cached_models() if selected is None else selected
    wanted = {m._meta.label_lower for m in chosen}
    queries: list[tuple[str, str]] = []
    for (caches, shard), gen in zip(shards, gens, strict=True):
        for label in dict.fromkeys(c.label for c in caches):
            # A generation is a token; anything else is junk no fill was stored under.
            if label in wanted and isinstance(gen, bytes) and _TOKEN.fullmatch(gen):
                queries.append((label, shard.index_key(label, gen)))
    labels = [c.label for caches in groups for c in caches if c.label in wanted]
    return list(dict.fromkeys(labels)), queries


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


def _count_and_pick(indexes: list[str], picks: list[int], now_ms: int) -> list[Any]:
    pipe = redis_tier.client.pipeline(transaction=False)
    for k in indexes:
        pipe.zcount(k, now_ms, "+inf")
    for k, n in zip(indexes, picks, strict=True):
        if n:
            pipe.zrandmember(k, n)
    return pipe.execute(raise_on_error=False)


def _memory_all(keys: list[str]) -> list[Any]:
    pipe = redis_tier.client.pipeline(transaction=False)
    for k in keys:
        pipe.memory_usage(k)
    return pipe.execute(raise_on_error=False)


def trend_series(
    samples: Sequence[tuple[int, ...]], now: float, minutes: int = TREND_MINUTES
) -> list[dict[str, Any]]:
    """The last `minutes` minutes up to `now` (the current one included, its rate over the
    seconds it has run), from reporting.trends()'s samples of one model: per minute its
    reads by tier (keys.TREND_FIELDS), reads, reads per second (all and by tier) and the
    hit ratio (None without reads served through the tiers)."""
    current = int(now // 60)
    by_minute = {s[0]: s[1:] for s in samples}
    zero = (0,) * len(TREND_FIELDS)
    out = []
    for minute in range(current - minutes + 1, current + 1):
        counts = dict(zip(TREND_FIELDS, by_minute.get(minute, zero), strict=True))
        seconds = 60.0 if minute < current else min(60.0, max(1.0, now - minute * 60))
        hits = counts["l1_hits"] + counts["l2_hits"] + counts["negative_hits"]
        served = hits + counts["misses"]
        reads = served + counts["bypassed"]
        out.append(
            {
                "minute": minute,
                "at": minute * 60,
                "seconds": seconds,
                "counts": counts,
                "reads": reads,
                "per_second": reads / seconds,
                "tiers_per_second": {tier: counts[name] / seconds for tier, name in _TREND_TIERS},
                "hit_ratio": hits / served if served else None,
            }
        )
    return out


def _last_hour(samples: Sequence[tuple[int, ...]], now: float) -> list[dict[str, Any]]:
    """trend_series(), or [] for a model without reads in the span (most of them: a
    dashboard of many models draws only the ones read)."""
    first = int(now // 60) - TREND_MINUTES + 1
    if not samples or samples[-1][0] < first:
        return []
    return trend_series(samples, now)


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
    sizes = attempt(lambda: l2_sizes(chosen), None)
    samples = attempt(lambda: trends(chosen), None)
    now = time.time()
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
                "l2_entries": None if sizes is None else sizes[label]["entries"],
                "l2_bytes": None if sizes is None else sizes[label]["bytes"],
                "l2_sampled": None if sizes is None else sizes[label]["sampled"],
                "counters": counters,
                "scope": "all processes" if cluster is not None else "this process",
                "processes": counters.get("processes"),
                "since": counters.get("since"),
                "tiers": [(tier, n, n / total if total else 0.0) for tier, n in split],
                "reads": total,
                "hit_ratio": (total - counters.get("misses", 0)) / total if total else None,
                "last_warmup": runs["warmup"].get(label),
                # None while Redis is away: the trends are every process's, in Redis.
                "trend": None if samples is None else _last_hour(samples[label], now),
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
        "bus": bus.current_state(),
        "bus_latency": bus.last_latency,
        "last_cleanup": runs["cleanup"],
        "outbox": outbox,
        "l1_total": len(local_tier),
        "process": process_name(),
    }
