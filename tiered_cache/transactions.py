"""When a write's invalidation runs, and which reads must skip the tiers.

In autocommit a statement's invalidation runs as soon as it returns. Inside a transaction
(atomic(), autocommit turned off, or a BEGIN statement) it runs right after the COMMIT,
before every on_commit callback (a callback that reads must see the new row; one that
raises must not cancel the invalidation). Django's rollback() drops it. A transaction that
ends another way (psycopg's own commit(), rollback() or transaction() block on Django's
connection, a COMMIT the driver sent unseen, a connection closed or lost) may have
committed: its invalidation runs as soon as the end is noticed (right after the driver's
call, before the connection's next statement, at close(), or at the next read that looks
at it). Until then, reads of what the transaction wrote go to the database, and so do all
reads inside a transaction whose snapshot may predate other commits (REPEATABLE READ,
SERIALIZABLE, SQLite; set in the alias's OPTIONS or by a statement): the cache holds the
latest committed rows, which such a transaction must not see.
"""

from __future__ import annotations

import os
import re
import threading
import weakref
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import DatabaseError, connections

from .capture import FLUSH, Effect, classify
from .groups import write_groups
from .invalidation import Batch

__all__ = [
    "bypass",
    "bypass_any",
    "forget_databases",
    "install",
    "open_writes",
    "queue",
    "snapshot_aliases",
    "snapshot_statements",
    "sql_text",
]


class _Connection:
    """What we track of one DatabaseWrapper: its open transaction's pending
    invalidations, the batches whose signals wait for autocommit, and whether its
    commit(), rollback() and close() are wrapped."""

    __slots__ = ("ending", "hooked", "level", "owed", "pending", "raw", "touched")

    def __init__(self) -> None:
        self.pending: Pending | None = None
        self.owed: list[Batch] = []
        self.hooked = False
        # Django's commit() or rollback() is running: the driver's, which it calls, is
        # left to it (its rollback drops what is held, its commit keeps its order).
        self.ending = False
        # A transaction the server holds open in autocommit (a BEGIN run as SQL), which
        # Django does not know of.
        self.raw = False
        # A statement of this session named an isolation level: its transactions' level
        # is asked of the server (SHOW), once per transaction (`level`, None until asked).
        # Held as the finalizer that uncounts it if the connection goes with its thread.
        self.touched: weakref.finalize[Any, Any] | None = None
        self.level: bool | None = None


# Kept beside the connection, not on it: Django's object carries no attribute of ours.
_connections: weakref.WeakKeyDictionary[Any, _Connection] = weakref.WeakKeyDictionary()


def _state(conn: Any) -> _Connection:
    state = _connections.get(conn)
    if state is None:
        state = _connections[conn] = _Connection()
    return state


class _ThreadState(threading.local):
    """This thread's connections with pending writes (a thread may hold several per
    alias), by id of the connection."""

    # A class attribute: a thread that never wrote reads None here, where a bare
    # threading.local raises AttributeError (caught by getattr(), about 0.3 µs, on every
    # read of such a thread).
    dirty: dict[int, Pending] | None = None
    # Ids of this thread's connections whose isolation a statement may have changed.
    snapshots: set[int] | None = None
    # This thread's connections with a transaction open (Django's autocommit off, or a
    # BEGIN run as SQL), by alias: one that an error or set_rollback() broke must be read
    # through the database, which refuses the read as the ORM's own. Held here, not looked
    # up (connections[alias] costs an L1 hit half as much again).
    opened: dict[str, Any] | None = None


_local = _ThreadState()


class _OpenCount:
    """Transactions with pending writes in the whole process: async fast paths, which run
    on another thread than the transaction, may skip the per-thread checks only at 0."""

    def __init__(self) -> None:
        self.n = 0
        self.lock = threading.Lock()
        os.register_at_fork(after_in_child=self.after_fork)

    def add(self, delta: int) -> None:
        with self.lock:
            self.n += delta

    def after_fork(self) -> None:
        self.lock = threading.Lock()
        self.n = 0  # the parent's transactions are not the child's


_open = _OpenCount()
# Connections of the whole process whose isolation a statement may have changed: the async
# fast path, on another thread than theirs, serves L1 only at 0.
_snapshotting = _OpenCount()


