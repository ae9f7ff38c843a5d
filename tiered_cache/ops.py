"""Day-to-day operations: flush, warm up, clean up, and the counters of all processes.

The admin, the management command, the Celery tasks and the metrics all call these.
Every Redis call goes through the circuit breaker: an outage raises Unavailable.
"""

from __future__ import annotations

import atexit
import bisect
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.apps import apps
from django.core.exceptions import ValidationError
from django.db import models, router

from . import reads
from .breaker import breaker
from .bus import bus
from .conf import conf
from .counters import hot, stats
from .invalidation import rows_batch
from .registry import ModelCache, cached_managers, cached_models, model_cache
from .tiers.local import local_tier
from .tiers.remote import _SGET, Unavailable, fresh_token, redis_tier
from .transactions import queue

__all__ = [
    "UnknownModel",
    "Unavailable",
    "cached_models",
    "cleanup",
    "cluster_stats",
    "exclusive",
    "flush",
    "invalidate_rows",
    "l2_entry_count",
    "l2_entry_counts",
    "last_runs",
    "overview",
    "publish_stats",
    "resolve_models",
    "start_stats_publisher",
    "start_warmup",
    "warmup",
]

logger = logging.getLogger("tiered_cache")

# Warmup without a manager hook and without a limit stores at most this many rows.
DEFAULT_WARMUP_LIMIT = 1000
# SCAN COUNT, and the most keys one cleanup script or UNLINK touches.
BATCH_SIZE = 500
# Aggregated counters live this long after the last process reported (refreshed on push).
STATS_TTL = 7 * 24 * 3600
# Hot-row scores halve every HOT_HALF_LIFE seconds (applied by cleanup); a row whose score
# falls under HOT_MIN, or beyond the HOT_KEEP best, is dropped from the sample.
HOT_TTL = 24 * 3600
HOT_HALF_LIFE = 3600.0
HOT_MIN = 0.5
HOT_KEEP = 10_000

_COUNTER_NAMES = (
    "l1_hits",
    "l2_hits",
    "misses",
    "negative_hits",
    "invalidations",
    "fills",
    "fills_refused",
    "corrupt",
    "bypassed",
)


class UnknownModel(ValueError):
    """A label that names no installed model, or a model without a cached manager."""


# -- models ----------------------------------------------------------------------


def resolve_models(labels: Iterable[str]) -> list[type[models.Model]]:
    """Cached models for "app_label.ModelName" labels (model name case-insensitive)."""
    out: list[type[models.Model]] = []
    for label in labels:
        try:
            model = apps.get_model(label)
        except ValueError:
            raise UnknownModel(
                f"{label!r} is not a model label; use app_label.ModelName, e.g. demo.User"
            ) from None
        except LookupError:
            raise UnknownModel(f"{label!r}: no such model is installed") from None
        if not cached_managers(model):
            raise UnknownModel(
                f"{model._meta.label} is not cached (it has no CachedManager); cached models: "
                + ", ".join(m._meta.label for m in cached_models())
            )
        if model not in out:
            out.append(model)
    return out


def _models_or_all(selected: Sequence[type[models.Model]] | None) -> list[type[models.Model]]:
    return list(selected) if selected is not None else cached_models()


def _caches(model: type[models.Model]) -> list[ModelCache]:
    return [model_cache(m) for m in cached_managers(model)]


def _first(model: type[models.Model]) -> ModelCache:
    return _caches(model)[0]


def lookups(model: type[models.Model]) -> list[str]:
    """Declared lookups of every cached manager, as "pk", "email", "tenant_id+session_id"."""
    seen: list[str] = []
    for mc in _caches(model):
        for names in mc.declared:
            text = "+".join(names)
            if text not in seen:
                seen.append(text)
    return seen


# -- keys kept next to a model's entries (same hash tag) --------------------------


def _stats_key(mc: ModelCache) -> str:
    return f"{mc.home.tag}:s:{mc.label}"


def _procs_key(mc: ModelCache) -> str:
    return f"{mc.home.tag}:p:{mc.label}"


def _hot_key(mc: ModelCache) -> str:
    return f"{mc.home.tag}:hot:{mc.label}"


def _ops_key() -> str:
    return conf.KEY_PREFIX + ":ops"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- flush -------------------------------------------------------------------------


