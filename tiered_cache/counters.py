"""Counters of this process, per model, the hottest rows, and the breaker and bus state."""

from __future__ import annotations

from typing import Any

from .breaker import breaker
from .bus import bus
from .registry import cached_managers, model_cache
from .tiers.local import local_tier


def stats() -> dict[str, dict[str, Any]]:
    """Per model label: l1_hits, l2_hits, misses, negative_hits, invalidations, fills,
    fills_refused, corrupt, bypassed, hit_ratio, l1_entries, breaker, bus."""
    out: dict[str, dict[str, Any]] = {}
    for mgr in cached_managers():
        mc = model_cache(mgr)
        row = out.setdefault(mc.label, {})
        for name, value in mc.counters.as_dict().items():
            row[name] = row.get(name, 0) + value
    homes = {model_cache(m).label: model_cache(m).home.id for m in cached_managers()}
    for label, row in out.items():
        hits = row["l1_hits"] + row["l2_hits"] + row["negative_hits"]
        total = hits + row["misses"]
        row["hit_ratio"] = round(hits / total, 4) if total else None
        row["l1_entries"] = local_tier.count(homes[label])
        row["breaker"] = breaker.state
        row["bus"] = bus.state()
    return out


def reset_stats() -> None:
    from .registry import Counters

    for mgr in cached_managers():
        model_cache(mgr).counters = Counters()


class HotRows:
    """A sample of the rows read most, per model: one read in SAMPLE_EVERY is counted
    here (no Redis call on the read path); flush() moves the counts to Redis."""

    SAMPLE_EVERY = 16

    def __init__(self) -> None:
        self._tick = 0
        self.counts: dict[str, dict[Any, int]] = {}

    def touch(self, mc: Any, frozen: Any) -> None:
        self._tick += 1
        if self._tick % self.SAMPLE_EVERY:
            return
        pk = frozen[2]
        per_model = self.counts.setdefault(mc.label, {})
        per_model[pk] = per_model.get(pk, 0) + 1

    def take(self) -> dict[str, dict[Any, int]]:
        counts, self.counts = self.counts, {}
        return counts


hot = HotRows()