class Pending:
    """The invalidations of one transaction on one connection, applied right after its
    COMMIT and dropped by its ROLLBACK."""

    __slots__ = ("batch", "conn_ref", "done", "key", "ran", "state")

    def __init__(self, conn: Any, state: _Connection) -> None:
        # Weak: the connection's entry in _connections must not keep it alive.
        self.conn_ref = weakref.ref(conn)
        self.key = id(conn)
        self.state = state
        self.batch = Batch()
        self.done = False
        # A statement of the transaction ran (not only an invalidate() queued before its
        # first one): the server has held it open since, so a server that reports no
        # transaction before the next statement means that it ended.
        self.ran = False
        _open.add(1)
        _local.__dict__.setdefault("dirty", {})[self.key] = self

    def finish(self, apply: bool) -> None:
        if self.done:
            return
        self.done = True
        _open.add(-1)
        if self.state.pending is self:
            self.state.pending = None
        dirty = _local.dirty
        if dirty and dirty.get(self.key) is self:
            del dirty[self.key]
        if apply:
            # Signals wait until Django has turned autocommit back on: a receiver that
            # queries would otherwise open a transaction inside atomic()'s exit.
            self.batch.apply(notify=False)
            owed = self.state.owed
            owed.append(self.batch)
            if len(owed) > 100:  # autocommit kept off for long: do not hold them forever
                owed.pop(0).send_signals()


def open_writes() -> int:
    """How many transactions of this process hold writes not yet committed."""
    return _open.n


def in_transaction(conn: Any) -> bool:
    if conn.in_atomic_block:
        return True
    if conn.connection is None:
        return False
    if not conn.autocommit:
        return True
    state = _connections.get(conn)
    return state is not None and state.raw


def current(conn: Any) -> Pending | None:
    """The connection's pending invalidations while its transaction is open. One left over
    from a transaction that ended without a commit() or rollback() we saw (the connection
    was closed or lost mid-transaction, or the driver ended it) is applied now: that
    transaction may have committed, and an extra invalidation only drops right entries."""
    state = _connections.get(conn)
    if state is None or state.pending is None or state.pending.done:
        return None
    if in_transaction(conn):
        return state.pending
    _ended(conn, state)
    return None


def record(conn: Any, batch: Batch, statement: bool = False) -> None:
    """Apply now in autocommit; otherwise right after the transaction's COMMIT.
    `statement`: the batch is a statement's, which ran in the transaction."""
    if not batch:
        return
    if not in_transaction(conn):
        batch.apply()
        return
    pending = current(conn)
    if pending is None:
        state = _state(conn)
        pending = state.pending = Pending(conn, state)
    pending.batch.merge(batch)
    if statement:
        pending.ran = True


def queue(batch: Batch, using: str) -> None:
    """An invalidation asked for by our API (invalidate, flush_cache, fn.invalidate)."""
    record(connections[using], batch)


def watch(execute: Any, sql: Any, params: Any, many: bool, context: dict[str, Any]) -> Any:
    """The execute wrapper installed on every connection. The effects are recorded even
    when the statement raises: the server may have applied it (a lost reply), and an
    extra invalidation is harmless where a missing one is not.

    Transaction control written as SQL (BEGIN, COMMIT, SET TRANSACTION ISOLATION LEVEL,
    in any form or company) never reaches Django's commit() and rollback(): whether a
    transaction is open is asked of the driver after each statement in autocommit (the
    server reports it with every reply), and a statement that names an isolation level
    makes the level of this session's transactions one to ask the server.

    A transaction Django holds open that the driver ended unseen (a COMMIT sent by psycopg
    itself) is noticed before the next statement: with writes held, the server's
    transaction status (no round trip) is read first."""
    conn = context["connection"]
    state = _connections.get(conn)
    if state is not None and state.pending is not None:
        pending = state.pending
        if pending.ran and not pending.done and _server_in_transaction(conn) is False:
            _ended(conn, state)
    text = sql_text(sql, conn)
    effects = classify(text, params, many)
    # Read once, lowered: a statement's head says what it does; a long one (a bulk
    # INSERT's values) is not searched whole.
    head = text[:_HEAD_CHARS].lower()
    touches = "isolation" in head or (
        ("reset" in head or "discard" in head) and _RESETS.search(head) is not None
    )
    try:
        return execute(sql, params, many, context)
    finally:
        if state is None and (touches or effects):
            state = _state(conn)
        was_raw = state is not None and state.raw
        if conn.autocommit and not conn.in_atomic_block:
            open_now = _server_in_transaction(conn)
            if open_now and state is None:
                state = _state(conn)
            if state is not None and open_now is not None:
                state.raw = open_now
                _opened(conn, open_now)
        if effects:
            record(conn, batch_of(conn.alias, effects), statement=True)
        if state is not None:
            if was_raw and not state.raw:
                _raw_ended(conn, state)
            elif _ENDS.search(head) is not None:
                # It may have ended a transaction and begun another ("COMMIT; BEGIN"), or
                # committed inside one Django still holds open: what is held so far is
                # dropped now too (again when it ends: twice costs nothing), and the
                # next transaction's level is asked again.
                state.level = None
                if state.pending is not None:
                    early = Batch()
                    early.merge(state.pending.batch)
                    early.apply(notify=False)  # the signals are sent once, at its end
            if touches:
                _touch(conn, state)