def flush(selected: Sequence[type[models.Model]] | None = None) -> list[str]:
    """Drop every entry of these models (all cached models when None) in every process.
    Inside atomic() it happens when the outermost block commits, like any invalidation."""
    done = []
    for model in _models_or_all(selected):
        cached_managers(model)[0].flush_cache()
        done.append(model._meta.label)
    return done


def invalidate_rows(model: type[models.Model], pks: Iterable[Any]) -> int:
    """Drop every cached key of these rows in every process: one Redis round trip."""
    pks = list(pks)
    if pks:
        alias = router.db_for_write(model)
        queue(rows_batch(model, pks, alias), alias)
    return len(pks)


# -- warmup ------------------------------------------------------------------------


def hottest_pks(model: type[models.Model], limit: int) -> list[Any]:
    """The rows read most across processes (sampled), best first, as pk values."""
    if limit <= 0:
        return []
    mc = _first(model)
    raw = redis_tier.call(lambda: redis_tier.client.zrevrange(_hot_key(mc), 0, limit - 1))
    prep = mc.pk_lookup.preps[0]
    out = []
    for member in raw:
        try:
            out.append(prep(member.decode()))
        except (ValueError, TypeError, ValidationError):
            continue  # a pk of an older schema: skip it
    return out


def _recent_order(model: type[models.Model]) -> list[str]:
    latest = model._meta.get_latest_by
    if latest:
        fields = [latest] if isinstance(latest, str) else list(latest)
        return [f[1:] if f.startswith("-") else "-" + f for f in fields] + ["-pk"]
    return ["-pk"]


def warmup_set(manager: Any, limit: int | None) -> tuple[Any, dict[str, Any]]:
    """The queryset to warm and how it was chosen. A manager's ``warmup_queryset()`` wins;
    otherwise the hottest rows, then the most recent ones, up to the limit."""
    model = manager.model
    hook = getattr(manager, "warmup_queryset", None)
    if callable(hook):
        qs = hook()
        if limit is None:
            return qs, {"source": "warmup_queryset"}
        pks = list(qs.values_list("pk", flat=True)[: max(limit, 0)])
        return manager.get_queryset().filter(pk__in=pks), {"source": "warmup_queryset"}
    limit = DEFAULT_WARMUP_LIMIT if limit is None else max(limit, 0)
    base = manager.get_queryset()
    # Twice the limit: some hot rows may have been deleted since they were sampled.
    hot_pks = hottest_pks(model, 2 * limit)
    found = set(base.filter(pk__in=hot_pks).values_list("pk", flat=True)) if hot_pks else set()
    chosen = [pk for pk in hot_pks if pk in found][:limit]
    remaining = limit - len(chosen)
    recent: list[Any] = []
    if remaining > 0:
        recent = list(
            base.exclude(pk__in=chosen)
            .order_by(*_recent_order(model))
            .values_list("pk", flat=True)[:remaining]
        )
    return base.filter(pk__in=chosen + recent), {
        "source": "hot+recent",
        "hot": len(chosen),
        "recent": len(recent),
    }


def warmup_limit(limit: Any) -> int | None:
    """A limit from a task argument, a command line or a form: None or a whole number
    >= 0 ("3" is 3); anything else is refused with a message naming the limit."""
    if limit is None:
        return None
    if isinstance(limit, bool):
        raise ValueError(f"warmup limit must be a whole number >= 0, not {limit!r}")
    try:
        n = int(str(limit).strip()) if not isinstance(limit, int) else limit
    except ValueError:
        raise ValueError(f"warmup limit must be a whole number >= 0, not {limit!r}") from None
    if n < 0:
        raise ValueError(f"warmup limit must be a whole number >= 0, not {limit!r}")
    return n


def warmup(model: type[models.Model], limit: int | None = None) -> dict[str, Any]:
    """Store the model's warmup set in L2 (pk keys) in pipelined batches. A row written
    meanwhile is refused, never stored stale. Records the run; returns its counts."""
    limit = warmup_limit(limit)
    started = time.time()
    result: dict[str, Any] = {"model": model._meta.label, "stored": 0, "refused": 0}
    for manager in cached_managers(model):
        qs, how = warmup_set(manager, limit)
        counts = reads.warm(manager, model_cache(manager), qs)
        result["stored"] += counts["stored"]
        result["refused"] += counts["refused"]
        for k, v in how.items():
            result[k] = result[k] + v if isinstance(v, int) and k in result else v
    result["seconds"] = round(time.time() - started, 3)
    _record(f"warmup:{model._meta.label_lower}", result, started)
    return result


