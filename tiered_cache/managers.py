"""CachedManager and CachedManagerMixin: the public read and invalidation API."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar

from asgiref.sync import sync_to_async
from django.core.exceptions import ValidationError
from django.db import DEFAULT_DB_ALIAS, connections, models, router
from django.db.models.query import QuerySet

from . import reads, recording
from .exceptions import UndeclaredLookup
from .groups import database_of, read_group
from .invalidation import flush_batch, rows_batch
from .keys import (
    Group,
    adapted_otherwise,
    equal_as_in_python,
    keyable,
    keyable_values,
    pk_row_id,
)
from .registry import CachedManagerBase, LookupSpec, checked_lookups, instance_value, model_cache
from .transactions import open_writes, queue, snapshot_aliases, snapshot_statements

_M = TypeVar("_M", bound=models.Model)


class CachedQuerySet(QuerySet[_M]):
    """The queryset of a CachedManager. Its writes are Django's own, unchanged: every write
    statement is seen on the connection (see capture.py), whichever manager runs it."""


class CachedManagerMixin(CachedManagerBase, Generic[_M]):
    """Mix into any manager: ``class UserManager(CachedManagerMixin, BaseUserManager)``
    (typed: ``CachedManagerMixin["User"], BaseUserManager["User"]``).
    Declare lookups in ``cache_lookups`` (and timeouts in ``cache_timeout``,
    ``cache_l1_timeout``, ``cache_negative_timeout``); pk is always declared."""

    # What the manager it is mixed into provides.
    model: type[_M]
    name: str
    _db: str | None
    _hints: dict[str, Any]

    if TYPE_CHECKING:

        def db_manager(
            self, using: str | None = None, hints: dict[str, Any] | None = None
        ) -> Self: ...

    # -- reads -------------------------------------------------------------------
    def get_cached(self, **lookup: Any) -> _M:
        """The row for one declared lookup; raises DoesNotExist (and remembers it)."""
        obj: _M
        if not recording.active:
            obj = reads.hit(self, lookup)
            if obj is not None:
                return obj
        if getattr(self, "core_filters", None) is not None:
            obj = _related_get(self, lookup)
            return obj
        mc = model_cache(self)
        lk, values = mc.resolve(lookup)
        if recording.active:  # a debug-toolbar panel records (tiered_cache.panels)
            obj = recording.read("get_cached", mc.label, lookup, reads.get, self, mc, lk, values)
            return obj
        obj = reads.get(self, mc, lk, values)
        return obj

    def cache_group(self, mc: Any, read_alias: str) -> Group:
        """The invalidation group of a read through this manager from read_alias (see
        cache_group_alias()); remembered per alias when no router takes part."""
        if self._db or not router.routers:
            return read_group(read_alias, mc.root)
        return mc.group(self.cache_group_alias(read_alias))  # type: ignore[no-any-return]

    def cache_group_alias(self, read_alias: str) -> str:
        """The database whose writes invalidate what this manager reads from read_alias:
        an alias given with db_manager()/using() is its own; with routers, a read replica
        shares the alias its model is written to."""
        if self._db or not router.routers:
            return database_of(read_alias)
        return database_of(router.db_for_write(self.model, **self._hints))

    @property
    def db(self) -> str:
        # Manager.db asks the router; with no routers that is always the default alias
        # (or the hinted instance's), and this runs on every cached read.
        if self._db:
            return self._db
        if not router.routers:
            instance: models.Model | None = self._hints.get("instance")
            if instance is not None and instance._state.db:
                return instance._state.db
            return DEFAULT_DB_ALIAS
        return router.db_for_read(self.model, **self._hints)

    def get_many_cached(self, pks: Iterable[Any]) -> dict[Any, _M]:
        """{pk: instance} for the rows that exist: one L2 round trip, one query for misses."""
        if pks is None:  # in_bulk(None) reads every row, which no cache should
            raise _no_pks(self, "get_many_cached")
        if getattr(self, "core_filters", None) is not None:
            return _related_get_many(self, list(pks))
        if recording.active:
            wanted, mc = list(pks), model_cache(self)
            rows: dict[Any, _M] = recording.read(
                "get_many_cached", mc.label, wanted, reads.get_many, self, mc, wanted
            )
            return rows
        return reads.get_many(self, model_cache(self), list(pks))

    async def aget_cached(self, **lookup: Any) -> _M:
        if getattr(self, "core_filters", None) is not None:
            return await sync_to_async(self.get_cached)(**lookup)
        if recording.active and recording.wanted():
            # Recorded whole, this method called again: what the thread sync_to_async hops
            # to serves goes to this call (the recorder's context variables follow it).
            label = self.model._meta.label_lower
            recorded: _M = await recording.aread(
                "aget_cached", label, lookup, self.aget_cached, kwargs=lookup, again=True
            )
            return recorded
        mc = model_cache(self)
        lk, values = mc.resolve(lookup)
        # An L1 hit stays on the event loop (no I/O, no thread hop) only while no
        # transaction of this process holds writes: the caller's transaction lives on the
        # thread sync_to_async hops to, where reads.get() checks it.
        if (
            open_writes() == 0
            and snapshot_statements() == 0
            and lk.unique
            and lk.keyed
            and keyable_values(values)
        ):
            scope, mode, picked = mc.read_scope(self)
            db = picked or self.db
            if scope is not None and db not in snapshot_aliases():
                found: _M | None = reads.peek_local(mc, lk.l1_key(db, scope, values), db)
                if found is not None:
                    if mode is not None:
                        reads.fetch_as(mode, [found])
                    return found
        obj: _M = await sync_to_async(reads.get)(self, mc, lk, values)
        return obj

    async def aget_many_cached(self, pks: Iterable[Any]) -> dict[Any, _M]:
        if pks is None:
            raise _no_pks(self, "aget_many_cached")
        pks = list(pks)
        if recording.active and getattr(self, "core_filters", None) is None:
            mc = model_cache(self)
            rows: dict[Any, _M] = await recording.aread(
                "aget_many_cached", mc.label, pks, sync_to_async(reads.get_many), self, mc, pks
            )
            return rows
        return await sync_to_async(self.get_many_cached)(pks)

    # -- invalidation ------------------------------------------------------------
    def invalidate(self, obj_or_pk: Any) -> None:
        """Drop every cached key of one row in every process (at commit inside atomic())."""
        pk = self._pk_of(obj_or_pk)
        if adapted_otherwise(pk):  # the row it names is not known here, as in capture._rid
            self.flush_cache()
            return
        queue(rows_batch(self.model, [pk], self._write_db()), self._write_db())

    def _pk_of(self, obj_or_pk: Any) -> Any:
        """The pk invalidate() was given, checked: dropping nothing, or another row, for
        another model's instance, an unsaved one or a malformed pk would hide the caller's
        mistake."""
        label = self.model._meta.label
        pk_field = self.model._meta.pk
        assert pk_field is not None  # every concrete model has one
        if isinstance(obj_or_pk, models.Model):
            ours = self.model._meta.concrete_model
            assert ours is not None  # set on every non-abstract model
            if isinstance(obj_or_pk, ours):
                # Ours, a proxy's or a descendant's: its value of our pk (a child with a pk
                # of its own still holds its parent's row under the parent's).
                value = getattr(obj_or_pk, pk_field.attname)
            else:
                # A pk that is a relation (a parent link, a OneToOne to another model) takes
                # what filter(pk=instance) would, with the ORM's check of the instance's model.
                try:
                    if not pk_field.is_relation:
                        raise ValueError
                    value = instance_value(pk_field, obj_or_pk)
                except ValueError:
                    raise TypeError(
                        f"{label}: invalidate() takes a {label} or its pk, not a "
                        f"{obj_or_pk._meta.label} instance."
                    ) from None
            if value is None:
                raise ValueError(f"{label}: invalidate() was given an unsaved instance (no pk).")
            return value
        if obj_or_pk is None:
            raise TypeError(f"{label}: invalidate() takes a {label} or its pk, not None.")
        try:
            pk_row_id(pk_field, obj_or_pk)
        except ValidationError as exc:
            raise ValueError(
                f"{label}: invalidate({obj_or_pk!r}): not a pk: {' '.join(exc.messages)}"
            ) from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{label}: invalidate({obj_or_pk!r}): not a pk: {exc}") from None
        return obj_or_pk

    async def ainvalidate(self, obj_or_pk: Any) -> None:
        await sync_to_async(self.invalidate)(obj_or_pk)

    def flush_cache(self) -> None:
        """Drop every entry of the model in every process: O(1), a new generation."""
        queue(flush_batch(self.model, self._write_db()), self._write_db())

    def _write_db(self) -> str:
        return self._db or router.db_for_write(self.model, **self._hints)


class CachedManager(CachedManagerMixin[_M], models.Manager[_M]):
    """``objects = CachedManager(lookups=["email", ("tenant_id", "session_id")])``"""

    _queryset_class = CachedQuerySet

    def __init__(
        self,
        lookups: Sequence[LookupSpec] = (),
        timeout: float | None = None,
        l1_timeout: float | None = None,
        negative_timeout: float | None = None,
    ) -> None:
        super().__init__()
        self.cache_lookups = checked_lookups(lookups, "lookups")
        self.cache_timeout = timeout
        self.cache_l1_timeout = l1_timeout
        self.cache_negative_timeout = negative_timeout


# -- related managers ------------------------------------------------------------------
# Django builds a related manager class on the default manager's class, so it inherits
# get_cached; its queryset adds the relation's filter. A reverse foreign key is checked
# on the cached row itself; any other relation (many-to-many, generic) depends on rows
# of other tables, and is read from the database.


def _is_reverse_fk(manager: Any) -> bool:
    return (
        hasattr(manager, "field")
        and hasattr(manager, "instance")
        and not hasattr(manager, "through")
        and not hasattr(manager, "content_type")
    )


def _base_of(manager: Any, lookup: dict[str, Any] | None = None) -> Any:
    """The related manager seen as the model's manager it was built on: Django subclasses
    the class of the default manager, or of the one named in `tenant.accounts(manager=...)`,
    and builds it with no arguments. So its reads take that class's get_queryset() with the
    related manager's own state (not a model manager's: `objects = Ranked(minimum=100)` is
    `Ranked()` here), and their keys and lookups are those of the model's manager of that
    class that declares `lookup` (two managers of one class may declare different ones)."""
    built_on = type(manager).__mro__[1]
    if not issubclass(built_on, CachedManagerMixin):
        return None
    candidates = [
        m
        for m in [manager.model._default_manager, *manager.model._meta.managers]
        if type(m) is built_on
    ]
    if not candidates:
        return None
    named = candidates[0]
    if lookup is not None and len(candidates) > 1:  # one candidate: _related_get resolves
        for m in candidates:
            try:
                model_cache(m).resolve(lookup)
            except UndeclaredLookup:
                continue
            named = m
            break
    model_cache(named)  # built from the model's manager, which holds the declarations
    base = built_on.__new__(built_on)
    base.__dict__.update(
        (k, v) for k, v in vars(manager).items() if k not in ("instance", "field", "core_filters")
    )
    base.name = named.name
    # A related manager reads from its instance's database (Django's routing hint); it
    # keeps the instance as an attribute, not in _hints.
    base._hints = {**manager._hints, "instance": manager.instance}
    return base


def _checkable(manager: Any) -> bool:
    """Whether the relation can be checked on a cached row in Python: not when the database
    compares its key otherwise ("BOB" is "bob" under a collation that ignores case, and
    Django gives the foreign key the collation of the field it points at), nor when the
    instance holds the relation prefetched (the ORM's manager then reads through the
    Prefetch's own queryset, whose filter or only() the cached row knows nothing of)."""
    prefetched = getattr(manager.instance, "_prefetched_objects_cache", None)
    if prefetched and manager.field.remote_field.cache_name in prefetched:
        return False
    vendor = connections[manager.db].vendor
    if any(map(adapted_otherwise, manager.field.get_foreign_related_value(manager.instance))):
        return False  # the instance's key may reach the database as another value
    return all(equal_as_in_python(f, vendor) for f in manager.field.foreign_related_fields)


def _related_value(manager: Any) -> tuple[Any, ...] | None:
    """The value the manager's rows hold in their foreign key, as the ORM's filter
    prepares it from the instance (an instance built with pk="3" filters by 3); None
    when the instance holds no value there (the ORM's queryset is then empty)."""
    value = manager.field.get_foreign_related_value(manager.instance)
    if any(v is None for v in value):
        return None
    return _prepared(manager, value)


def _related_of(manager: Any, obj: Any) -> tuple[Any, ...]:
    """The value a row holds in the manager's foreign key, as _related_value() gives it."""
    return _prepared(manager, manager.field.get_local_related_value(obj))


def _prepared(manager: Any, value: tuple[Any, ...]) -> tuple[Any, ...]:
    """A value of the manager's foreign key as the ORM's filter prepares it."""
    return tuple(
        keyable(f.get_prep_value(v))
        for f, v in zip(manager.field.foreign_related_fields, value, strict=True)
    )


_UNCHECKED = "a relation the cached row cannot check (many-to-many, generic)"


def _unchecked(read: Any, arg: Any, why: str = _UNCHECKED) -> Any:
    """A related manager's read that goes to the database, as the panel records it."""
    recording.served(recording.BYPASSED, why)
    return read(**arg) if isinstance(arg, dict) else read(arg)


def _no_pks(manager: Any, api: str) -> TypeError:
    return TypeError(
        f"{manager.model._meta.label}: {api}() takes an iterable of pks, not None "
        "(in_bulk(None) would read every row; read them with the ORM)"
    )


def _related_get(manager: Any, lookup: dict[str, Any]) -> Any:
    base = _base_of(manager, lookup)
    if base is not None:
        mc = model_cache(base)
        lk, values = mc.resolve(lookup)  # an undeclared lookup is refused
    # The base manager's read answers for the relation only when it finds at most one row:
    # a lookup that is not unique, or unique but by NULL (which matches many), may find
    # another instance's rows, and only the relation's own filter finds this one's.
    reverse_fk = base is not None and _is_reverse_fk(manager) and _checkable(manager)
    if not reverse_fk or not lk.unique or None in values:
        why = _UNCHECKED
        if base is not None:
            mc.counters.bypassed += 1
            if reverse_fk:
                why = "a lookup that may match other instances' rows (not unique, or by NULL)"
        if recording.active:
            label = manager.model._meta.label_lower
            return recording.read("get_cached", label, lookup, _unchecked, manager.get, lookup, why)
        return manager.get(**lookup)
    want = _related_value(manager)
    # Resolved above: the base's read past its hit path (a db_manager() copy has none).
    obj = base.get_cached(**lookup) if recording.active else reads.get(base, mc, lk, values)
    if want is None or _related_of(manager, obj) != want:
        raise manager.model.DoesNotExist(
            f"{manager.model._meta.object_name} matching query does not exist."
        )
    _known_related(manager, [obj])
    return obj


def _known_related(manager: Any, objs: Iterable[Any]) -> None:
    """As the ORM's related manager does (its queryset's known related objects): the rows
    it returns hold the manager's own instance as their related object, that very instance
    and not a copy read again, which also saves a query. On Django 6.1 they also take the
    instance's fetch mode, which the related manager's queryset takes over its own.
    Only to a row whose foreign key holds what the instance holds, compared as they are
    (the ORM looks the row's value up in a dict keyed by the instance's): an instance
    built with pk="3" is not given to rows holding 3, which keep their own value."""
    objs = list(objs)
    name = manager.field.name
    held = manager.field.get_foreign_related_value(manager.instance)
    for obj in objs:
        if manager.field.get_local_related_value(obj) == held:
            setattr(obj, name, manager.instance)
    mode = getattr(manager.instance._state, "fetch_mode", None)
    if mode is not None:
        reads.fetch_as(mode, objs)


def _related_get_many(manager: Any, pks: list[Any]) -> dict[Any, Any]:
    base = _base_of(manager)
    if base is None or not _is_reverse_fk(manager) or not _checkable(manager):
        in_bulk = manager.get_queryset().in_bulk
        rows: dict[Any, Any]
        if recording.active:
            label = manager.model._meta.label_lower
            rows = recording.read("get_many_cached", label, pks, _unchecked, in_bulk, pks)
        else:
            rows = in_bulk(pks)
        return rows
    want = _related_value(manager)
    if want is None:
        return {}
    found = base.get_many_cached(pks)
    rows = {pk: obj for pk, obj in found.items() if _related_of(manager, obj) == want}
    _known_related(manager, rows.values())
    return rows