_HEAD_CHARS = 4096
# RESET ALL and DISCARD ALL put the session's level back to its default.
_RESETS = re.compile(r"\b(?:reset|discard)\s+all\b")
# A statement that may end a transaction, alone or among others (in a lowered head): its
# first word, after comments, is one that ends one (not ROLLBACK TO a savepoint).
_ENDS = re.compile(
    r"(?:^|;)(?:\s|--[^\n]*(?:\n|$)|/\*.*?\*/)*"
    r"(?:commit|end|abort|prepare\s+transaction|rollback(?!\s+(?:work\s+|transaction\s+)?to\b))\b",
    re.DOTALL,
)


# psycopg.pq.TransactionStatus: IDLE 0, ACTIVE 1 (a command or pipeline under way: not
# known), INTRANS 2, INERROR 3, UNKNOWN 4 (the connection is lost).
_ACTIVE, _INERROR = 1, 3


def _server_status(conn: Any) -> int | None:
    """psycopg's transaction status of the connection (no round trip), None when the
    driver does not say."""
    try:
        return int(conn.connection.pgconn.transaction_status)
    except AttributeError:
        return None


def _server_in_transaction(conn: Any) -> bool | None:
    """Whether the server holds a transaction open on this connection, None when the
    driver does not say."""
    status = _server_status(conn)
    return None if status is None or status == _ACTIVE else status in (2, _INERROR)


def _opened(conn: Any, is_open: bool) -> None:
    """Note whether this thread's connection has a transaction open (see _local.opened)."""
    if is_open:
        _local.__dict__.setdefault("opened", {})[conn.alias] = conn
    elif _local.opened and _local.opened.get(conn.alias) is conn:
        del _local.opened[conn.alias]


def _raw_ended(conn: Any, state: _Connection) -> None:
    """A transaction begun as SQL ended: its invalidations run now (after a ROLLBACK too,
    where they only drop entries that were right), then the signals they owe."""
    if state.pending is not None:
        state.pending.finish(apply=True)
    owed, state.owed = state.owed, []
    for batch in owed:
        batch.send_signals()
    state.level = None


def _ended(conn: Any, state: _Connection) -> None:
    """The transaction holding the pending invalidations ended without a commit() or
    rollback() of Django's (the driver ended it, or the connection was closed or lost):
    they run now, since it may have committed. Their signals wait while Django holds a
    transaction open (autocommit off, or an atomic block), and are sent now otherwise."""
    if conn.in_atomic_block or (not conn.autocommit and conn.connection is not None):
        if state.pending is not None:
            state.pending.finish(apply=True)
        state.level = None
    else:
        state.raw = False
        _raw_ended(conn, state)


def _driver_ended(raw: Any) -> None:
    """After the driver's own commit(), rollback() or transaction() block on a connection
    of Django's: if the server holds no transaction open any more, what was held for the
    one that ended runs now (the driver's rollback too: an extra invalidation is
    harmless). Left to Django's commit() and rollback() when they are the caller."""
    owner = _drivers.get(raw)
    conn = owner() if owner is not None else None
    if conn is None or conn.connection is not raw:
        return
    if getattr(conn, "_thread_ident", threading.get_ident()) != threading.get_ident():
        return  # not its thread's call (a pool resetting it): left to its next statement
    state = _connections.get(conn)
    if state is None or state.ending or (state.pending is None and not state.raw):
        return
    if _server_in_transaction(conn) is False:
        _ended(conn, state)


