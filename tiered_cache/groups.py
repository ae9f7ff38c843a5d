"""Invalidation groups: which models and which database aliases share cached rows.

A group is one database alias and one table hierarchy: a concrete model, its proxies and its
multi-table descendants along the primary parent link all share row ids (the child's pk is
the parent's pk), so they share one generation, one write counter and one row version per
row. A write to any table of the hierarchy drops the row under every model and manager.
"""

from __future__ import annotations

from typing import Any

from django.db import connections, models
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
]


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


def replica_of(alias: str) -> str | None:
    """The alias to read misses from instead of `alias`, or None. An alias of the same
    database (database_of) on another host or port is taken for a streaming replica, which
    may lag: a row it returns may be older than a write whose invalidation already ran
    (the fill guard cannot see it, the write came first), and would be served until
    TIMEOUT. Misses through it read the alias of its group, the primary, instead."""
    hit = _replicas.get(alias)
    if hit is None:
        canon = database_of(alias)
        settings_dicts = connections.settings
        mine, theirs = settings_dicts[alias], settings_dicts[canon]
        lags = canon != alias and _server(mine) != _server(theirs)
        hit = _replicas[alias] = (canon if lags else "",)
    return hit[0] or None


def _server(settings_dict: dict[str, Any]) -> tuple[str, str]:
    return (str(settings_dict.get("HOST") or ""), str(settings_dict.get("PORT") or ""))


_replicas: dict[str, tuple[str]] = {}


def forget(**kwargs: Any) -> None:
    """Settings changed (tests): look the databases up again."""
    _canonical.clear()
    _replicas.clear()
    _read_groups.clear()
