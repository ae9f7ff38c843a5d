"""What this process counts as it serves reads: per-model counters, a sample of the hottest
rows and a histogram of Redis round trips. Plain attributes, no I/O; reporting.py adds
them up and sends them to Redis."""

from __future__ import annotations

import bisect
import dataclasses
import os
import threading
from typing import Any

__all__ = ["COUNTER_NAMES", "Counters", "HotRows", "Latency", "hot"]


@dataclasses.dataclass
class Counters:
    """One cached manager's counters (ModelCache.counters), bumped without a lock: a lost
    increment under a race costs a statistic, never a read."""

    l1_hits: int = 0
    l2_hits: int = 0
    misses: int = 0
    negative_hits: int = 0
    invalidations: int = 0
    fills: int = 0
    fills_refused: int = 0
    corrupt: int = 0
    bypassed: int = 0
    # L1 hits served while the bus was down, under OUTAGE_STALE_SECONDS (in l1_hits too).
    stale_hits: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


COUNTER_NAMES = tuple(f.name for f in dataclasses.fields(Counters))


class HotRows:
    """A sample of the rows read most, per model: one read in SAMPLE_EVERY is counted
    here (no Redis call on the read path); reporting moves the counts to Redis."""

    SAMPLE_EVERY = 16

    def __init__(self) -> None:
        # Reads seen; reads.hit() counts here in place, as touch() does, to spare a call.
        self.tick = 0
        self.counts: dict[str, dict[Any, int]] = {}

    def touch(self, label: str, pk: Any) -> None:
        self.tick += 1
        if not self.tick % self.SAMPLE_EVERY:
            self.sample(label, pk)

    def touch_many(self, label: str, pks: list[Any]) -> None:
        """touch() of each pk in turn, without a call per pk (get_many_cached)."""
        every = self.SAMPLE_EVERY
        first = -(self.tick + 1) % every  # the index of the first pk touch() would sample
        self.tick += len(pks)
        for pk in pks[first::every]:
            self.sample(label, pk)

    def sample(self, label: str, pk: Any) -> None:
        """Count one read of the row, standing for SAMPLE_EVERY reads."""
        per_model = self.counts.setdefault(label, {})
        per_model[pk] = per_model.get(pk, 0) + 1

    def take(self) -> dict[str, dict[Any, int]]:
        counts, self.counts = self.counts, {}
        return counts

    def give_back(self, taken: dict[str, dict[Any, int]]) -> None:
        """Samples that could not be pushed: keep them for the next push."""
        for label, pks in taken.items():
            per_model = self.counts.setdefault(label, {})
            for pk, n in pks.items():
                per_model[pk] = per_model.get(pk, 0) + n


hot = HotRows()


class Latency:
    """A small histogram of Redis round trips in seconds, for the metrics."""

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)

    def __init__(self) -> None:
        self.counts = [0] * (len(self.BUCKETS) + 1)
        self.sum = 0.0
        self.count = 0
        self.last: float | None = None
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        i = bisect.bisect_left(self.BUCKETS, seconds)
        with self._lock:  # every thread's script calls report here
            self.counts[i] += 1
            self.sum += seconds
            self.count += 1
            self.last = seconds

    def after_fork(self) -> None:
        self._lock = threading.Lock()


def _renew_hot() -> None:
    hot.counts = {}  # the parent's samples are the parent's to push


os.register_at_fork(after_in_child=_renew_hot)