class _DriverTransaction:
    """psycopg's transaction() context manager, checked at its exit."""

    __slots__ = ("_cm", "_raw")

    def __init__(self, cm: Any, raw: Any) -> None:
        self._cm = cm
        self._raw = raw

    def __enter__(self) -> Any:
        return self._cm.__enter__()

    def __exit__(self, *exc: Any) -> Any:
        try:
            return self._cm.__exit__(*exc)
        finally:
            _driver_ended(self._raw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cm, name)


# The driver's connections whose commit(), rollback() and transaction() are wrapped, each
# to the DatabaseWrapper that holds it now (a pooled one passes from one to another).
_drivers: weakref.WeakKeyDictionary[Any, weakref.ref[Any]] = weakref.WeakKeyDictionary()


def _wrap_driver(connection: Any) -> None:
    """Wrap the commit(), rollback() and transaction() of psycopg's connection under
    Django's: called on it directly (connection.connection.commit(), or a
    `with connection.connection.transaction():` block), they end a transaction that no
    statement through Django's cursor ends."""
    raw = connection.connection
    if raw is None or getattr(raw, "pgconn", None) is None:
        return  # only psycopg 3 tells whether a transaction is open
    try:
        known = raw in _drivers
        _drivers[raw] = weakref.ref(connection)
    except TypeError:
        return
    if known:
        return
    # The class's functions, called on a weak reference: bound methods kept on the
    # connection would keep it alive in a cycle past its last use.
    cls, ref = type(raw), weakref.ref(raw)
    driver_commit, driver_rollback, driver_transaction = (
        cls.commit,
        cls.rollback,
        cls.transaction,
    )

    def commit() -> None:
        r = ref()
        try:
            driver_commit(r)
        finally:
            _driver_ended(r)

    def rollback() -> None:
        r = ref()
        try:
            driver_rollback(r)
        finally:
            _driver_ended(r)

    def transaction(*args: Any, **kwargs: Any) -> _DriverTransaction:
        r = ref()
        return _DriverTransaction(driver_transaction(r, *args, **kwargs), r)

    try:
        raw.commit, raw.rollback, raw.transaction = commit, rollback, transaction
    except (AttributeError, TypeError):  # a driver class that takes no attribute
        _drivers.pop(raw, None)


def _touch(conn: Any, state: _Connection) -> None:
    state.level = None
    if state.touched is None:
        # Counted until a new session, or until the connection goes with its thread.
        state.touched = weakref.finalize(conn, _snapshotting.add, -1)
        _snapshotting.add(1)
        _local.__dict__.setdefault("snapshots", set()).add(id(conn))


def _untouch(conn: Any, state: _Connection) -> None:
    """A new session: nothing a statement set on the last one holds."""
    state.level = None
    if state.touched is not None:
        state.touched.detach()
        state.touched = None
        _snapshotting.add(-1)
        flagged = _local.snapshots
        if flagged:
            flagged.discard(id(conn))


def snapshot_statements() -> int:
    """Connections of the process whose isolation a statement may have changed."""
    return _snapshotting.n


def batch_of(alias: str, effects: Iterable[Effect]) -> Batch:
    """The batch for a statement's effects on the connection `alias`, in every group that
    may cache the rows (groups.write_groups)."""
    batch = Batch()
    for e in effects:
        for g in write_groups(e.label, alias):
            if e.kind == FLUSH:
                batch.add_flush(g)
            else:
                batch.add_rows(g, e.rids)
    return batch


def sql_text(sql: Any, conn: Any) -> str:
    """The statement as text; psycopg's sql.Composed objects are rendered for reading, and
    bytes decoded (their str() is "b'UPDATE ...'", which reads as no statement at all)."""
    if isinstance(sql, str):
        return sql
    if isinstance(sql, (bytes, bytearray, memoryview)):
        return bytes(sql).decode("utf-8", "replace")
    try:
        return str(sql.as_string(conn.connection))
    except Exception:
        return str(sql)


def _refused(conn: Any) -> bool:
    """Whether Django refused a commit() or rollback() before it reached the database:
    inside atomic() (TransactionManagementError), or from a thread that does not own the
    connection. The transaction goes on, and so does what it holds."""
    if conn.in_atomic_block:
        return True
    try:
        conn.validate_thread_sharing()
    except DatabaseError:
        return True
    return False


