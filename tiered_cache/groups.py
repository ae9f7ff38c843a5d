"""Invalidation groups: which models and which database aliases share cached rows.

A group is one database alias and one table hierarchy: a concrete model, its proxies and its
multi-table descendants along the primary parent link all share row ids (the child's pk is
the parent's pk), so they share one generation, one write counter and one row version per
row. A write to any table of the hierarchy drops the row under every model and manager.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from django.apps import apps
from django.db import DatabaseError, connections, models, router, transaction
from django.db.transaction import TransactionManagementError
from django.utils.connection import ConnectionDoesNotExist

from .keys import Group, group

__all__ = [
    "concrete_of",
    "database_of",
    "forget",
    "group_of",
    "primary_parent",
    "read_group",
    "replica_of",
    "root_label",
    "root_of",
    "write_groups",
]

logger = logging.getLogger("tiered_cache")


def concrete_of(model: type[models.Model]) -> type[models.Model]:
    """The model whose table holds a model's own fields: itself, or a proxy's concrete model.
    Django sets it on every model class; django-stubs types it Optional."""
    concrete = model._meta.concrete_model
    assert concrete is not None
    return concrete


def primary_parent(model: type[models.Model]) -> type[models.Model] | None:
    """The parent whose pk is this model's pk (the parent link that is the primary key)."""
    pk = model._meta.pk
    # remote_field is set exactly on relations (Field.is_relation says the same).
    if pk is not None and pk.remote_field is not None and pk.remote_field.parent_link:
        # django-stubs: related_model may be "self" or None; a parent link's is a model.
        return pk.related_model._meta.concrete_model  # type: ignore[union-attr]
    return None


def root_of(model: type[models.Model]) -> type[models.Model]:
    m = concrete_of(model)
    while True:
        parent = primary_parent(m)
        if parent is None:
            return m
        m = parent


def root_label(model: type[models.Model]) -> str:
    return root_of(model)._meta.label_lower


def group_of(model: type[models.Model], alias: str) -> Group:
    """The group of a model's rows in the database `alias` names."""
    return group(database_of(alias), root_label(model))


# -- databases ---------------------------------------------------------------------------

_canonical: dict[str, tuple[tuple[Any, ...], str]] = {}


def _ident(settings_dict: dict[str, Any]) -> tuple[Any, ...]:
    return (settings_dict.get("ENGINE"), settings_dict.get("NAME"))


def database_of(alias: str) -> str:
    """The first alias naming a database of the same engine and name as `alias`. Several
    aliases of one database (another isolation level, a test mirror, a read replica
    without a router, "localhost" against "127.0.0.1") share one invalidation group, so a
    write through any of them drops what reads through the others cached. Host and port
    are left out on purpose: merging two databases that only share a name costs extra
    drops of equal pks (keys still carry the alias read), never a missed one."""
    settings_dicts = connections.settings
    try:
        ident = _ident(settings_dicts[alias])
    except KeyError:  # db_manager("typo"): the ORM's own error, not a bare KeyError
        raise ConnectionDoesNotExist(f"The connection '{alias}' doesn't exist.") from None
    hit = _canonical.get(alias)
    if hit is not None and hit[0] == ident:
        return hit[1]
    canon = alias
    for other in settings_dicts:
        if _ident(settings_dicts[other]) == ident:
            canon = other
            break
    _canonical[alias] = (ident, canon)
    return canon


_read_groups: dict[tuple[str, str], Group] = {}


def read_group(alias: str, label: str) -> Group:
    """group_of() by root label, remembered: every cached read asks, and database_of()
    compares the alias's settings each time (forget() runs when DATABASES changes)."""
    g = _read_groups.get((alias, label))
    if g is None:
        g = _read_groups[(alias, label)] = group(database_of(alias), label)
    return g


def write_groups(label: str, alias: str) -> list[Group]:
    """The groups whose cached rows a write through `alias` to the table hierarchy of root
    model `label` changes: the group of the alias's database, and, with routers, the group
    of each database a router writes a model of the hierarchy to. A read that no
    db_manager()/using() pins is grouped by its model's write database (the manager's
    cache_group_alias()), wherever the router read it from: a router that reads from one
    database and writes to another puts the rows it read in the write database's group,
    which a write made directly to the read database must drop too. A write database
    that reads nothing from `alias` costs an extra drop, never a missed one. Routers are
    asked without hints (a write has none to give), on every write: they may answer by
    thread or request."""
    own = group(database_of(alias), label)
    if not router.routers:
        return [own]
    found = {own.alias: own}
    for model in _family(label):
        db = database_of(router.db_for_write(model))
        if db not in found:
            found[db] = group(db, label)
    return list(found.values())


def _family(label: str) -> tuple[type[models.Model], ...]:
    """The installed models whose rows live in the table hierarchy of root model `label`
    (the root, its proxies, its multi-table descendants and theirs)."""
    if not _families:
        families: dict[str, list[type[models.Model]]] = {}
        for model in apps.get_models():
            families.setdefault(root_label(model), []).append(model)
        _families.update({k: tuple(v) for k, v in families.items()})
    return _families.get(label, ())


