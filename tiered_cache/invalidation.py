"""What a write drops, and when: now in autocommit, at the outermost commit otherwise."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

from django.db import DatabaseError, connections, models, transaction

from . import signals
from .conf import conf
from .keys import row_id
from .registry import ModelCache, first_model_cache
from .tiers.local import local_tier
from .tiers.remote import Unavailable, fresh_token, redis_tier

logger = logging.getLogger("tiered_cache")

# Identifies this process's own bus messages (renewed after fork).
origin = {"id": fresh_token()}


class Batch:
    """Rows and flushes of several models, applied together."""

    def __init__(self) -> None:
        self.rows: dict[str, set[str]] = {}
        self.flush: set[str] = set()
        self.caches: dict[str, ModelCache] = {}

    def add_rows(self, mc: ModelCache, rids: Iterable[str]) -> None:
        self.caches[mc.label] = mc
        self.rows.setdefault(mc.label, set()).update(rids)

    def add_flush(self, mc: ModelCache) -> None:
        self.caches[mc.label] = mc
        self.flush.add(mc.label)
        self.rows.setdefault(mc.label, set())

    def merge(self, other: Batch) -> None:
        for label, rids in other.rows.items():
            self.caches[label] = other.caches[label]
            self.rows.setdefault(label, set()).update(rids)
        self.flush |= other.flush

    def __bool__(self) -> bool:
        return bool(self.rows)

    def models(self) -> set[str]:
        return set(self.rows)

    # -- applying ----------------------------------------------------------------
    def apply(self) -> None:
        if not self.rows:
            return
        # This process first, so read-your-writes never waits on Redis.
        apply_locally(self.rows, self.flush)
        for label, rids in self.rows.items():
            mc = self.caches[label]
            mc.counters.invalidations += max(1, len(rids))
        try:
            # Never skipped by an open breaker: an invalidation Redis could have taken but
            # was not sent reaches the other processes only through the outbox, later
            # (a failure here costs this write at most a connect and a read timeout).
            redis_tier.run_many(self.redis_calls(), force=True)
        except Unavailable:
            self.to_outbox()
        else:
            with _outbox.lock:
                if not _outbox.flushed:  # else a drain still owes those models a flush
                    _outbox.reset()
        for label, rids in self.rows.items():
            if signals.cache_invalidated.receivers:
                signals.cache_invalidated.send(
                    sender=self.caches[label].model, rows=sorted(rids), flush=label in self.flush
                )

    def redis_calls(self) -> list[tuple[str, list[str], list[Any]]]:
        calls: list[tuple[str, list[str], list[Any]]] = []
        # Derived results first: once the bus message below is out, none may still pass.
        bumps = [key for label in self.rows for key in dependency_counters(label)]
        if bumps:
            calls.append(("bump", bumps, [fresh_token()]))
        for label, rids in self.rows.items():
            mc = self.caches[label]
            flush = label in self.flush
            rids = sorted(rids)
            if len(rids) > conf.BULK_INVALIDATION_LIMIT:
                rids, flush = [], True
            row_keys = [mc.row_key(r) for r in rids]
            data_keys = [mc.pk_lookup.key_prefix + _pk_part(r) for r in rids]
            msg = json.dumps({"o": origin["id"], "m": label, "r": rids, "f": int(flush)})
            calls.append(
                (
                    "inv",
                    [mc.gen_key, mc.writes_key, *row_keys, *data_keys],
                    [channel(), msg, len(row_keys), fresh_token(),
                     int((mc.timeout + 60) * 1000), "1" if flush else "0", fresh_token()],
                )
            )
        return calls

    def to_outbox(self) -> None:
        """Keep what could not reach Redis in the database, bounded: past OUTBOX_LIMIT rows
        in one outage a model is recorded as flushed instead of row by row."""
        from .models import PendingInvalidation

        entries = []
        with _outbox.lock:
            for label, rids in self.rows.items():
                if label in _outbox.flushed:
                    continue  # a pending flush of the model covers these rows
                flush = label in self.flush or _outbox.rows + len(rids) > conf.OUTBOX_LIMIT
                if flush:
                    _outbox.flushed.add(label)
                    rids = set()
                _outbox.rows += len(rids) or 1
                entries.append(PendingInvalidation(model_label=label, rows=sorted(rids),
                                                   flush=flush))
        from .bus import bus

        if not entries:
            bus.undelivered()  # skipped rows: the drain flushes their models afterwards
            return
        try:
            PendingInvalidation.objects.bulk_create(entries)
        except DatabaseError:
            logger.exception("tiered_cache: could not record invalidations in the outbox")
            return
        bus.undelivered()
        if not _outbox.warned:
            _outbox.warned = True
            logger.warning(
                "tiered_cache: Redis is unavailable; invalidations are kept in the outbox "
                "table and applied before any process reads L2 again"
            )


class _OutboxState:
    """What this process put in the outbox during the current outage."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.rows = 0
        self.flushed: set[str] = set()
        self.warned = False


_outbox = _OutboxState()


def _pk_part(rid: str) -> str:
    """A row id is the encoded pk with '|' and '%' escaped; data keys use it unescaped."""
    return rid.replace("%7C", "|").replace("%25", "%")


def channel() -> str:
    return conf.KEY_PREFIX + ":bus"


def apply_locally(rows: dict[str, Iterable[str]], flush: Iterable[str]) -> None:
    flush = set(flush)
    for label, rids in rows.items():
        if label in flush:
            local_tier.drop_model(label)
        local_tier.drop_rows(label, list(rids))
    for hook in local_hooks:
        hook(set(rows))


# Called with the set of model labels written, in every process (derived caches).
local_hooks: list[Any] = []