def start_warmup(model: type[models.Model], limit: int | None = None) -> dict[str, Any]:
    """Queue tiered_cache.tasks.warmup on Celery when a broker is configured, else warm
    here and now. {"mode": "celery", "task_id"} or {"mode": "inline", "reason", "result"}."""
    try:
        from celery import current_app
    except ImportError:
        return {
            "mode": "inline",
            "reason": "Celery is not installed",
            "result": warmup(model, limit),
        }
    celery_conf = current_app.conf
    if not celery_conf.broker_url:
        reason = "no Celery broker is configured"
    elif celery_conf.task_always_eager:
        reason = "Celery runs tasks eagerly (task_always_eager)"
    else:
        from .tasks import warmup as task

        try:
            sent = task.apply_async((model._meta.label, limit), retry=False)
        except Exception as exc:  # the broker refused: warm here rather than not at all
            logger.warning("tiered_cache: could not queue the warmup: %r", exc)
            reason = f"the Celery broker refused the task ({exc.__class__.__name__})"
        else:
            return {"mode": "celery", "task_id": sent.id}
    return {"mode": "inline", "reason": reason, "result": warmup(model, limit)}


# -- cleanup -----------------------------------------------------------------------

# KEYS: gen, writes, then data keys. ARGV[1]: row-version key prefix.
# Deletes every entry a read would not serve (the test READ applies): another
# generation, a negative older than the model's last write, a row whose version moved,
# anything unparsable. Returns {old generation, stale}.
_CLEAN = (
    _SGET
    + """
local g = sget(KEYS[1])
local w = sget(KEYS[2]) or '0'
local old, stale = 0, 0
for i = 3, #KEYS do
  local v = redis.pcall('GET', KEYS[i])
  if type(v) == 'table' and v.err then
    redis.call('DEL', KEYS[i]); stale = stale + 1
  elseif v then
    local kind, vg, a, b = string.match(v, '^(%u)|([^|]*)|([^|]*)|([^|]*)|')
    if kind and vg ~= g then
      redis.call('DEL', KEYS[i]); old = old + 1
    elseif not (kind == 'N' and b == w) and not (kind == 'P' and sget(ARGV[1] .. a) == b) then
      redis.call('DEL', KEYS[i]); stale = stale + 1
    end
  end
end
return {old, stale}
"""
)

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_scripts: dict[str, Any] = {}


def _run_script(source: str, keys: list[str], args: list[Any]) -> Any:
    """EVALSHA (loading the script when needed) on the tier's current client."""
    client = redis_tier.client
    script = _scripts.get(source)
    if script is None:
        script = _scripts[source] = client.register_script(source)
    return script(keys=keys, args=args, client=client)


def _by_tag(selected: Sequence[type[models.Model]] | None) -> dict[str, list[ModelCache]]:
    """The model caches of each group the selected models belong to: every model of a
    group (a proxy, an MTI relative), so that one's entries are never taken for another
    schema's."""
    tags = {mc.home.tag for model in _models_or_all(selected) for mc in _caches(model)}
    out: dict[str, list[ModelCache]] = {}
    for model in cached_models():
        for mc in _caches(model):
            if mc.home.tag in tags:
                out.setdefault(mc.home.tag, []).append(mc)
    return out


def _owner(key: str, caches: list[ModelCache]) -> ModelCache | None:
    """The model cache whose data key this is (None for another schema or manager)."""
    g = caches[0].home
    for c in caches:
        if key.startswith(f"{g.tag}:{c.schema}:{c.label}:{c.manager_name}:"):
            return c
    return None


def _classify(key: str, caches: list[ModelCache]) -> str:
    """'keep', 'data' (check the entry), or 'schema' (another schema or manager: delete)."""
    g = caches[0].home
    if key in (g.gen_key, g.writes_key) or key.startswith(
        (g.tag + ":s:", g.tag + ":p:", g.tag + ":hot:")
    ):
        return "keep"
    if key.startswith(g.row_prefix):
        return "keep"  # row versions expire by themselves
    for c in caches:
        if key.startswith(f"{g.tag}:{c.schema}:{c.label}:{c.manager_name}:"):
            return "keep" if key.endswith("|L") else "data"  # leases expire by themselves
    return "schema"


def _scan(match: str, count: int) -> Iterator[list[str]]:
    cursor = 0
    while True:
        cursor, keys = redis_tier.call(
            lambda c=cursor: redis_tier.client.scan(c, match=match, count=count)
        )
        if keys:
            yield [k.decode() if isinstance(k, bytes) else k for k in keys]
        if not cursor:
            return


