"""When a write's invalidation runs, and which reads must skip the tiers.

In autocommit a statement's invalidation runs as soon as it returns. Inside a transaction
it waits for the commit and then runs first, before every on_commit callback (a callback
that reads must see the new row; one that raises must not cancel the invalidation). A
rollback drops it. Until then, reads of what the transaction wrote go to the database, and
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
    """The invalidations of one transaction on one connection; Django calls it at commit."""

    __slots__ = ("alias", "atomic", "batch", "done")

    def __init__(self, alias: str, atomic: bool) -> None:
        self.alias = alias
        # Made inside atomic(); otherwise under set_autocommit(False).
        self.atomic = atomic
        self.batch = Batch()
        self.done = False

    def __call__(self) -> None:
        self.finish(apply=True)

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


def _registered(conn: Any, pending: Pending) -> bool:
    return any(entry[1] is pending for entry in conn.run_on_commit)


def _driver_in_transaction(conn: Any) -> bool | None:
    """Whether the DB-API connection is inside a transaction; None when it cannot tell."""
    raw = conn.connection
    if raw is None:
        return False
    info = getattr(raw, "info", None)  # psycopg 3: TransactionStatus.IDLE is 0
    status = getattr(info, "transaction_status", None)
    if status is not None:
        return int(status) != 0
    get_status = getattr(raw, "get_transaction_status", None)  # psycopg 2
    if get_status is not None:
        return int(get_status()) != 0
    flag = getattr(raw, "in_transaction", None)  # sqlite3, mysqlclient has none
    return flag if isinstance(flag, bool) else None


def current(conn: Any) -> Pending | None:
    """The connection's pending invalidations while its transaction is open. One whose
    transaction ended is settled here: applied if it may have committed, dropped if it was
    rolled back."""
    pending: Pending | None = conn.__dict__.get(_ATTR)
    if pending is None or pending.done:
        return None
    if _registered(conn, pending):
        if conn.in_atomic_block:
            return pending
        if conn.connection is not None and not conn.autocommit:
            # set_autocommit(False) then commit(): Django runs commit hooks only when
            # autocommit is turned back on, so ask the driver whether the transaction is
            # over (a rollback() would have unregistered us).
            if _driver_in_transaction(conn) is not False:
                return pending
        conn.run_on_commit[:] = [e for e in conn.run_on_commit if e[1] is not pending]
        pending.finish(apply=True)
        return None
    # Unregistered: Django cleared the hooks on rollback, or on close(). An atomic block's
    # close means its transaction died uncommitted; under autocommit off a commit() may
    # have come first, and an extra invalidation is harmless.
    pending.finish(apply=not pending.atomic)
    return None


def record(conn: Any, batch: Batch) -> None:
    """Apply now in autocommit; otherwise at the commit, before every on_commit callback."""
    if not batch:
        return
    if not in_transaction(conn):
        batch.apply()
        return
    pending = current(conn)
    if pending is None:
        pending = Pending(conn.alias, atomic=bool(conn.in_atomic_block))
        conn.__dict__[_ATTR] = pending
        # First in the list and in no savepoint (so a savepoint rollback keeps it: the
        # extra drops are harmless); robust, so it never stops the callbacks after it.
        conn.run_on_commit.insert(0, (set(), pending, True))
        dirty = _local.__dict__.setdefault("dirty", {})
        dirty[conn.alias] = pending
    pending.batch.merge(batch)


def queue(batch: Batch, using: str) -> None:
    """An invalidation asked for by our API (invalidate, flush_cache, fn.invalidate)."""
    record(connections[using], batch)


def watch(execute: Any, sql: str, params: Any, many: bool, context: dict[str, Any]) -> Any:
    """The execute wrapper installed on every connection."""
    conn = context["connection"]
    if _ATTR in conn.__dict__ and not conn.in_atomic_block:
        current(conn)  # a transaction under autocommit off may have committed meanwhile
    effects = classify(sql, params, many)
    result = execute(sql, params, many, context)
    if effects:
        record(conn, batch_of(conn.alias, effects))
    return result


def install(connection: Any, **kwargs: Any) -> None:
    """connection_created receiver: watch this connection's statements."""
    if watch not in connection.execute_wrappers:
        connection.execute_wrappers.append(watch)


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
