"""Delivering invalidations: a Batch of written rows, flushed groups and dropped derived
results goes to Redis (new row versions, the bus message), then to this process's L1; what
Redis cannot take goes to the outbox, delivered later by drain_outbox()."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from django.db import connections, models
from redis.exceptions import ResponseError

from . import outbox, recording, signals
from .conf import conf
from .groups import root_label, write_groups
from .keys import (
    DerivedDrop,
    Group,
    RowsMessage,
    ScriptCall,
    Undelivered,
    bump_call,
    cluster_mode,
    derived_drop_call,
    equal_as_in_python,
    group_by_id,
    invalidate_calls,
    pk_row_id,
    publish_in_script,
)
from .models import PendingInvalidation
from .registry import model_caches_of_group
from .tiers.local import local_tier
from .tiers.remote import Unavailable, fresh_token, redis_tier

__all__ = [
    "Batch",
    "apply_locally",
    "drain_outbox",
    "flush_batch",
    "local_hooks",
    "origin",
    "rows_batch",
    "undelivered_hooks",
]

logger = logging.getLogger("tiered_cache")


class _Origin:
    """Identifies this process's own bus messages (renewed in a forked child)."""

    def __init__(self) -> None:
        self.id = fresh_token()
        # Runs after fresh_token renewed itself (registered earlier, at its import).
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.id = fresh_token()


origin = _Origin()

# Called with the set of group ids written, in every process (derived caches drop their
# results). Wired by derived.py.
local_hooks: list[Callable[[set[str]], None]] = []
# Called when an invalidation went to the outbox instead of Redis (the bus stops trusting
# the tiers until it is delivered). Wired in AppConfig.ready().
undelivered_hooks: list[Callable[[], None]] = []


class Batch:
    """Rows, flushes and derived-result drops of several groups, applied together."""

    def __init__(self) -> None:
        # group id -> row ids; an empty set still counts as a write (negatives drop).
        self.rows: dict[str, set[str]] = {}
        self.flush: set[str] = set()
        self.groups: dict[str, Group] = {}
        # Keys of derived results dropped by fn.invalidate() -> the function's label.
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
            self.send(force=True)
        except Unavailable as exc:
            # Redis answered with an error: the other processes still trust their tiers
            # and are told so below, and will trust again once the outbox is delivered, so
            # it must hold this write even where a pending flush of ours already covers it
            # (another process may have delivered and removed that flush meanwhile).
            answered = isinstance(exc.__cause__, ResponseError)
            outbox.record(self.rows, self.flush, self.fn_keys, again=answered)
            # Even with nothing written (a pending flush covers it), this process must
            # not trust the tiers until the drain.
            for hook in undelivered_hooks:
                hook()
            # On a cluster the bus channel's node may answer where another failed (paused
            # writes in a CLUSTER FAILOVER, a node gone): the others' heartbeats go on there,
            # and reads by MGET go on on the failed node, so tell them too.
            if answered or cluster_mode():
                self.announce_undelivered()
        else:
            outbox.outage.delivered()
        finally:
            apply_locally(self.rows, self.flush, self.fn_keys)
        if notify:
            self.send_signals()

    def send_signals(self) -> None:
        """Count the invalidations and send cache_invalidated (receivers may query)."""
        for gid, rids in self.rows.items():
            caches = model_caches_of_group(self.groups[gid])
            for mc in caches:
                mc.counters.invalidations += max(1, len(rids))
            if signals.cache_invalidated.receivers and caches:
                signals.cache_invalidated.send(
                    sender=caches[0].model, rows=sorted(rids), flush=gid in self.flush
                )
            if recording.active and caches:  # a debug-toolbar panel records
                recording.invalidated(
                    [mc.label for mc in caches], sorted(rids), gid in self.flush, self.groups[gid]
                )
        if recording.active:
            for key, fn_label in self.fn_keys.items():
                recording.invalidated([fn_label], [], False, None, key)

    def redis_calls(self) -> tuple[list[ScriptCall], list[str]]:
        """The scripts, and the bus messages to publish once they all ran (none where the
        scripts publish themselves, keys.publish_in_script)."""
        calls: list[ScriptCall] = []
        after: list[str] = []
        if self.rows:
            # Derived results first: once the bus message below is out, none may still pass.
            # Every written group is bumped, whether or not this process knows a function
            # that depends on it: the one that does may live in another process.
            calls.append(
                bump_call([self.groups[gid].fn_counter for gid in self.rows], fresh_token())
            )
        for key, fn_label in self.fn_keys.items():
            drop = DerivedDrop(origin.id, key, fn_label)
            calls.append(drop_derived_call(drop))
            if cluster_mode():
                after.append(drop.encode())
        version_ttl_ms = int((conf.TIMEOUT + 60) * 1000)
        inside = publish_in_script()
        for gid, ordered, message in self._row_messages():
            calls.extend(
                invalidate_calls(
                    self.groups[gid], ordered, message, fresh_token(), version_ttl_ms, fresh_token()
                )
            )
            if not inside:
                after.append(message.encode())
        return calls, after

    def _row_messages(self) -> Iterator[tuple[str, list[str], RowsMessage]]:
        """Each written group's rows, in order (none past BULK_INVALIDATION_LIMIT: the
        group is flushed), and its bus message."""
        for gid, rids in self.rows.items():
            flush = gid in self.flush
            ordered = sorted(rids)
            if len(ordered) > conf.BULK_INVALIDATION_LIMIT:
                ordered, flush = [], True
            yield gid, ordered, RowsMessage(origin.id, gid, tuple(ordered), flush)

    def announce_undelivered(self) -> None:
        """Redis answered but refused the scripts (out of memory, too few replicas to
        write...), or on a cluster a node failed them: L2 keeps the old rows and the bus
        message, sent by the
        script or after it, may not have gone out, while the other processes' heartbeats
        are still answered and keep their L1 trusted. A PUBLISH still goes through: first
        tell every process to stop trusting the tiers until the outbox is delivered, then
        drop the rows from their L1 as the scripts would have."""
        messages = [Undelivered(origin.id).encode()]
        messages += [m.encode() for _, _, m in self._row_messages()]
        messages += [DerivedDrop(origin.id, k, f).encode() for k, f in self.fn_keys.items()]
        try:
            redis_tier.publish(messages)
        except Unavailable as exc:
            # Unreachable by now: the other processes' heartbeats go unanswered and their
            # trust lapses on its own. Refused: they learn only from the outbox.
            logger.warning("tiered_cache: could not announce undelivered invalidations: %s", exc)

    def send(self, force: bool) -> None:
        """Run the batch's scripts and publish its messages: Unavailable if Redis did not
        take them all (or too few replicas acknowledged them)."""
        calls, after = self.redis_calls()
        redis_tier.scripts(calls, force=force, acks=redis_tier.replica_acks(), publish=after)