def install(connection: Any, **kwargs: Any) -> None:
    """connection_created receiver: watch this connection's statements and transactions.

    Statements go through Django's documented execute_wrapper(); ours goes first in the
    list (the outermost), because the context manager execute_wrapper() pops the last
    one: a connection first opened inside a user's block must not lose ours at its exit.
    For the end of a transaction Django offers only on_commit(), whose callbacks run in
    registration order (one registered before our first write would run before the
    invalidation and read the old row; one that raises would cancel it), and an entry of
    ours in run_on_commit would show up in every captureOnCommitCallbacks() of the
    project's tests. So this connection's own commit() and rollback() are wrapped: the
    invalidation runs right after COMMIT, before Django runs any callback, and also under
    set_autocommit(False), where Django runs no hook at commit() at all. A commit() that
    raises may still have committed (a lost reply): its invalidation runs anyway.

    So are the driver's commit(), rollback() and transaction() (a transaction they end
    has its invalidations run, rollback or not; left alone while Django's own commit() or
    rollback() calls them), and Django's close() (request_finished calls it): what a
    transaction that close() ended held runs then, rather than wait for a read of this
    connection that may never come (the thread may be gone, and open_writes() with it)."""
    if watch not in connection.execute_wrappers:
        connection.execute_wrappers.insert(0, watch)
    state = _state(connection)
    state.raw = False
    _untouch(connection, state)
    _opened(connection, not connection.autocommit)  # AUTOCOMMIT: False in the settings
    _wrap_driver(connection)
    if state.hooked:
        return
    state.hooked = True
    commit, rollback, close = connection.commit, connection.rollback, connection.close
    run_hooks = connection.run_and_clear_commit_hooks
    set_autocommit = connection.set_autocommit

    def set_autocommit_noted(autocommit: bool, *args: Any, **kwargs: Any) -> None:
        # atomic() turns autocommit off and on again: while it is off, reads of this
        # thread check whether the transaction is broken (bypass()).
        try:
            set_autocommit(autocommit, *args, **kwargs)
        finally:
            _opened(connection, not connection.autocommit)

    def ending(end: Any, apply: bool) -> Any:
        """Django's commit() (apply) or rollback() (drop), then what the transaction held."""

        def wrapped() -> None:
            state.ending = True
            try:
                end()
            finally:
                state.ending = False
                if not _refused(connection):
                    if state.pending is not None:
                        state.pending.finish(apply=apply)
                    state.raw, state.level = False, None

        return wrapped

    commit_then_invalidate, rollback_and_forget = ending(commit, True), ending(rollback, False)

    def close_then_invalidate() -> None:
        try:
            close()
        finally:
            # Closed (outside an atomic block, which keeps the connection and what it
            # holds until it exits): the transaction is over, however it ended.
            if connection.connection is None and (state.pending is not None or state.raw):
                state.raw = False
                _raw_ended(connection, state)

    def signals_then_hooks() -> None:
        owed, state.owed = state.owed, []
        for batch in owed:
            batch.send_signals()
        run_hooks()

    connection.commit = commit_then_invalidate
    connection.rollback = rollback_and_forget
    connection.close = close_then_invalidate
    connection.set_autocommit = set_autocommit_noted
    connection.run_and_clear_commit_hooks = signals_then_hooks


# -- reads ------------------------------------------------------------------------------

_snapshot: list[frozenset[str]] = []


# libpq's options (or PGOPTIONS) setting the session's default level, in either spelling:
# "-c default_transaction_isolation=repeatable\ read", "--default-transaction-isolation=...".
_SNAPSHOT_DEFAULT = re.compile(
    r"default[_-]transaction[_-]isolation\s*=\s*'?(?:repeatable(?:\\?\s+|[_-])read|serializable)",
    re.IGNORECASE,
)


def _is_snapshot_level(level: Any, engine: str) -> bool:
    if isinstance(level, str):
        return level.strip().lower().replace("_", " ") in ("repeatable read", "serializable")
    name = getattr(level, "name", None)
    if name is not None:
        return str(name).upper() in ("REPEATABLE_READ", "SERIALIZABLE")
    if "postgresql" in engine:
        # django-stubs ships no stub for psycopg_any.
        from django.db.backends.postgresql.psycopg_any import (  # type: ignore[import-untyped]
            is_psycopg3,
        )

        return int(level) in ((3, 4) if is_psycopg3 else (2, 3))
    return False


