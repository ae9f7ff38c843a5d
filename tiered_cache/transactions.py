"""When a write's invalidation runs, and which reads must skip the tiers.

In autocommit a statement's invalidation runs as soon as it returns. Inside a transaction
(atomic(), or autocommit turned off) it runs right after the COMMIT, before every on_commit
callback (a callback that reads must see the new row; one that raises must not cancel the
invalidation). A rollback drops it. Until then, reads of what the transaction wrote go to the database, and
so do all reads inside a transaction whose snapshot may predate other commits
(REPEATABLE READ, SERIALIZABLE, SQLite): the cache holds the latest committed rows, which
such a transaction must not see.
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.db import connections

from .capture import classify
from .invalidation import Batch, batch_of

# Set on a DatabaseWrapper while its transaction has writes waiting for the commit.
_ATTR = "tiered_cache_pending"
_local = threading.local()


class Pending:
    """The invalidations of one transaction on one connection, applied right after its
    COMMIT and dropped by its ROLLBACK."""

    __slots__ = ("alias", "batch", "done")

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.batch = Batch()
        self.done = False

    def finish(self, apply: bool) -> None:
        if self.done:
            return
        self.done = True
        dirty = getattr(_local, "dirty", None)
        if dirty and dirty.get(self.alias) is self:
            del dirty[self.alias]
        if apply:
            self.batch.apply()


def in_transaction(conn: Any) -> bool:
    return bool(conn.in_atomic_block or (conn.connection is not None and not conn.autocommit))


def current(conn: Any) -> Pending | None:
    """The connection's pending invalidations while its transaction is open. One left over
    from a transaction that ended without a commit() we saw (the connection was closed or
    lost mid-transaction) is dropped: that transaction rolled back."""
    pending: Pending | None = conn.__dict__.get(_ATTR)
    if pending is None or pending.done:
        return None
    if in_transaction(conn):
        return pending
    pending.finish(apply=False)
    return None


def record(conn: Any, batch: Batch) -> None:
    """Apply now in autocommit; otherwise right after the transaction's COMMIT."""
    if not batch:
        return
    if not in_transaction(conn):
        batch.apply()
        return
    pending = current(conn)
    if pending is None:
        pending = conn.__dict__[_ATTR] = Pending(conn.alias)
        _local.__dict__.setdefault("dirty", {})[conn.alias] = pending
    pending.batch.merge(batch)


def queue(batch: Batch, using: str) -> None:
    """An invalidation asked for by our API (invalidate, flush_cache, fn.invalidate)."""
    record(connections[using], batch)


def watch(execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    """The execute wrapper installed on every connection."""
    effects = classify(sql, params, many)
    result = execute(sql, params, many, context)
    if effects:
        conn = context["connection"]
        record(conn, batch_of(conn.alias, effects))
    return result


def install(connection: Any, **kwargs: Any) -> None:
    """connection_created receiver: watch this connection's statements and transactions.

    Statements go through Django's documented execute_wrapper(). For the end of a
    transaction Django offers only on_commit(), whose callbacks run in registration order
    (one registered before our first write would run before the invalidation and read the
    old row; one that raises would cancel it), and an entry of ours in run_on_commit would
    show up in every captureOnCommitCallbacks() of the project's tests. So this
    connection's own commit() and rollback() are wrapped: the invalidation runs right
    after COMMIT returns, before Django runs any callback, and also under
    set_autocommit(False), where Django runs no hook at commit() at all."""
    if watch not in connection.execute_wrappers:
        connection.execute_wrappers.append(watch)
    if connection.__dict__.get("tiered_cache_hooked"):
        return
    connection.tiered_cache_hooked = True
    commit, rollback = connection.commit, connection.rollback

    def commit_then_invalidate() -> None:
        commit()
        pending = connection.__dict__.get(_ATTR)
        if pending is not None:
            pending.finish(apply=True)

    def rollback_and_forget() -> None:
        try:
            rollback()
        finally:
            pending = connection.__dict__.get(_ATTR)
            if pending is not None:
                pending.finish(apply=False)

    connection.commit = commit_then_invalidate
    connection.rollback = rollback_and_forget


# -- reads ------------------------------------------------------------------------------

_snapshot: list[frozenset[str]] = []


def _is_snapshot_level(level: Any, engine: str) -> bool:
    if isinstance(level, str):
        return level.strip().lower().replace("_", " ") in ("repeatable read", "serializable")
    name = getattr(level, "name", None)
    if name is not None:
        return str(name).upper() in ("REPEATABLE_READ", "SERIALIZABLE")
    if "postgresql" in engine:
        from django.db.backends.postgresql.psycopg_any import is_psycopg3

        return int(level) in ((3, 4) if is_psycopg3 else (2, 3))
    return False


def snapshot_aliases() -> frozenset[str]:
    """Aliases whose transactions read from a snapshot older than their first statement."""
    if not _snapshot:
        out = set()
        for alias, db in settings.DATABASES.items():
            engine = str(db.get("ENGINE", ""))
            level = (db.get("OPTIONS") or {}).get("isolation_level")
            if "sqlite" in engine or (level is not None and _is_snapshot_level(level, engine)):
                out.add(alias)
        _snapshot.append(frozenset(out))
    return _snapshot[0]


def forget_databases(setting: str = "DATABASES", **kwargs: Any) -> None:
    if setting == "DATABASES":
        _snapshot.clear()


def _written(dirty: dict[str, Pending], gids: list[str]) -> bool:
    """Whether an open transaction of this thread (on any connection) wrote these groups."""
    for alias in list(dirty):
        pending = current(connections[alias])
        if pending is not None and any(gid in pending.batch.rows for gid in gids):
            return True
    return False


def bypass(read_alias: str, group_alias: str, gid: str) -> str | None:
    """Why a read must skip both tiers now, or None."""
    dirty = getattr(_local, "dirty", None)
    if dirty and _written(dirty, [gid]):
        return "written in this transaction"
    if read_alias in snapshot_aliases() and in_transaction(connections[read_alias]):
        return "snapshot isolation"
    return None


def bypass_any(gids: list[tuple[str, str]]) -> str | None:
    """For derived functions: any dependency written here, or any snapshot transaction."""
    dirty = getattr(_local, "dirty", None)
    if dirty and _written(dirty, [gid for _, gid in gids]):
        return "written in this transaction"
    for alias in snapshot_aliases():
        conn = connections[alias]
        if in_transaction(conn):
            return "snapshot isolation"
    return None
