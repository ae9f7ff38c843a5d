"""What an invalidation does: the Redis scripts and bus message, this process's L1, and the
outbox for what Redis could not take."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable
from typing import Any

from django.db import DatabaseError, connections, models, router

from . import signals
from .conf import conf
from .groups import Group, channel, database_of, group, group_by_id, root_label
from .keys import pk_row_id
from .tiers.local import local_tier
from .tiers.remote import Unavailable, fresh_token, redis_tier

logger = logging.getLogger("tiered_cache")

# Identifies this process's own bus messages (renewed after fork).
origin = {"id": fresh_token()}


class Batch:
    """Rows, flushes and derived-result drops of several groups, applied together."""

    def __init__(self) -> None:
        # group id -> row ids; an empty set still counts as a write (negatives drop).
        self.rows: dict[str, set[str]] = {}
        self.flush: set[str] = set()
        self.groups: dict[str, Group] = {}
        # Keys of derived results dropped by fn.invalidate().
        self.fn_keys: dict[str, str] = {}

    def add_rows(self, g: Group, rids: Iterable[str]) -> None:
        self.groups[g.id] = g
        self.rows.setdefault(g.id, set()).update(rids)

    def add_flush(self, g: Group) -> None:
        self.add_rows(g, ())
        self.flush.add(g.id)

    def add_fn_key(self, fn_label: str, key: str) -> None:
        self.fn_keys[key] = fn_label

    def merge(self, other: Batch) -> None:
        for gid, rids in other.rows.items():
            self.groups[gid] = other.groups[gid]
            self.rows.setdefault(gid, set()).update(rids)
        self.flush |= other.flush
        self.fn_keys.update(other.fn_keys)

    def __bool__(self) -> bool:
        return bool(self.rows or self.fn_keys)

    # -- applying ----------------------------------------------------------------
    def apply(self, notify: bool = True) -> None:
        """Redis first, then this process's L1: a thread of ours that refills L1 from L2
        in between took its fill token before the local drop, which refuses the fill.
        (Dropping locally first let such a thread put the old row back.)"""
        if not self:
            return
        try:
            # Never skipped by an open breaker: an invalidation Redis could have taken but
            # was not sent reaches the other processes only through the outbox, later
            # (a failure here costs this write at most a connect and a read timeout).
            redis_tier.run_many(self.redis_calls(), force=True)
        except Unavailable:
            self.to_outbox()
        else:
            with _outbox.lock:
                if not _outbox.flushed:  # else a drain still owes those groups a flush
                    _outbox.reset()
        finally:
            apply_locally(self.rows, self.flush, self.fn_keys)
        if notify:
            self.send_signals()

    def send_signals(self) -> None:
        """Count the invalidations and send cache_invalidated (receivers may query)."""
        _count_and_signal(self)

    def redis_calls(self) -> list[tuple[str, list[str], list[Any]]]:
        calls: list[tuple[str, list[str], list[Any]]] = []
        ch = channel()
        if self.rows:
            # Derived results first: once the bus message below is out, none may still pass.
            # Every written group is bumped, whether or not this process knows a function
            # that depends on it: the one that does may live in another process.
            calls.append(
                ("bump", [self.groups[gid].fn_counter for gid in self.rows], [fresh_token()])
            )
        for key, fn_label in self.fn_keys.items():
            calls.append(drop_fn_call(fn_label, key))
        for gid, rids in self.rows.items():
            g = self.groups[gid]
            flush = gid in self.flush
            ordered = sorted(rids)
            if len(ordered) > conf.BULK_INVALIDATION_LIMIT:
                ordered, flush = [], True
            msg = json.dumps({"o": origin["id"], "g": gid, "r": ordered, "f": int(flush)})
            calls.append(
                (
                    "inv",
                    [g.gen_key, g.writes_key, *[g.row_key(r) for r in ordered]],
                    [
                        ch,
                        msg,
                        len(ordered),
                        fresh_token(),
                        int((conf.TIMEOUT + 60) * 1000),
                        "1" if flush else "0",
                        fresh_token(),
                    ],
                )
            )
        return calls

    def to_outbox(self) -> None:
        """Keep what could not reach Redis in the database, bounded: past OUTBOX_LIMIT rows
        in one outage a group is recorded as flushed instead of row by row."""
        from .models import PendingInvalidation

        entries = []
        with _outbox.lock:
            for gid, rids in self.rows.items():
                if gid in _outbox.flushed:
                    continue  # a pending flush of the group covers these rows
                flush = gid in self.flush or _outbox.rows + len(rids) > conf.OUTBOX_LIMIT
                if flush:
                    _outbox.flushed.add(gid)
                    rids = set()
                _outbox.rows += len(rids) or 1
                entries.append(PendingInvalidation(model_label=gid, rows=sorted(rids), flush=flush))
            for key, fn_label in self.fn_keys.items():
                entries.append(PendingInvalidation(model_label=fn_label, rows=[key]))
        from .bus import bus

        if not entries:
            bus.undelivered()  # skipped rows: the drain flushes their groups afterwards
            return
        try:
            _write_outbox(entries)
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


def _write_outbox(entries: list[Any]) -> None:
    """Insert outbox rows, committed at once. Right after a COMMIT (inside atomic()'s exit,
    before Django turns autocommit back on) or under set_autocommit(False), the rows must
    not open or join a transaction of the caller's connection: they go through a
    connection of their own."""
    from .models import PendingInvalidation

    alias = router.db_for_write(PendingInvalidation)
    conn = connections[alias]
    if conn.get_autocommit() and not conn.in_atomic_block:
        PendingInvalidation.objects.using(alias).bulk_create(entries)
        return
    own = connections.create_connection(alias)
    try:
        opts = PendingInvalidation._meta
        fields = [f for f in opts.concrete_fields if not f.primary_key]
        for e in entries:
            for f in fields:
                f.pre_save(e, add=True)  # created_at's auto_now_add
        qn = own.ops.quote_name
        sql = "INSERT INTO {} ({}) VALUES ({})".format(
            qn(opts.db_table),
            ", ".join(qn(f.column) for f in fields),
            ", ".join(["%s"] * len(fields)),
        )
        with own.cursor() as cursor:
            cursor.executemany(
                sql,
                [[f.get_db_prep_save(getattr(e, f.attname), own) for f in fields] for e in entries],
            )
    finally:
        own.close()


def _count_and_signal(batch: Batch) -> None:
    from .registry import model_caches_of_group

    for gid, rids in batch.rows.items():
        caches = model_caches_of_group(batch.groups[gid])
        for mc in caches:
            mc.counters.invalidations += max(1, len(rids))
        if signals.cache_invalidated.receivers and caches:
            signals.cache_invalidated.send(
                sender=caches[0].model, rows=sorted(rids), flush=gid in batch.flush
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


def apply_locally(
    rows: dict[str, Iterable[str]], flush: Iterable[str], fn_keys: dict[str, str] | None = None
) -> None:
    """Drop what a batch invalidated from this process's L1 (own writes and bus messages)."""
    flush = set(flush)
    for gid, rids in rows.items():
        if gid in flush:
            local_tier.drop_model(gid)
        local_tier.drop_rows(gid, list(rids))
    for key, fn_label in (fn_keys or {}).items():
        local_tier.drop_key(key, fn_label)
    if rows:
        for hook in local_hooks:
            hook(set(rows))


