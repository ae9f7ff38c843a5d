"""What the counters add up to: this process's stats(), and the counters of every process,
pushed to Redis in batches by one thread per process and read back per model."""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from django.db import models

from .breaker import breaker
from .bus import bus
from .conf import conf
from .counters import COUNTER_NAMES, Counters, hot
from .keys import TREND_FIELDS, parse_trend, trend_call
from .registry import ModelCache, cached_managers, cached_models, model_cache, model_caches
from .threads import ProcessThread
from .tiers.local import local_tier
from .tiers.remote import Unavailable, redis_tier

__all__ = [
    "HOT_TTL",
    "STATS_TTL",
    "TREND_KEEP",
    "cluster_stats",
    "process_name",
    "process_ttl",
    "publish_stats",
    "publisher",
    "reset_stats",
    "stats",
    "tier_split",
    "trends",
]

logger = logging.getLogger("tiered_cache")

# Aggregated counters live this long after the last process reported (refreshed on push).
STATS_TTL = 7 * 24 * 3600
# Hot-row samples live this long without a push (maintenance decays them meanwhile).
HOT_TTL = 24 * 3600
# Reads per minute (the dashboard's trends): the last TREND_KEEP minutes that had reads, kept
# TREND_TTL after the last push. Bounded: at most this many short elements per model.
TREND_KEEP = 120
TREND_TTL = 3 * 3600


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_ttl() -> float:
    """A process that has not reported for this long no longer counts as running."""
    return max(300.0, 20 * conf.STATS_FLUSH_INTERVAL)


# -- this process ------------------------------------------------------------------------


def stats() -> dict[str, dict[str, Any]]:
    """Per model label: l1_hits, l2_hits, misses, negative_hits, invalidations, fills,
    fills_refused, corrupt, bypassed, hit_ratio, l1_entries, breaker, bus."""
    out: dict[str, dict[str, Any]] = {}
    homes: dict[str, str] = {}
    for mgr in cached_managers():
        mc = model_cache(mgr)
        homes[mc.label] = mc.home.id
        row = out.setdefault(mc.label, {})
        for name, value in mc.counters.as_dict().items():
            row[name] = row.get(name, 0) + value
    for label, row in out.items():
        hits = row["l1_hits"] + row["l2_hits"] + row["negative_hits"]
        total = hits + row["misses"]
        row["hit_ratio"] = round(hits / total, 4) if total else None
        row["l1_entries"] = local_tier.count(homes[label])
        row["breaker"] = breaker.state
        row["bus"] = bus.state()
    return out


def reset_stats() -> None:
    for mgr in cached_managers():
        model_cache(mgr).counters = Counters()


def tier_split(row: dict[str, Any]) -> list[tuple[str, int]]:
    """How reads were served: L1, L2, a remembered "no such row", or the database."""
    return [
        ("L1", row.get("l1_hits", 0)),
        ("L2", row.get("l2_hits", 0)),
        ("negative", row.get("negative_hits", 0)),
        ("database", row.get("misses", 0)),
    ]


# -- every process -----------------------------------------------------------------------


# Per label: the counter objects of its managers, and their totals summed.
_Totals = dict[str, tuple[tuple[Counters, ...], dict[str, int]]]