def drop_derived_call(message: DerivedDrop, ttl: float | None = None) -> ScriptCall:
    """Replace one derived result by a tombstone, which refuses fills begun before it."""
    ttl_ms = int((ttl if ttl is not None else conf.TIMEOUT) * 1000)
    return derived_drop_call(message, fresh_token(), ttl_ms)


def apply_locally(
    rows: Mapping[str, Iterable[str]], flush: Iterable[str], fn_keys: dict[str, str] | None = None
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


def apply_message(message: RowsMessage | DerivedDrop) -> None:
    """Another process's invalidation, from the bus: this process's L1 only."""
    if isinstance(message, DerivedDrop):
        apply_locally({}, [], {message.key: message.fn_label})
    else:
        gid = message.group_id
        apply_locally({gid: message.rows}, [gid] if message.flush else [])


def drain_outbox(limit: int = 1000, force: bool = False) -> int:
    """Apply invalidations that earlier failed to reach Redis: every entry of the outbox,
    `limit` at a time, and a flush of each group this process stopped recording row by
    row (OUTBOX_LIMIT), since rows it skipped may not be covered by a flush entry another
    process drained already, or could not record at all (the database refused: the
    groups flushed, the derived keys dropped). Raises Unavailable if Redis still cannot
    take them (they stay in the outbox, or owed). force: past an open breaker (see
    RedisTier.scripts)."""
    flushed, unrecorded, derived = outbox.outage.take_owed()
    total = 0
    try:
        while True:
            pending = outbox.pending(limit)
            if not pending and not flushed and not unrecorded and not derived:
                break
            batch = Batch()
            for gid in flushed | unrecorded:
                g = group_by_id(gid)
                if g is not None:
                    batch.add_flush(g)
            for key, fn_label in derived.items():
                batch.add_fn_key(fn_label, key)
            for p in pending:
                if p.kind == PendingInvalidation.DERIVED:
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
                batch.send(force)
                apply_locally(batch.rows, batch.flush, batch.fn_keys)
            flushed, unrecorded, derived = set(), set(), {}
            outbox.remove(pending)
            total += len(pending)
            if len(pending) < limit:
                break
    except BaseException:  # Redis or the database failed: what was not applied is owed
        outbox.outage.owe(flushed, unrecorded, derived)
        raise
    if total:
        logger.warning("tiered_cache: applied %d outbox invalidations", total)
    return total


# -- what writes touch ----------------------------------------------------------


def rows_batch(model: type[models.Model], pks: Iterable[Any], alias: str) -> Batch:
    """Rows of a model written through the database `alias`, in every group that may
    cache them (groups.write_groups)."""
    batch = Batch()
    pk = model._meta.pk
    if not equal_as_in_python(pk, connections[alias].vendor):
        # `pks` may spell a row's key otherwise than the row does ("BOB" for "bob").
        return flush_batch(model, alias)
    rids = [pk_row_id(pk, p) for p in pks if p is not None]
    for g in write_groups(root_label(model), alias):
        batch.add_rows(g, rids)
    return batch


def flush_batch(model: type[models.Model], alias: str) -> Batch:
    """Every row of a model written through the database `alias` (groups.write_groups)."""
    batch = Batch()
    for g in write_groups(root_label(model), alias):
        batch.add_flush(g)
    return batch