def dependency_counters(label: str) -> list[str]:
    """Redis keys counting writes of this model for the cached functions depending on it."""
    from .derived import dependency_counters as counters

    return counters(label)


def drain_outbox(limit: int = 1000, force: bool = False) -> int:
    """Apply invalidations that earlier failed to reach Redis: every entry of the outbox,
    `limit` at a time, and a flush of each model this process stopped recording row by
    row (OUTBOX_LIMIT), since rows it skipped may not be covered by a flush entry another
    process drained already. Raises Unavailable if Redis still cannot take them (they
    stay in the outbox). force: past an open breaker (see RedisTier.scripts)."""
    from django.apps import apps

    from .models import PendingInvalidation

    with _outbox.lock:
        flushed = _outbox.flushed
        _outbox.reset()
    total = 0
    try:
        while True:
            pending = list(PendingInvalidation.objects.order_by("id")[:limit])
            if not pending and not flushed:
                break
            batch = Batch()
            extra: list[tuple[str, list[str], list[Any]]] = []
            for label in flushed:
                mc = first_model_cache(apps.get_model(label))
                if mc is not None:
                    batch.add_flush(mc)
            for p in pending:
                if p.model_label.startswith("fn:"):
                    from .derived import _functions

                    fn = _functions.get(p.model_label)
                    if fn is not None:
                        extra += [fn.drop_key_args(key) for key in p.rows]
                    continue
                try:
                    model = apps.get_model(p.model_label)
                except LookupError:
                    continue
                mc = first_model_cache(model)
                if mc is None:
                    continue
                if p.flush:
                    batch.add_flush(mc)
                batch.add_rows(mc, p.rows)
            if batch:
                apply_locally(batch.rows, batch.flush)
            if batch or extra:
                redis_tier.run_many(batch.redis_calls() + extra, force=force)
            flushed = set()
            PendingInvalidation.objects.filter(id__in=[p.id for p in pending]).delete()
            total += len(pending)
            if len(pending) < limit:
                break
    except BaseException:  # Redis or the database failed: what was not applied is owed
        with _outbox.lock:
            _outbox.flushed |= flushed
        raise
    if total:
        logger.warning("tiered_cache: applied %d outbox invalidations", total)
    return total


# -- transactions ---------------------------------------------------------------

_thread = threading.local()


class _Pending:
    """The invalidations of one savepoint level, run by on_commit at the outermost commit."""

    def __init__(self) -> None:
        self.batch = Batch()

    def __call__(self) -> None:
        self.batch.apply()


def _live_pendings(conn: Any) -> list[_Pending]:
    registered = {id(item[1]) for item in conn.run_on_commit}
    return [p for p in getattr(conn, "_tiered_pending", {}).values() if id(p) in registered]


def queue(batch: Batch, using: str) -> None:
    """Apply now in autocommit; inside atomic(), at the outermost commit (none on rollback)."""
    if not batch:
        return
    conn = connections[using]
    if not conn.in_atomic_block:
        batch.apply()
        return
    table: dict[tuple[str, ...], _Pending] = conn.__dict__.setdefault("_tiered_pending", {})
    sids = tuple(conn.savepoint_ids)
    pending = table.get(sids)
    if pending is None or pending not in _live_pendings(conn):
        # A rolled-back savepoint dropped its hook; start a fresh one at this level.
        for stale in [k for k, p in table.items() if p not in _live_pendings(conn)]:
            del table[stale]
        pending = table[sids] = _Pending()
        transaction.on_commit(pending, using=using, robust=True)
    pending.batch.merge(batch)
    dbs = _thread.__dict__.setdefault("dbs", set())
    dbs.add(using)


def in_dirty_transaction(label: str, using: str) -> bool:
    """True inside an atomic() block that has written rows of this model: such reads
    bypass both tiers, so they see the block's writes and fill nothing."""
    dbs = _thread.__dict__.get("dbs")
    if not dbs or using not in dbs:
        return False
    conn = connections[using]
    if not conn.in_atomic_block:
        dbs.discard(using)
        return False
    return any(label in p.batch.rows for p in _live_pendings(conn))


# -- what writes touch ----------------------------------------------------------

def _caches_for(model: type[models.Model]) -> list[ModelCache]:
    """The model's cache and those of its cached concrete parents (multi-table inheritance)."""
    out = []
    concrete = model._meta.concrete_model
    for m in [concrete, *concrete._meta.get_parent_list()]:
        mc = first_model_cache(m)
        if mc is not None:
            out.append(mc)
    return out


def rows_batch(model: type[models.Model], pks: Iterable[Any]) -> Batch:
    batch = Batch()
    pks = [pk for pk in pks if pk is not None]
    for mc in _caches_for(model):
        batch.add_rows(mc, [row_id(mc.pk_lookup.preps[0](pk)) for pk in pks])
    return batch


def flush_batch(model: type[models.Model]) -> Batch:
    batch = Batch()
    for mc in _caches_for(model):
        batch.add_flush(mc)
    return batch


def model_written_batch(model: type[models.Model]) -> Batch:
    """A write whose rows we cannot name (new rows with no pk): drop negatives only."""
    batch = Batch()
    for mc in _caches_for(model):
        batch.add_rows(mc, [])
    return batch


def on_save(sender: type[models.Model], instance: models.Model, raw: bool = False,
            using: str = "default", **kwargs: Any) -> None:
    queue(rows_batch(sender, [instance.pk]), using)


def on_delete(sender: type[models.Model], instance: models.Model, using: str = "default",
              **kwargs: Any) -> None:
    queue(rows_batch(sender, [instance.pk]), using)