_families: dict[str, tuple[type[models.Model], ...]] = {}


def replica_of(alias: str) -> str | None:
    """The alias to read misses from instead of `alias`, or None. A streaming replica may
    lag: a row it returns may be older than a write whose invalidation already ran (the
    fill guard cannot see it, the write came first), and would be served until TIMEOUT.
    Misses through it read its primary instead.

    On PostgreSQL the servers say which alias is a replica of which: `alias` is one of P
    when its server is in recovery (pg_is_in_recovery()) and has P's system_identifier (one
    cluster, streamed), P being an alias of the same database (database_of) whose server is
    not in recovery. An alias of the same NAME on another server that is no standby (a
    shard, or the same server by another host name) reads itself, and so does a standby
    whose primary is no alias. Each server is asked once per process, through the first
    alias that needs it (one query), and only when the database has an alias on another
    server. When a server that decides it could not be asked (down, an aborted
    transaction), the answer is `alias` itself: the miss reads it and stores nothing (it
    may be a lagging replica), and it is decided again at the next miss. A replica promoted
    later is seen as a primary by processes started after that (or after forget())."""
    hit = _replicas.get(alias)
    if hit is None:
        source = _source_of(alias)
        if source is None:  # not remembered
            return alias
        hit = _replicas[alias] = (source,)
    return hit[0] or None


def _source_of(alias: str) -> str | None:
    """replica_of()'s answer: the primary's alias, "" for `alias` itself, None when a
    server that decides it could not be asked."""
    canon = database_of(alias)
    settings_dicts = connections.settings
    mine = settings_dicts[alias]
    if connections[alias].vendor != "postgresql":
        # No server to ask on other engines: an alias of the same database (ENGINE, NAME)
        # on another host or port is taken for a streaming replica of the first one, so
        # shards that share a NAME on several servers must be given other NAMEs there.
        lags = canon != alias and _host_port(mine) != _host_port(settings_dicts[canon])
        return canon if lags else ""
    ident, here = _ident(mine), _pg_server(mine)
    others = [
        a
        for a in settings_dicts
        if a != alias
        and _ident(settings_dicts[a]) == ident
        and _pg_server(settings_dicts[a]) != here
    ]
    if not others:  # no alias of this database on another server: none to read instead
        return ""
    facts = _server_facts(alias)
    if facts is None:
        return None
    in_recovery, system = facts
    if not in_recovery:
        return ""
    others.sort(key=lambda a: a != canon)  # the canonical alias first, then in order
    unasked = False
    for other in others:
        theirs = _server_facts(other)
        if theirs is None:
            unasked = True
        elif not theirs[0] and theirs[1] == system:
            return other
    return None if unasked else ""


def _server_facts(alias: str) -> tuple[bool, int] | None:
    """(in recovery, system identifier) of the PostgreSQL server of `alias`, asked through
    its connection once per server address, None if it could not be asked. Inside the
    caller's transaction the query runs in a savepoint: a failure must not abort it."""
    key = _pg_server(connections.settings[alias])
    facts = _servers.get(key)
    if facts is None:
        conn = connections[alias]
        try:
            block: AbstractContextManager[object] = (
                transaction.atomic(using=alias) if conn.in_atomic_block else nullcontext()
            )
            with block, conn.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_is_in_recovery(), system_identifier FROM pg_control_system()"
                )
                row = cursor.fetchone()
        except (DatabaseError, TransactionManagementError) as exc:
            # Down, or an aborted transaction: the read that follows raises its own error.
            # Said once per server (a role refused pg_control_system() would be asked at
            # every miss).
            if key not in _unasked:
                _unasked.add(key)
                logger.warning(
                    "tiered_cache: could not ask the server of database alias %r whether it "
                    "is a replica (%s); asked again at the next miss",
                    alias,
                    exc,
                )
            return None
        facts = _servers[key] = (bool(row[0]), int(row[1]))
    return facts


def _host_port(settings_dict: dict[str, Any]) -> tuple[str, str]:
    return (str(settings_dict.get("HOST") or ""), str(settings_dict.get("PORT") or ""))


def _pg_server(settings_dict: dict[str, Any]) -> tuple[str, ...]:
    """Where a PostgreSQL alias connects: HOST and PORT, and the libpq parameters in OPTIONS
    that name a server (aliases that differ only in isolation level or role share it)."""
    options = settings_dict.get("OPTIONS") or {}
    named = (options.get(k) for k in ("service", "host", "hostaddr", "port"))
    return (*_host_port(settings_dict), *(str(v or "") for v in named))


_replicas: dict[str, tuple[str]] = {}
# _pg_server() -> (in recovery, system identifier), asked once per process.
_servers: dict[tuple[str, ...], tuple[bool, int]] = {}
_unasked: set[tuple[str, ...]] = set()  # servers whose failure was logged


def forget(**kwargs: Any) -> None:
    """Settings changed (tests): look the databases up again."""
    _canonical.clear()
    _replicas.clear()
    _servers.clear()
    _unasked.clear()
    _read_groups.clear()
    _families.clear()