def snapshot_aliases() -> frozenset[str]:
    """Aliases whose transactions read from a snapshot older than their first statement."""
    if not _snapshot:
        out = set()
        for alias, db in settings.DATABASES.items():
            engine = str(db.get("ENGINE", ""))
            options = db.get("OPTIONS") or {}
            level = options.get("isolation_level")
            # libpq's options may set the session's default ("-c default_transaction_
            # isolation=repeatable\\ read"), which is every transaction's level.
            default = _SNAPSHOT_DEFAULT.search(
                str(options.get("options", "")) + " " + os.environ.get("PGOPTIONS", "")
            )
            if (
                "sqlite" in engine
                or (level is not None and _is_snapshot_level(level, engine))
                or default is not None
            ):
                out.add(alias)
        _snapshot.append(frozenset(out))
    return _snapshot[0]


def forget_databases(setting: str = "DATABASES", **kwargs: Any) -> None:
    if setting == "DATABASES":
        _snapshot.clear()


def _written(dirty: dict[int, Pending], gids: list[str]) -> bool:
    """Whether an open transaction of this thread (on any connection) wrote these groups."""
    for pending in list(dirty.values()):
        conn = pending.conn_ref()
        if conn is None:  # gone mid-transaction, unseen: it may have committed
            pending.finish(apply=True)
            _raw_ended(None, pending.state)  # its signals
            continue
        live = current(conn)
        if live is not None and any(gid in live.batch.rows for gid in gids):
            return True
    return False


def nothing_to_bypass(read_alias: str) -> bool:
    """Whether bypass() is None for every read from read_alias now, known without looking
    at any group: this thread has no transaction open, and the alias does not read from
    snapshots (reads.hit())."""
    snapshot = _snapshot[0] if _snapshot else snapshot_aliases()  # no call once known
    local = _local
    if local.dirty or local.snapshots or read_alias in snapshot:
        return False
    opened = local.opened
    return not opened or (conn := opened.get(read_alias)) is None or not _broken(conn)


def bypass(read_alias: str, group_alias: str, gid: str) -> str | None:
    """Why a read must skip both tiers now, or None."""
    dirty = _local.dirty
    if dirty and _written(dirty, [gid]):
        return "written in this transaction"
    opened = _local.opened
    if opened and (conn := opened.get(read_alias)) is not None and _broken(conn):
        return "its transaction is broken (an error, or set_rollback()): the database refuses"
    if _local.snapshots or read_alias in snapshot_aliases():
        conn = connections[read_alias]
        if in_transaction(conn) and _reads_snapshots(conn, read_alias):
            return "snapshot isolation"
    return None


def _broken(conn: Any) -> bool:
    """Whether the ORM's read on conn raises now: Django refuses queries in an atomic block
    marked for rollback (validate_no_broken_transaction), PostgreSQL in an aborted
    transaction (a statement failed and no savepoint was rolled back to)."""
    if conn.in_atomic_block and conn.needs_rollback:
        return True
    return conn.connection is not None and _server_status(conn) == _INERROR


def _reads_snapshots(conn: Any, alias: str) -> bool:
    """Whether the open transaction on conn reads from a snapshot: the alias's settings
    say so, or, after a statement named a level, the server does (asked once per
    transaction, and only once it ran a statement: until then no snapshot is taken)."""
    if alias in snapshot_aliases():
        return True
    state = _connections.get(conn)
    if state is None or state.touched is None:
        return False
    if state.level is None:
        if conn.connection is None or conn.connection.pgconn.transaction_status != 2:
            # Not begun (no snapshot taken yet), or aborted: a read of the database then
            # raises as the ORM's does, which a SHOW here would only raise differently.
            return conn.connection is not None and conn.connection.pgconn.transaction_status == 3
        try:
            # On the driver's connection: through Django's, our own wrapper would see it.
            row = conn.connection.execute("SHOW transaction_isolation").fetchone()
        except Exception:  # the database's answer: not ours to raise from a read
            return True
        state.level = _is_snapshot_level(str(row[0]), "")
    return state.level


def bypass_any(gids: list[tuple[str, str]]) -> str | None:
    """For derived functions: any dependency written here, or any snapshot transaction."""
    dirty = _local.dirty
    if dirty and _written(dirty, [gid for _, gid in gids]):
        return "written in this transaction"
    aliases = list(snapshot_aliases())
    if _local.snapshots:
        aliases += [c.alias for c in connections.all(initialized_only=True)]
    for alias in aliases:
        conn = connections[alias]
        if in_transaction(conn) and _reads_snapshots(conn, alias):
            return "snapshot isolation"
    return None
