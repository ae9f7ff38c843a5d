"""The outbox: invalidations Redis could not take, kept in the database table
PendingInvalidation until a process delivers them (invalidation.drain_outbox), bounded per
outage."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable

from django.db import DatabaseError, connections, router

from .conf import conf
from .models import PendingInvalidation

__all__ = ["Outage", "outage", "pending", "record", "remove"]

logger = logging.getLogger("tiered_cache")


class Outage:
    """What this process put in the outbox during the current outage: how many rows, and
    the groups it recorded as flushed instead (past OUTBOX_LIMIT rows, or a flush). And
    what the database refused to record, owed in this process's memory until it is in the
    table or delivered: its groups (flushed then) and its derived keys."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.rows = 0
        self.flushed: set[str] = set()
        self.unrecorded: set[str] = set()
        # Derived-result key -> function label.
        self.unrecorded_derived: dict[str, str] = {}
        self.warned = False
        os.register_at_fork(after_in_child=self.after_fork)

    def reset(self) -> None:
        self.rows = 0
        self.flushed = set()
        self.unrecorded = set()
        self.unrecorded_derived = {}
        self.warned = False

    def take_owed(self) -> tuple[set[str], set[str], dict[str, str]]:
        """What a drain delivers beyond the table (the groups recorded as flushed, the
        groups and derived keys the database refused), and the outage forgotten."""
        with self.lock:
            owed = self.flushed, self.unrecorded, self.unrecorded_derived
            self.reset()
        return owed

    def owe(self, flushed: set[str], unrecorded: set[str], derived: dict[str, str]) -> None:
        """A drain failed (these are still owed, as take_owed() gave them), or the
        database refused to record a batch (its groups and derived keys)."""
        with self.lock:
            self.flushed |= flushed
            self.unrecorded |= unrecorded
            self.unrecorded_derived.update(derived)

    def recorded(self, groups: set[str], derived: dict[str, str]) -> None:
        """What the database refused earlier is in the table now."""
        with self.lock:
            self.unrecorded -= groups
            for key in derived:
                self.unrecorded_derived.pop(key, None)

    def delivered(self) -> None:
        """An invalidation reached Redis: the outage is over, unless a drain still owes
        something."""
        with self.lock:
            if not (self.flushed or self.unrecorded or self.unrecorded_derived):
                self.reset()

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.reset()


outage = Outage()


def record(
    rows: dict[str, set[str]], flush: set[str], derived: dict[str, str], again: bool = False
) -> bool:
    """Keep a batch's invalidations (group id -> row ids, flushed group ids, derived key ->
    function label) in the outbox, committed at once. Past OUTBOX_LIMIT rows in one outage
    a group is recorded as flushed instead of row by row. False if nothing was written
    (the database refused, or a pending flush covers every row). again: a group this
    process already recorded as flushed gets a flush entry again, not nothing.
    If the database refuses, the batch is owed in this process's memory: its next drain
    delivers it (its groups flushed), and its next recorded batch takes it into the
    table (as flush entries), where every process's drain finds it."""
    entries = []
    with outage.lock:
        for gid, rids in rows.items():
            if gid in outage.flushed:
                if again:
                    entries.append(PendingInvalidation(model_label=gid, rows=[], flush=True))
                continue  # a pending flush of the group covers these rows
            whole = gid in flush or outage.rows + len(rids) > conf.OUTBOX_LIMIT
            if whole:
                outage.flushed.add(gid)
                rids = set()
            outage.rows += len(rids) or 1
            entries.append(PendingInvalidation(model_label=gid, rows=sorted(rids), flush=whole))
        earlier, earlier_derived = set(outage.unrecorded), dict(outage.unrecorded_derived)
    entries += [PendingInvalidation(model_label=gid, rows=[], flush=True) for gid in earlier]
    entries += [
        PendingInvalidation(kind=PendingInvalidation.DERIVED, model_label=fn_label, rows=[key])
        for key, fn_label in (derived | earlier_derived).items()
    ]
    if not entries:
        return False
    try:
        _write(entries)
    except DatabaseError:
        # The write is committed and Redis did not take its invalidation: this process's
        # memory is all that holds it now (until the table takes it, or its drain).
        outage.owe(set(), set(rows), derived)
        logger.exception(
            "tiered_cache: could not record invalidations in the outbox; this process "
            "flushes the groups %s from Redis when it reaches Redis again",
            sorted(rows),
        )
        return False
    outage.recorded(earlier, earlier_derived)
    if not outage.warned:
        outage.warned = True
        logger.warning(
            "tiered_cache: Redis is unavailable; invalidations are kept in the outbox "
            "table and applied before any process reads L2 again"
        )
    return True


def _write(entries: list[PendingInvalidation]) -> None:
    """Insert outbox rows, committed at once. Right after a COMMIT (inside atomic()'s exit,
    before Django turns autocommit back on) or under set_autocommit(False), the rows must
    not open or join a transaction of the caller's connection: they go through a
    connection of their own."""
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


def pending(limit: int) -> list[PendingInvalidation]:
    """The oldest `limit` undelivered invalidations."""
    return list(PendingInvalidation.objects.order_by("id")[:limit])


def remove(entries: Iterable[PendingInvalidation]) -> None:
    """Forget delivered invalidations."""
    PendingInvalidation.objects.filter(id__in=[e.id for e in entries]).delete()