# Called with the set of group ids written, in every process (derived caches).
local_hooks: list[Any] = []


def drop_fn_call(
    fn_label: str, key: str, ttl: float | None = None
) -> tuple[str, list[str], list[Any]]:
    """Replace one derived result by a tombstone, which refuses fills begun before it."""
    msg = json.dumps({"o": origin["id"], "k": key, "m": fn_label})
    ttl_ms = int((ttl if ttl is not None else conf.TIMEOUT) * 1000)
    return ("ddrop", [key], ["T|" + fresh_token(), ttl_ms, channel(), msg])


def drain_outbox(limit: int = 1000, force: bool = False) -> int:
    """Apply invalidations that earlier failed to reach Redis: every entry of the outbox,
    `limit` at a time, and a flush of each model this process stopped recording row by
    row (OUTBOX_LIMIT), since rows it skipped may not be covered by a flush entry another
    process drained already. Raises Unavailable if Redis still cannot take them (they
    stay in the outbox). force: past an open breaker (see RedisTier.scripts)."""
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
            for gid in flushed:
                g = group_by_id(gid)
                if g is not None:
                    batch.add_flush(g)
            for p in pending:
                if p.model_label.startswith("fn:"):
                    for key in p.rows:
                        batch.add_fn_key(p.model_label, key)
                    continue
                g = group_by_id(p.model_label)
                if g is None:
                    continue
                if p.flush:
                    batch.add_flush(g)
                batch.add_rows(g, p.rows)
            if batch:
                redis_tier.run_many(batch.redis_calls(), force=force)
                apply_locally(batch.rows, batch.flush, batch.fn_keys)
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


# -- what writes touch ----------------------------------------------------------


def batch_of(alias: str, effects: Iterable[Any]) -> Batch:
    """The batch for a statement's effects on the connection `alias`."""
    from .capture import FLUSH

    batch = Batch()
    alias = database_of(alias)
    for e in effects:
        g = group(alias, e.label)
        if e.kind == FLUSH:
            batch.add_flush(g)
        else:
            batch.add_rows(g, e.rids)
    return batch


def rows_batch(model: type[models.Model], pks: Iterable[Any], alias: str) -> Batch:
    batch = Batch()
    pk = model._meta.pk
    batch.add_rows(
        group(database_of(alias), root_label(model)),
        [pk_row_id(pk, p) for p in pks if p is not None],
    )
    return batch


def flush_batch(model: type[models.Model], alias: str) -> Batch:
    batch = Batch()
    batch.add_flush(group(database_of(alias), root_label(model)))
    return batch
