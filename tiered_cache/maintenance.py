"""Day-to-day operations on the cache: flush, warm up, clean up, and the Redis lock and
run records that keep them one at a time and visible. The admin, the management command
and the Celery tasks call these; every Redis call goes through the circuit breaker (an
outage raises Unavailable)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

from django.core.exceptions import ValidationError
from django.db import models, router

from . import reads
from .groups import primary_parent
from .invalidation import rows_batch
from .keys import Group, clean_call, lock_key, ops_key, release_call
from .registry import (
    ModelCache,
    UnknownModel,
    cached_managers,
    cached_models,
    model_cache,
    model_caches,
)
from .reporting import HOT_TTL, process_name, process_ttl
from .tiers.local import local_tier
from .tiers.remote import Unavailable, fresh_token, redis_tier
from .transactions import queue

__all__ = [
    "BATCH_SIZE",
    "by_group",
    "cleanup",
    "exclusive",
    "flush",
    "hottest_pks",
    "invalidate_rows",
    "last_runs",
    "index_pages",
    "indexes",
    "owner",
    "start_warmup",
    "warmup",
    "warmup_limit",
    "warmup_set",
]

logger = logging.getLogger("tiered_cache")

# Warmup without a manager hook and without a limit stores at most this many rows.
DEFAULT_WARMUP_LIMIT = 1000
# SCAN COUNT, and the most keys one cleanup script or UNLINK touches.
BATCH_SIZE = 500
# Hot-row scores halve every HOT_HALF_LIFE seconds (applied by cleanup); a row whose score
# falls under HOT_MIN, or beyond the HOT_KEEP best, is dropped from the sample.
HOT_HALF_LIFE = 3600.0
HOT_MIN = 0.5
HOT_KEEP = 10_000
# The Celery task start_warmup() queues (tiered_cache/tasks.py), sent by name.
WARMUP_TASK = "tiered_cache.tasks.warmup"


def _models_or_all(selected: Sequence[type[models.Model]] | None) -> list[type[models.Model]]:
    return list(selected) if selected is not None else cached_models()


# -- flush -------------------------------------------------------------------------


def flush(selected: Sequence[type[models.Model]] | None = None) -> list[str]:
    """Drop every entry of these models (all cached models when None) in every process.
    Inside atomic() it happens when the outermost block commits, like any invalidation."""
    managers = [(model, cached_managers(model)) for model in _models_or_all(selected)]
    for model, of_model in managers:  # all refused before any is flushed
        if not of_model:
            raise UnknownModel(f"{model._meta.label} is not cached (it has no CachedManager)")
    for _, of_model in managers:
        of_model[0].flush_cache()
    return [model._meta.label for model, _ in managers]


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
    mc = model_caches(model)[0]
    key = mc.home.hot_key(mc.label)
    # The client never decodes replies: members are bytes.
    raw = cast(list[bytes], redis_tier.call(lambda: redis_tier.client.zrevrange(key, 0, limit - 1)))
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


def warmup_set(manager: Any, limit: int | None) -> tuple[list[Any], dict[str, Any]]:
    """The pks to warm and how they were chosen. A manager's ``warmup_queryset()`` wins;
    otherwise the hottest rows, then the most recent ones, up to the limit. The rows are
    read through the manager (its filter, its database, every field): the hook only
    picks them, or a read would be served what .get() does not give."""
    model = manager.model
    hook = getattr(manager, "warmup_queryset", None)
    if callable(hook):
        # Run once: a sample or a ranking read again per page would drift, and cost more.
        picked = _hook_pks(manager, hook())
        if limit is not None:
            picked = picked[: max(limit, 0)]
        return list(picked), {"source": "warmup_queryset"}
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
    return chosen + recent, {
        "source": "hot+recent",
        "hot": len(chosen),
        "recent": len(recent),
    }


_ALL_ROWS = 2**61


def _hook_pks(manager: Any, qs: Any) -> Any:
    """The pks of the manager's model that a warmup_queryset() names: a queryset of the
    model, of a proxy or a multi-table descendant (its value of the model's pk), or of an
    ancestor whose pk the model's is."""
    model = manager.model
    ours = model._meta.concrete_model
    if isinstance(qs, models.QuerySet):
        theirs = qs.model._meta.concrete_model
        if issubclass(theirs, ours):
            return qs.values_list(ours._meta.pk.name, flat=True)
        parent = primary_parent(ours)
        while parent is not None:
            if parent is theirs:
                return qs.values_list("pk", flat=True)
            parent = primary_parent(parent)
    raise TypeError(
        f"{model._meta.label}: {manager.name}.warmup_queryset() must return a QuerySet of "
        f"{model._meta.label}, not {type(qs).__qualname__}"
        + (f" of {qs.model._meta.label}" if isinstance(qs, models.QuerySet) else "")
    )


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
    # Past any table's size it means "all", and must still fit the database's and Redis's
    # 64-bit ranges (a hot-row sample is asked for twice the limit).
    return min(n, _ALL_ROWS)


def warmup(model: type[models.Model], limit: int | None = None) -> dict[str, Any]:
    """Store the model's warmup set in L2 (pk keys) in pipelined batches. A row written
    meanwhile is refused, never stored stale. Records the run; returns its counts."""
    limit = warmup_limit(limit)
    started = time.time()
    result: dict[str, Any] = {"model": model._meta.label, "stored": 0, "refused": 0}
    for manager in cached_managers(model):
        pks, how = warmup_set(manager, limit)
        base, mc = manager.get_queryset(), model_cache(manager)
        for start in range(0, len(pks), BATCH_SIZE):  # each page's pks in its own query
            counts = reads.warm(manager, mc, base.filter(pk__in=pks[start : start + BATCH_SIZE]))
            result["stored"] += counts["stored"]
            result["refused"] += counts["refused"]
        for k, v in how.items():
            result[k] = result[k] + v if isinstance(v, int) and k in result else v
    result["seconds"] = round(time.time() - started, 3)
    _record(f"warmup:{model._meta.label_lower}", result, started)
    return result


def start_warmup(model: type[models.Model], limit: int | None = None) -> dict[str, Any]:
    """Queue tiered_cache.tasks.warmup on Celery when a broker is configured, else warm
    here and now. {"mode": "celery", "task_id"} or {"mode": "inline", "reason", "result"}.
    The task is sent by name: this module never imports the tasks (Celery is optional)."""
    try:
        from celery import current_app  # an optional dependency (the [celery] extra)
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
        try:
            sent = current_app.send_task(WARMUP_TASK, (model._meta.label, limit), retry=False)
        except Exception as exc:  # the broker refused: warm here rather than not at all
            logger.warning("tiered_cache: could not queue the warmup: %r", exc)
            reason = f"the Celery broker refused the task ({exc.__class__.__name__})"
        else:
            return {"mode": "celery", "task_id": sent.id}
    return {"mode": "inline", "reason": reason, "result": warmup(model, limit)}


# -- cleanup -----------------------------------------------------------------------


def by_group(selected: Sequence[type[models.Model]] | None) -> dict[str, list[ModelCache]]:
    """The model caches of each group (by hash tag) the selected models belong to: every
    model of a group (a proxy, an MTI relative), so that one's entries are never taken for
    another schema's."""
    tags = {mc.home.tag for model in _models_or_all(selected) for mc in model_caches(model)}
    out: dict[str, list[ModelCache]] = {}
    for model in cached_models():
        for mc in model_caches(model):
            if mc.home.tag in tags:
                out.setdefault(mc.home.tag, []).append(mc)
    return out


def owner(key: str, caches: list[ModelCache]) -> ModelCache | None:
    """The model cache whose entry this key is (None for another schema or manager)."""
    rest = key[key.find("}") + 1 :]  # after the hash tag of the entry's shard
    for c in caches:
        if rest.startswith(Group.data_suffix(c.schema, c.key_prefix)):
            return c
    return None


def indexes(g: Group) -> list[str]:
    """The group's entry indexes (one per model, generation and shard;
    keys.Shard.index_key). Junk under a set's name, or under an index's, is deleted: it
    would refuse every cleanup (and count against the breaker) forever."""
    out: list[str] = []
    for shard in g.shards:
        raw = redis_tier.call(partial(_members_if, shard.indexes_key, b"set"))
        names = sorted(m.decode("utf-8", "replace") if isinstance(m, bytes) else m for m in raw)
        types = redis_tier.call(partial(_types, names))
        junk = [n for n, t in zip(names, types, strict=True) if t not in (b"zset", b"none")]
        if junk:
            redis_tier.call(partial(_drop_indexes, shard.indexes_key, junk))
        out.extend(n for n in names if n not in junk)
    return out


def _members_if(key: str, kind: bytes) -> Any:
    """SMEMBERS of a set; a key of another type is junk: deleted, and no members."""
    client = redis_tier.client
    found = client.type(key)
    if found not in (kind, b"none"):
        client.delete(key)
        return set()
    return client.smembers(key)


def _types(keys: list[str]) -> list[Any]:
    pipe = redis_tier.client.pipeline(transaction=False)
    for k in keys:
        pipe.type(k)
    return pipe.execute()


def _drop_indexes(index_set: str, names: list[str]) -> None:
    pipe = redis_tier.client.pipeline(transaction=False)
    for n in names:  # one key per command (a cluster's pipeline)
        pipe.delete(n)
    pipe.srem(index_set, *names)
    pipe.execute()


def index_pages(index: str, count: int = BATCH_SIZE) -> Iterator[list[str]]:
    """The entries an index lists, in ZSCAN pages of about `count`: our own keys only,
    never a SCAN of the database."""
    cursor = 0
    while True:
        cursor, page = redis_tier.call(partial(_zscan_page, index, cursor, count))
        yield [m.decode() if isinstance(m, bytes) else m for m, _ in page]
        if not cursor:
            return


def _zscan_page(index: str, cursor: int, count: int) -> tuple[int, list[Any]]:
    return redis_tier.client.zscan(index, cursor, count=count)


def _forget(index: str, keys: list[str]) -> int:
    """Delete entries of another schema or manager, and their index members."""
    pipe = redis_tier.client.pipeline(transaction=False)
    # One key per command: a cluster's pipeline takes no command over several keys.
    for k in keys:
        pipe.unlink(k)
    pipe.zrem(index, *keys)
    return sum(int(n) for n in pipe.execute()[:-1])


def _drop_members_before(key: str, cutoff: float) -> int:
    return redis_tier.client.zremrangebyscore(key, "-inf", cutoff)


def cleanup(
    selected: Sequence[type[models.Model]] | None = None, batch_size: int = BATCH_SIZE
) -> dict[str, Any]:
    """Delete from Redis what can no longer be served, in batches of at most batch_size
    keys: entries of old generations, old schemas or replaced rows; decay the hot-row
    samples and drop their cold members; forget processes that stopped reporting. Then
    prune this process's expired L1 entries. Records the run; returns its counts."""
    started = time.time()
    counts: dict[str, int | float] = {
        "scanned": 0,
        "old_generation": 0,
        "stale_rows": 0,
        "old_schema": 0,
        "hot_members": 0,
        "stale_processes": 0,
        "l1_expired": 0,
    }
    for caches in by_group(selected).values():
        g = caches[0].home
        for index in indexes(g):
            for keys in index_pages(index, batch_size):
                counts["scanned"] += len(keys)
                ours = [k for k in keys if owner(k, caches) is not None]
                others = [k for k in keys if owner(k, caches) is None]
                if others:
                    counts["old_schema"] += redis_tier.call(partial(_forget, index, others))
                # Also with no entry: drops expired members, and the index once empty.
                old, stale, _ = redis_tier.scripts(
                    [clean_call(g, index, ours, int(time.time() * 1000))]
                )[0]
                counts["old_generation"] += old
                counts["stale_rows"] += stale
        for c in {c.label: c for c in caches}.values():  # one per model
            counts["hot_members"] += _decay_hot(c)
            procs, cutoff = g.procs_key(c.label), time.time() - process_ttl()
            counts["stale_processes"] += redis_tier.call(
                partial(_drop_members_before, procs, cutoff)
            )
    counts["l1_expired"] = local_tier.prune_expired()
    counts["seconds"] = round(time.time() - started, 3)
    _record("cleanup", counts, started)
    return counts


def _decay_hot(mc: ModelCache) -> int:
    """Halve the hot-row scores per HOT_HALF_LIFE elapsed since the last decay, drop the
    members that went cold or fell out of the best HOT_KEEP. Returns members dropped."""
    now = time.time()
    key = mc.home.hot_key(mc.label)
    stamp = mc.home.hot_decay_key(mc.label)
    last = redis_tier.call(lambda: redis_tier.client.get(stamp))
    factor = 1.0
    if last is not None:
        factor = 0.5 ** (max(0.0, now - float(last)) / HOT_HALF_LIFE)

    def run() -> list[Any]:
        pipe = redis_tier.client.pipeline(transaction=True)
        pipe.zunionstore(key, {key: factor})
        pipe.zremrangebyscore(key, "-inf", f"({HOT_MIN}")
        pipe.zremrangebyrank(key, 0, -(HOT_KEEP + 1))
        pipe.expire(key, HOT_TTL)
        pipe.set(stamp, repr(now), ex=HOT_TTL)
        return pipe.execute()

    res = redis_tier.call(run)
    return int(res[1]) + int(res[2])


# -- last runs and locks ---------------------------------------------------------------


def _record(field: str, result: dict[str, Any], started: float) -> None:
    value = json.dumps({"at": started, "host": process_name(), **result}, default=str)
    try:
        redis_tier.call(lambda: redis_tier.client.hset(ops_key(), field, value))
    except Unavailable:
        logger.warning("tiered_cache: could not record the %s run", field)


def last_runs() -> dict[str, Any]:
    """{"cleanup": {...} or None, "warmup": {label: {...}}}, each with "at" (epoch)."""
    # The client never decodes replies: fields and values are bytes.
    raw = cast(dict[bytes, bytes], redis_tier.call(lambda: redis_tier.client.hgetall(ops_key())))
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
    key = lock_key(name)
    token = fresh_token()
    got = bool(
        redis_tier.call(lambda: redis_tier.client.set(key, token, nx=True, px=int(ttl * 1000)))
    )
    try:
        yield got
    finally:
        if got:
            try:
                redis_tier.scripts([release_call(key, token)])
            except Unavailable:
                pass  # it expires by itself