def cleanup(
    selected: Sequence[type[models.Model]] | None = None, batch_size: int = BATCH_SIZE
) -> dict[str, Any]:
    """Delete from Redis what can no longer be served, in batches of at most batch_size
    keys: entries of old generations, old schemas or replaced rows; decay the hot-row
    samples and drop their cold members; forget processes that stopped reporting. Then
    prune this process's expired L1 entries. Records the run; returns its counts."""
    started = time.time()
    counts = {
        "scanned": 0,
        "old_generation": 0,
        "stale_rows": 0,
        "old_schema": 0,
        "hot_members": 0,
        "stale_processes": 0,
        "l1_expired": 0,
    }
    for tag, caches in _by_tag(selected).items():
        mc = caches[0]
        for keys in _scan(_glob_escape(tag) + ":*", batch_size):
            counts["scanned"] += len(keys)
            kinds: dict[str, list[str]] = {"data": [], "schema": []}
            for k in keys:
                kind = _classify(k, caches)
                if kind != "keep":
                    kinds[kind].append(k)
            if kinds["schema"]:
                counts["old_schema"] += redis_tier.call(
                    lambda ks=kinds["schema"]: redis_tier.client.unlink(*ks)
                )
            if kinds["data"]:
                old, stale = redis_tier.call(
                    lambda ks=kinds["data"], mc=mc: _run_script(
                        _CLEAN, [mc.home.gen_key, mc.home.writes_key, *ks], [mc.home.row_prefix]
                    )
                )
                counts["old_generation"] += old
                counts["stale_rows"] += stale
        counts["hot_members"] += _decay_hot(mc)
        procs, cutoff = _procs_key(mc), time.time() - _process_ttl()
        counts["stale_processes"] += redis_tier.call(
            lambda k=procs, c=cutoff: redis_tier.client.zremrangebyscore(k, "-inf", c)
        )
    counts["l1_expired"] = local_tier.prune_expired()
    counts["seconds"] = round(time.time() - started, 3)
    _record("cleanup", counts, started)
    return counts


def _process_ttl() -> float:
    return max(300.0, 20 * conf.STATS_FLUSH_INTERVAL)


def _decay_hot(mc: ModelCache) -> int:
    """Halve the hot-row scores per HOT_HALF_LIFE elapsed since the last decay, drop the
    members that went cold or fell out of the best HOT_KEEP. Returns members dropped."""
    now = time.time()
    field = f"hot_decay:{mc.label}"
    last = redis_tier.call(lambda: redis_tier.client.hget(_ops_key(), field))
    factor = 1.0
    if last is not None:
        factor = 0.5 ** (max(0.0, now - float(last)) / HOT_HALF_LIFE)
    key = _hot_key(mc)

    def run() -> list[Any]:
        pipe = redis_tier.client.pipeline(transaction=True)
        pipe.zunionstore(key, {key: factor})
        pipe.zremrangebyscore(key, "-inf", f"({HOT_MIN}")
        pipe.zremrangebyrank(key, 0, -(HOT_KEEP + 1))
        pipe.expire(key, HOT_TTL)
        pipe.hset(_ops_key(), field, repr(now))
        return pipe.execute()

    res = redis_tier.call(run)
    return int(res[1]) + int(res[2])


# -- L2 size ------------------------------------------------------------------------


def l2_entry_counts(
    selected: Sequence[type[models.Model]] | None = None, batch_size: int = BATCH_SIZE
) -> dict[str, int]:
    """Per model label, the L2 entries of the current generation and schema (a SCAN of the
    model's keys; entries of old generations wait for cleanup and are not counted)."""
    out: dict[str, int] = {}
    for tag, caches in _by_tag(selected).items():
        mc = caches[0]
        for c in caches:
            out.setdefault(c.label, 0)
        gen = redis_tier.call(lambda k=mc.home.gen_key: redis_tier.client.get(k))
        for keys in _scan(_glob_escape(tag) + ":*", batch_size):
            data = [k for k in keys if _classify(k, caches) == "data"]
            if not data or gen is None:
                continue

            def heads(ks: list[str] = data) -> list[Any]:
                pipe = redis_tier.client.pipeline(transaction=False)
                for k in ks:
                    pipe.getrange(k, 0, 47)
                return pipe.execute(raise_on_error=False)

            for k, head in zip(data, redis_tier.call(heads), strict=True):
                owner = _owner(k, caches)
                if owner and isinstance(head, bytes) and head.split(b"|", 2)[1:2] == [gen]:
                    out[owner.label] += 1
    wanted = {m._meta.label_lower for m in _models_or_all(selected)}
    return {label: n for label, n in out.items() if label in wanted}


