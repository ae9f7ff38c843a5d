"""Invalidation groups: the models whose cached rows one write can change, and their keys.

A group is one database alias and one table hierarchy: a concrete model, its proxies and its
multi-table descendants along the primary parent link all share row ids (the child's pk is
the parent's pk), so they share one generation, one write counter and one row version per
row. A write to any table of the hierarchy drops the row under every model and manager.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from django.apps import apps
from django.core.cache import caches
from django.db import connections, models

from .conf import conf


def primary_parent(model: type[models.Model]) -> type[models.Model] | None:
    """The parent whose pk is this model's pk (the parent link that is the primary key)."""
    pk = model._meta.pk
    if pk is not None and pk.is_relation and pk.remote_field.parent_link:
        return pk.related_model._meta.concrete_model  # type: ignore[union-attr]
    return None


def root_of(model: type[models.Model]) -> type[models.Model]:
    m = model._meta.concrete_model
    while True:
        parent = primary_parent(m)
        if parent is None:
            return m
        m = parent


def root_label(model: type[models.Model]) -> str:
    return root_of(model)._meta.label_lower


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
    ident = _ident(settings_dicts[alias])
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


# -- key space -------------------------------------------------------------------------

_base: list[str] = []
_lock = threading.Lock()


def base_prefix() -> str:
    """Our KEY_PREFIX inside the cache alias's own KEY_PREFIX and VERSION (Django's
    make_key), so two projects sharing one Redis database never share an entry. Braces
    would break Redis Cluster hash tags: they are replaced."""
    if not _base:
        key = caches[conf.CACHE_ALIAS].make_key(conf.KEY_PREFIX)
        _base.append(key.replace("{", "(").replace("}", ")"))
    return _base[0]


@dataclass(frozen=True)
class Group:
    """The Redis keys of one invalidation group."""

    id: str  # "<alias>:<root model label>", as carried by bus messages and the outbox
    alias: str
    label: str  # the root model's label
    tag: str
    gen_key: str
    writes_key: str
    row_prefix: str
    # Mirror of the write counter in the derived functions' hash slot.
    fn_counter: str

    def row_key(self, rid: str) -> str:
        return self.row_prefix + rid


_groups: dict[tuple[str, str], Group] = {}


def group(alias: str, label: str) -> Group:
    g = _groups.get((alias, label))
    if g is None:
        base = base_prefix()
        gid = f"{alias}:{label}"
        tag = "{" + base + ":" + gid + "}"
        g = Group(
            id=gid,
            alias=alias,
            label=label,
            tag=tag,
            gen_key=tag + ":g",
            writes_key=tag + ":w",
            row_prefix=tag + ":r:",
            fn_counter=fn_tag() + ":w:" + gid,
        )
        _groups[(alias, label)] = g
    return g


def group_by_id(gid: str) -> Group | None:
    alias, _, label = gid.partition(":")
    if not label:
        return None
    return group(alias, label)


def fn_tag() -> str:
    """Every derived entry shares one hash slot with the counters it is checked against."""
    return "{" + base_prefix() + ":fn}"


def channel() -> str:
    return base_prefix() + ":bus"


# -- which tables belong to which groups ------------------------------------------------


@dataclass(frozen=True)
class TableRole:
    """What a write to one table does to one group: rows by pk (the table's pk column is
    the group's row id), or the whole group (a secondary parent of a multiple-inheritance
    child, whose pk is not the child's), or only the group's write counter (`touch`: an
    auto-created many-to-many table, whose rows no entry holds but whose changes the
    group's derived functions and "no such row" entries must see)."""

    label: str
    pk_column: str
    pk_field: Any
    by_row: bool
    touch: bool = False


_tables: dict[str, list[TableRole]] | None = None


def table_roles() -> dict[str, list[TableRole]]:
    """db_table -> roles, for every table a cached model's rows are stored in."""
    global _tables
    if _tables is not None:
        return _tables
    if not apps.ready:
        return {}
    from .registry import cached_models

    out: dict[str, dict[str, TableRole]] = {}
    for model in cached_models():
        label = root_label(model)
        primary = set()
        m: type[models.Model] | None = model._meta.concrete_model
        while m is not None:
            primary.add(m)
            m = primary_parent(m)
        concrete = model._meta.concrete_model
        for m in [concrete, *concrete._meta.get_parent_list()]:
            pk = m._meta.pk
            role = TableRole(label, pk.column, pk, by_row=m in primary)
            have = out.setdefault(m._meta.db_table, {}).get(label)
            if have is None or (have.by_row and not role.by_row):
                out[m._meta.db_table][label] = role
    cached_roots = {root_label(m) for m in cached_models()}
    for model in apps.get_models():
        for f in model._meta.local_many_to_many:
            through = f.remote_field.through
            if not through._meta.auto_created:
                continue  # an explicit through model is a model of its own
            for end in (model, f.related_model):
                label = root_label(end)
                if label in cached_roots:
                    pk = through._meta.pk
                    out.setdefault(through._meta.db_table, {}).setdefault(
                        label, TableRole(label, pk.column, pk, by_row=False, touch=True)
                    )
    with _lock:
        _tables = {t: list(roles.values()) for t, roles in out.items()}
    return _tables


def forget(**kwargs: Any) -> None:
    """Settings changed (tests): rebuild key names and the table map on next use."""
    global _tables
    _base.clear()
    _groups.clear()
    _canonical.clear()
    _tables = None
