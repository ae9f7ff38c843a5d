"""CachedManager and CachedManagerMixin: the public read API, and a queryset whose bulk
writes invalidate like save() and delete() do."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import Any

from asgiref.sync import sync_to_async
from django.db import DEFAULT_DB_ALIAS, connections, models, router, transaction
from django.db.models.query import QuerySet

from . import reads
from .conf import conf
from .invalidation import flush_batch, queue, rows_batch
from .registry import LookupSpec, model_cache

_thread = threading.local()


class CachedQuerySetMixin:
    """update() and bulk_create()/bulk_update() send no signals; these invalidate anyway."""

    model: type[models.Model]
    db: str

    def update(self, **kwargs: Any) -> int:
        if getattr(_thread, "inside_bulk_update", False) or self.query.is_sliced:  # type: ignore[attr-defined]
            # bulk_update() invalidates its own rows; Django refuses sliced updates itself.
            return super().update(**kwargs)  # type: ignore[misc]
        limit = conf.BULK_INVALIDATION_LIMIT
        with transaction.atomic(using=self.db, savepoint=False):
            qs: Any = self
            q = qs.query
            if (
                connections[self.db].features.has_select_for_update
                and not q.distinct
                and not q.group_by
                and not q.annotations
            ):
                # Lock the rows, so the ones we name are the ones we change.
                qs = qs.select_for_update()
            pks = list(qs.values_list("pk", flat=True).order_by()[: limit + 1])
            if len(pks) > limit:
                n = super().update(**kwargs)  # type: ignore[misc]
                batch = flush_batch(self.model)
            else:
                n = QuerySet.update(
                    QuerySet(self.model, using=self.db).filter(pk__in=pks), **kwargs
                )
                batch = rows_batch(self.model, pks)
            queue(batch, self.db)
        return n

    update.alters_data = True  # type: ignore[attr-defined]

    def bulk_create(self, objs: Iterable[models.Model], *args: Any, **kwargs: Any) -> Any:
        created = super().bulk_create(objs, *args, **kwargs)  # type: ignore[misc]
        if kwargs.get("update_conflicts"):
            # Existing rows changed and we cannot name them all: drop the model.
            batch = flush_batch(self.model)
        else:
            # Rows with no pk back from the database can only be behind negatives,
            # which any write of the model drops.
            batch = rows_batch(self.model, [o.pk for o in created])
        queue(batch, self.db)
        return created

    bulk_create.alters_data = True  # type: ignore[attr-defined]

    def bulk_update(self, objs: Iterable[models.Model], fields: Sequence[str], *args: Any,
                    **kwargs: Any) -> int:
        objs = list(objs)
        _thread.inside_bulk_update = True
        try:
            with transaction.atomic(using=self.db, savepoint=False):
                n = super().bulk_update(objs, fields, *args, **kwargs)  # type: ignore[misc]
                queue(rows_batch(self.model, [o.pk for o in objs]), self.db)
        finally:
            _thread.inside_bulk_update = False
        return n

    bulk_update.alters_data = True  # type: ignore[attr-defined]


class CachedQuerySet(CachedQuerySetMixin, QuerySet):
    pass


_queryset_classes: dict[type, type] = {QuerySet: CachedQuerySet}


def _cached_queryset_class(base: type) -> type:
    """A subclass of the manager's own queryset class with the invalidating writes mixed in.
    Registered in this module so querysets of it still pickle."""
    if issubclass(base, CachedQuerySetMixin):
        return base
    cls = _queryset_classes.get(base)
    if cls is None:
        name = f"Cached_{base.__module__.replace('.', '_')}_{base.__qualname__}"
        cls = type(name, (CachedQuerySetMixin, base), {"__module__": __name__})
        globals()[name] = cls
        _queryset_classes[base] = cls
    return cls


class CachedManagerMixin:
    """Mix into any manager: ``class UserManager(CachedManagerMixin, BaseUserManager)``.
    Declare lookups in ``cache_lookups``; pk is always declared."""

    cache_lookups: Sequence[LookupSpec] = ()
    cache_timeout: float | None = None
    cache_l1_timeout: float | None = None
    cache_negative_timeout: float | None = None

    model: type[models.Model]
    name: str
    _db: str | None
    _hints: dict[str, Any]

    def get_cache_lookups(self) -> list[LookupSpec]:
        return list(self.cache_lookups)

    def get_queryset(self) -> QuerySet:
        qs = super().get_queryset()  # type: ignore[misc]
        cls = _cached_queryset_class(type(qs))
        if cls is not type(qs):
            qs.__class__ = cls
        return qs

    # -- reads -------------------------------------------------------------------
    def get_cached(self, **lookup: Any) -> Any:
        """The row for one declared lookup; raises DoesNotExist (and remembers it)."""
        mc = model_cache(self)
        lk, values = mc.resolve(lookup)
        return reads.get(self, mc, lk, values)

    @property
    def db(self) -> str:
        # Manager.db asks the router; with no routers that is always the default alias
        # (or the hinted instance's), and this runs on every cached read.
        if self._db:
            return self._db
        if not router.routers:
            instance = self._hints.get("instance")
            if instance is not None and instance._state.db:
                return instance._state.db
            return DEFAULT_DB_ALIAS
        return router.db_for_read(self.model, **self._hints)

    def get_many_cached(self, pks: Iterable[Any]) -> dict[Any, Any]:
        """{pk: instance} for the rows that exist: one L2 round trip, one query for misses."""
        return reads.get_many(self, model_cache(self), list(pks))

    async def aget_cached(self, **lookup: Any) -> Any:
        mc = model_cache(self)
        lk, values = mc.resolve(lookup)
        # An L1 hit stays on the event loop: no I/O, no thread hop.
        found = reads.peek_local(mc, (lk.key_prefix, *values), self.db)
        if found is not None:
            return found
        return await sync_to_async(reads.get)(self, mc, lk, values)

    async def aget_many_cached(self, pks: Iterable[Any]) -> dict[Any, Any]:
        return await sync_to_async(self.get_many_cached)(list(pks))

    # -- invalidation ------------------------------------------------------------
    def invalidate(self, obj_or_pk: Any) -> None:
        """Drop every cached key of one row in every process (at commit inside atomic())."""
        pk = obj_or_pk.pk if isinstance(obj_or_pk, models.Model) else obj_or_pk
        queue(rows_batch(self.model, [pk]), self._write_db())

    async def ainvalidate(self, obj_or_pk: Any) -> None:
        await sync_to_async(self.invalidate)(obj_or_pk)

    def flush_cache(self) -> None:
        """Drop every entry of the model in every process: O(1), a new generation."""
        queue(flush_batch(self.model), self._write_db())

    def _write_db(self) -> str:
        return self._db or router.db_for_write(self.model, **self._hints)


class CachedManager(CachedManagerMixin, models.Manager):
    """``objects = CachedManager(lookups=["email", ("tenant_id", "session_id")])``"""

    def __init__(
        self,
        lookups: Sequence[LookupSpec] = (),
        timeout: float | None = None,
        l1_timeout: float | None = None,
        negative_timeout: float | None = None,
    ):
        super().__init__()
        self.cache_lookups = list(lookups)
        self.cache_timeout = timeout
        self.cache_l1_timeout = l1_timeout
        self.cache_negative_timeout = negative_timeout