def l2_entry_count(model: type[models.Model]) -> int:
    return l2_entry_counts([model]).get(model._meta.label_lower, 0)


# -- counters of all processes --------------------------------------------------------

_publish_lock = threading.Lock()
# Per label: the counter objects last pushed (identity: reset_stats() replaces them) and
# their totals then.
_published: dict[str, tuple[tuple[int, ...], dict[str, int]]] = {}


def _local_totals() -> dict[str, tuple[tuple[int, ...], dict[str, int]]]:
    totals: dict[str, tuple[tuple[int, ...], dict[str, int]]] = {}
    for mgr in cached_managers():
        mc = model_cache(mgr)
        ids, row = totals.get(mc.label, ((), dict.fromkeys(_COUNTER_NAMES, 0)))
        for name in _COUNTER_NAMES:
            row[name] += getattr(mc.counters, name)
        totals[mc.label] = ((*ids, id(mc.counters)), row)
    return totals


def publish_stats() -> dict[str, Any]:
    """Add this process's counters since its last push, and its sampled hot rows, to
    Redis in one pipeline. Called in batches (a thread every STATS_FLUSH_INTERVAL), never
    per read. Returns what was pushed: {"counters": {label: deltas}, "hot": {label: n}}."""
    with _publish_lock:
        totals = _local_totals()
        taken = hot.take()
        caches = {model_cache(m).label: model_cache(m) for m in cached_managers()}
        deltas: dict[str, dict[str, int]] = {}
        for label, (ids, row) in totals.items():
            before_ids, before = _published.get(label, ((), {}))
            if before_ids != ids:
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
        me = _process_name()

        def run() -> None:
            pipe = redis_tier.client.pipeline(transaction=False)
            for label, d in deltas.items():
                mc = caches[label]
                key = _stats_key(mc)
                for name, value in d.items():
                    pipe.hincrby(key, name, value)
                pipe.hsetnx(key, "since", repr(now))
                pipe.expire(key, STATS_TTL)
                pipe.zadd(_procs_key(mc), {me: now})
                pipe.expire(_procs_key(mc), STATS_TTL)
            for label, pks in taken.items():
                mc = caches.get(label)
                if mc is None or not pks:
                    continue
                for pk, n in pks.items():
                    pipe.zincrby(_hot_key(mc), n, str(pk))
                pipe.expire(_hot_key(mc), HOT_TTL)
            t0 = time.perf_counter()
            pipe.execute()
            l2_latency.observe(time.perf_counter() - t0)

        try:
            redis_tier.call(run)
        except Unavailable:
            # Keep the samples for the next push; the counters' deltas keep themselves.
            for label, pks in taken.items():
                per_model = hot.counts.setdefault(label, {})
                for pk, n in pks.items():
                    per_model[pk] = per_model.get(pk, 0) + n
            raise
        _published.update(totals)
        return {
            "counters": deltas,
            "hot": {label: sum(pks.values()) for label, pks in taken.items() if pks},
        }


def cluster_stats(selected: Sequence[type[models.Model]] | None = None) -> dict[str, Any]:
    """Per model label: the counters every process pushed, when counting began, how many
    processes reported recently, and the hottest sampled rows."""
    by_label: dict[str, ModelCache] = {}
    for model in _models_or_all(selected):
        mc = _first(model)
        by_label[mc.label] = mc
    cutoff = time.time() - _process_ttl()

    def run() -> list[Any]:
        pipe = redis_tier.client.pipeline(transaction=False)
        for mc in by_label.values():
            pipe.hgetall(_stats_key(mc))
            pipe.zcount(_procs_key(mc), cutoff, "+inf")
            pipe.zrevrange(_hot_key(mc), 0, 4, withscores=True)
        return pipe.execute()

    res = redis_tier.call(run)
    out: dict[str, Any] = {}
    for i, label in enumerate(by_label):
        raw, procs, top = res[3 * i : 3 * i + 3]
        row: dict[str, Any] = {name: int(raw.get(name.encode(), 0)) for name in _COUNTER_NAMES}
        since = raw.get(b"since")
        row["since"] = float(since) if since else None
        row["processes"] = int(procs)
        row["hot"] = [(m.decode(), round(s, 2)) for m, s in top]
        out[label] = row
    return out