class _Published:
    """Per label: the counter objects last pushed and their totals then. The objects
    themselves, not their id()s: reset_stats() replaces them, and a new object may be given
    the address of one freed since, which id() would take for the one already pushed (its
    reads then went unpushed until they outnumbered the old totals). Held here, an old
    object's address is not reused while it is compared against."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.totals: _Totals = {}
        os.register_at_fork(after_in_child=self.after_fork)

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.totals = {}  # a child's counters start where the parent's were: all new


_published = _Published()


def _local_totals() -> _Totals:
    totals: _Totals = {}
    for mgr in cached_managers():
        mc = model_cache(mgr)
        counters, row = totals.get(mc.label, ((), dict.fromkeys(COUNTER_NAMES, 0)))
        for name in COUNTER_NAMES:
            row[name] += getattr(mc.counters, name)
        totals[mc.label] = ((*counters, mc.counters), row)
    return totals


def _same(a: tuple[Counters, ...], b: tuple[Counters, ...]) -> bool:
    # By identity: Counters is a dataclass, whose == compares the counts.
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def publish_stats() -> dict[str, Any]:
    """Add this process's counters since its last push, and its sampled hot rows, to
    Redis in one pipeline; the reads also to their minute of each model's trend (the
    dashboard's chart). Called in batches (a thread every STATS_FLUSH_INTERVAL), never
    per read, and only when there is something to push: an idle process sends nothing.
    Returns what was pushed: {"counters": {label: deltas}, "hot": {label: n}}."""
    with _published.lock:
        totals = _local_totals()
        taken = hot.take()
        caches = {model_cache(m).label: model_cache(m) for m in cached_managers()}
        deltas: dict[str, dict[str, int]] = {}
        for label, (counters, row) in totals.items():
            before_counters, before = _published.totals.get(label, ((), {}))
            if not _same(before_counters, counters):
                before = {}  # the counters were replaced (reset): all of it is new
            d = {}
            for name, value in row.items():
                diff = value - before.get(name, 0)
                if diff > 0:
                    d[name] = diff
            if d:
                deltas[label] = d
        if not deltas and not taken:
            return {"counters": {}, "hot": {}}
        now = time.time()
        me = process_name()

        def run() -> None:
            pipe = redis_tier.client.pipeline(transaction=False)
            for label, d in deltas.items():
                home = caches[label].home
                key = home.stats_key(label)
                for name, value in d.items():
                    pipe.hincrby(key, name, value)
                pipe.hsetnx(key, "since", repr(now))
                pipe.expire(key, STATS_TTL)
                pipe.zadd(home.procs_key(label), {me: now})
                pipe.expire(home.procs_key(label), STATS_TTL)
                reads = [d.get(name, 0) for name in TREND_FIELDS]
                if any(reads):
                    call = trend_call(
                        home, label, int(now // 60), reads, TREND_KEEP, TREND_TTL * 1000
                    )
                    # EVAL, not EVALSHA: a pipeline has no NOSCRIPT fallback, and the
                    # script is short. By execute_command: a cluster's pipeline has no
                    # eval() method, but routes EVAL to its key's node.
                    pipe.execute_command(  # type: ignore[no-untyped-call]  # unannotated
                        "EVAL", call.script.source, len(call.keys), *call.keys, *call.args
                    )
            for label, pks in taken.items():
                mc = caches.get(label)
                if mc is None or not pks:
                    continue
                hot_key = mc.home.hot_key(label)
                for pk, n in pks.items():
                    pipe.zincrby(hot_key, n, str(pk))
                pipe.expire(hot_key, HOT_TTL)
            t0 = time.perf_counter()
            pipe.execute()
            redis_tier.latency.observe(time.perf_counter() - t0)

        try:
            redis_tier.call(run)
        except Unavailable:
            hot.give_back(taken)  # the counters' deltas keep themselves
            raise
        _published.totals.update(totals)
        return {
            "counters": deltas,
            "hot": {label: sum(pks.values()) for label, pks in taken.items() if pks},
        }


def cluster_stats(selected: Sequence[type[models.Model]] | None = None) -> dict[str, Any]:
    """Per model label: the counters every process pushed, when counting began, how many
    processes reported recently, and the hottest sampled rows."""
    by_label: dict[str, ModelCache] = {}
    for model in cached_models() if selected is None else selected:
        mc = model_caches(model)[0]
        by_label[mc.label] = mc
    cutoff = time.time() - process_ttl()

    def run() -> list[Any]:
        pipe = redis_tier.client.pipeline(transaction=False)
        for label, mc in by_label.items():
            pipe.hgetall(mc.home.stats_key(label))
            pipe.zcount(mc.home.procs_key(label), cutoff, "+inf")
            pipe.zrevrange(mc.home.hot_key(label), 0, 4, withscores=True)
        return pipe.execute()

    res = redis_tier.call(run)
    out: dict[str, Any] = {}
    for i, label in enumerate(by_label):
        raw, procs, top = res[3 * i : 3 * i + 3]
        row: dict[str, Any] = {name: int(raw.get(name.encode(), 0)) for name in COUNTER_NAMES}
        since = raw.get(b"since")
        row["since"] = float(since) if since else None
        row["processes"] = int(procs)
        row["hot"] = [(m.decode(), round(s, 2)) for m, s in top]
        out[label] = row
    return out


def trends(
    selected: Sequence[type[models.Model]] | None = None,
) -> dict[str, list[tuple[int, ...]]]:
    """Per model label, its reads per minute pushed by every process, oldest first: tuples
    (minute since the epoch, *counts in keys.TREND_FIELDS order), at most TREND_KEEP."""
    by_label: dict[str, ModelCache] = {}
    for model in cached_models() if selected is None else selected:
        mc = model_caches(model)[0]
        by_label[mc.label] = mc

    def run() -> list[Any]:
        pipe = redis_tier.client.pipeline(transaction=False)
        for label, mc in by_label.items():
            pipe.lrange(mc.home.trend_key(label), -TREND_KEEP, -1)
        return pipe.execute(raise_on_error=False)

    res = redis_tier.call(run)
    out: dict[str, list[tuple[int, ...]]] = {}
    for label, raw in zip(by_label, res, strict=True):
        minutes: dict[int, list[int]] = {}
        for element in raw if isinstance(raw, list) else []:  # junk: no trend
            parsed = parse_trend(element)
            if parsed is None:
                continue
            have = minutes.setdefault(parsed[0], [0] * len(TREND_FIELDS))
            for i, n in enumerate(parsed[1:]):
                have[i] += n
        out[label] = [(m, *minutes[m]) for m in sorted(minutes)]
    return out


# -- the publisher thread ------------------------------------------------------------------


class Publisher:
    """Pushes this process's counters every STATS_FLUSH_INTERVAL from a daemon thread (and
    once at exit): one per process, started with the bus (AppConfig.ready() wires it)."""

    def __init__(self) -> None:
        self._thread = ProcessThread("tiered_cache-stats", self._loop, prepare=self._prepare)
        self._atexit = False

    def start(self) -> None:
        """Idempotent; a forked child starts its own on its first call."""
        self._thread.start()

    def _prepare(self) -> None:
        if not self._atexit:
            atexit.register(self.publish_quietly)
            self._atexit = True

    def _loop(self) -> None:
        while True:
            time.sleep(conf.STATS_FLUSH_INTERVAL)
            self.publish_quietly()

    def publish_quietly(self) -> None:
        try:
            publish_stats()
        except Unavailable:
            pass
        except Exception:  # a bug here must not kill the thread
            logger.exception("tiered_cache: could not push stats")


publisher = Publisher()