def tier_split(row: dict[str, Any]) -> list[tuple[str, int]]:
    """How reads were served: L1, L2, a remembered "no such row", or the database."""
    return [
        ("L1", row.get("l1_hits", 0)),
        ("L2", row.get("l2_hits", 0)),
        ("negative", row.get("negative_hits", 0)),
        ("database", row.get("misses", 0)),
    ]


# -- last runs and locks ---------------------------------------------------------------


def _record(field: str, result: dict[str, Any], started: float) -> None:
    value = json.dumps({"at": started, "host": _process_name(), **result}, default=str)
    try:
        redis_tier.call(lambda: redis_tier.client.hset(_ops_key(), field, value))
    except Unavailable:
        logger.warning("tiered_cache: could not record the %s run", field)


def last_runs() -> dict[str, Any]:
    """{"cleanup": {...} or None, "warmup": {label: {...}}}, each with "at" (epoch)."""
    raw = redis_tier.call(lambda: redis_tier.client.hgetall(_ops_key()))
    out: dict[str, Any] = {"cleanup": None, "warmup": {}}
    for field, value in raw.items():
        name = field.decode()
        if name == "cleanup":
            out["cleanup"] = json.loads(value)
        elif name.startswith("warmup:"):
            out["warmup"][name.split(":", 1)[1]] = json.loads(value)
    return out


@contextmanager
def exclusive(name: str, ttl: float) -> Iterator[bool]:
    """A Redis lock (SET NX PX with a token) held for the block: yields False if another
    holder has it. Released by compare-and-delete, so a run that outlived its ttl never
    frees the lock of the run that took over."""
    key = f"{conf.KEY_PREFIX}:lock:{name}"
    token = fresh_token()
    got = bool(
        redis_tier.call(lambda: redis_tier.client.set(key, token, nx=True, px=int(ttl * 1000)))
    )
    try:
        yield got
    finally:
        if got:
            try:
                redis_tier.call(lambda: _run_script(_RELEASE, [key], [token]))
            except Unavailable:
                pass  # it expires by itself


# -- the publisher thread ----------------------------------------------------------------


class _Latency:
    """A small histogram of L2 round trips in seconds, for the metrics."""

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


l2_latency = _Latency()
redis_tier.latency_hook = l2_latency.observe

_publisher_lock = threading.Lock()
_publisher: dict[str, Any] = {"pid": None, "thread": None, "atexit": False}


def start_stats_publisher() -> None:
    """Push this process's counters every STATS_FLUSH_INTERVAL from a daemon thread (and
    once at exit). Idempotent; a forked child starts its own on its first call."""
    t = _publisher["thread"]
    if _publisher["pid"] == os.getpid() and t is not None and t.is_alive():
        return
    with _publisher_lock:
        t = _publisher["thread"]
        if _publisher["pid"] == os.getpid() and t is not None and t.is_alive():
            return
        _publisher["pid"] = os.getpid()
        t = threading.Thread(target=_publish_loop, name="tiered_cache-stats", daemon=True)
        _publisher["thread"] = t
        t.start()
        if not _publisher["atexit"]:
            atexit.register(_publish_quietly)
            _publisher["atexit"] = True


def _publish_loop() -> None:
    pid = os.getpid()
    while _publisher["pid"] == pid:
        time.sleep(conf.STATS_FLUSH_INTERVAL)
        _publish_quietly()


def _publish_quietly() -> None:
    try:
        publish_stats()
    except Unavailable:
        pass
    except Exception:  # a bug here must not kill the thread
        logger.exception("tiered_cache: could not push stats")


# -- everything at once, for the dashboard and `manage.py tiered_cache stats` ------------


def overview(selected: Sequence[type[models.Model]] | None = None) -> dict[str, Any]:
    """Per model: lookups, L1 entries here, L2 entries, counters of all processes (or of
    this one while Redis is away), tier split, last warmup; plus breaker, bus, last
    cleanup and the outbox. Never raises Unavailable: it reports it in "redis_error"."""
    from .models import PendingInvalidation

    chosen = _models_or_all(selected)
    errors: list[str] = []

    def attempt(fn: Any, default: Any) -> Any:
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
    runs = attempt(last_runs, {"cleanup": None, "warmup": {}})
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
                "lookups": lookups(model),
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
        outbox = PendingInvalidation.objects.count()
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
        "process": _process_name(),
    }
