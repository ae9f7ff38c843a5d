"""Cached functions: results derived from several models, dropped in every process when
any row of a dependency is written (per-model write counters, never a scan)."""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import json
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from asgiref.sync import sync_to_async
from django.apps import apps
from django.db import DEFAULT_DB_ALIAS, models

from .bus import bus
from .conf import conf
from .exceptions import UncacheableArguments
from .invalidation import channel, in_dirty_transaction, local_hooks, origin
from .keys import encode_value, encode_values, schema_fingerprint
from .serialization import CorruptPayload, dumps, loads_verified, sign, verify
from .tiers.local import local_tier
from .tiers.remote import Unavailable, fresh_token, redis_tier

# model label -> labels of the cached functions that depend on it
_dependents: dict[str, set[str]] = {}
_functions: dict[str, CachedFunction] = {}

_PLAIN = (type(None), bool, int, float, str, bytes, decimal.Decimal, uuid.UUID,
          datetime.datetime, datetime.date, datetime.time, datetime.timedelta)


def _tag() -> str:
    # All derived entries share one hash slot with the write counters they are checked
    # against, so a read or a fill is one atomic script even on Redis Cluster.
    return "{" + conf.KEY_PREFIX + ":fn}"


def dependency_counters(label: str) -> list[str]:
    if label not in _dependents:
        return []
    return [f"{_tag()}:w:{label}"]


def _on_models_written(labels: set[str]) -> None:
    for label in labels:
        for fn_label in _dependents.get(label, ()):
            local_tier.drop_model(fn_label)


local_hooks.append(_on_models_written)


def _stable(value: Any, where: str) -> str:
    """A text form that is equal exactly when the arguments are equal, or TypeError."""
    if isinstance(value, enum.Enum):
        return "E" + type(value).__qualname__ + ":" + _stable(value.value, where)
    if type(value) in _PLAIN:
        if type(value) in (datetime.time, datetime.timedelta):
            return "r" + type(value).__qualname__ + ":" + repr(value)
        return encode_value(value)
    if isinstance(value, models.Model):
        if value.pk is None:
            raise UncacheableArguments(f"{where}: an unsaved {type(value).__name__} has no key")
        return "M" + value._meta.label_lower + ":" + encode_value(value.pk)
    if isinstance(value, (tuple, list)):
        tag = "T" if isinstance(value, tuple) else "L"
        return tag + encode_values([_stable(v, where) for v in value])
    if isinstance(value, (set, frozenset)):
        return "S" + encode_values(sorted(_stable(v, where) for v in value))
    if isinstance(value, dict):
        items = sorted((_stable(k, where), _stable(v, where)) for k, v in value.items())
        return "D" + encode_values([p for kv in items for p in kv])
    raise UncacheableArguments(
        f"{where} is a {type(value).__qualname__}, which has no stable cache key; pass plain "
        "values (str, int, Decimal, UUID, dates, model instances, and tuples, lists, sets "
        "or dicts of them)."
    )


class CachedFunction:
    """The wrapper @cached returns. Call it like the function; `.invalidate(*args)` drops
    one result everywhere; `.acall(*args)` awaits a sync function's result."""

    def __init__(
        self,
        fn: Callable[..., Any],
        depends_on: Iterable[type[models.Model] | str],
        timeout: float | None,
        negative_timeout: float | None,
        l1_timeout: float | None,
    ):
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.qualname = f"{fn.__module__}.{fn.__qualname__}"
        self.label = "fn:" + self.qualname
        self.is_async = inspect.iscoroutinefunction(fn)
        self.signature = inspect.signature(fn)
        self._deps = list(depends_on)
        if not self._deps:
            raise TypeError(f"@cached on {self.qualname} needs depends_on=[Model, ...]")
        self.dep_labels = sorted(
            d._meta.label_lower if isinstance(d, type) else str(d).lower() for d in self._deps
        )
        for label in self.dep_labels:
            _dependents.setdefault(label, set()).add(self.label)
        self._timeout = timeout
        self._negative_timeout = negative_timeout
        self._l1_timeout = l1_timeout
        self._prefix: str | None = None
        _functions[self.label] = self

    # -- keys ----------------------------------------------------------------------
    def _key_prefix(self) -> str:
        if self._prefix is None:
            # The dependencies' schemas are part of the key: results may hold their rows.
            schemas = ",".join(schema_fingerprint(apps.get_model(lbl)) for lbl in self.dep_labels)
            digest = hashlib.sha256(schemas.encode()).hexdigest()[:10]
            self._prefix = f"{_tag()}:{self.qualname}:{digest}:"
        return self._prefix

    def key(self, *args: Any, **kwargs: Any) -> str:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{self.qualname}(): {exc}") from None
        bound.apply_defaults()
        parts = [
            name + "=" + _stable(value, f"{self.qualname}() argument {name!r}")
            for name, value in bound.arguments.items()
        ]
        return self._key_prefix() + encode_values(parts)

    def _keys(self, key: str) -> list[str]:
        return [_tag() + ":g", key, *(f"{_tag()}:w:{lbl}" for lbl in self.dep_labels)]

    @property
    def timeout(self) -> float:
        return self._timeout if self._timeout is not None else conf.TIMEOUT

    @property
    def negative_timeout(self) -> float:
        if self._negative_timeout is not None:
            return self._negative_timeout
        return conf.NEGATIVE_TIMEOUT

    def _ttl(self, result: Any) -> float:
        return self.negative_timeout if result is None else self.timeout

    def _l1_ttl(self, result: Any) -> float:
        l1 = self._l1_timeout if self._l1_timeout is not None else conf.L1_TIMEOUT
        return min(l1, self._ttl(result))

    # -- calls ----------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.is_async:
            return self._acall(args, kwargs)
        return self._call(args, kwargs)

    def _dirty(self) -> bool:
        return any(in_dirty_transaction(lbl, DEFAULT_DB_ALIAS) for lbl in self.dep_labels)

    def _peek(self, key: str) -> tuple[bool, Any]:
        if bus.trusted():
            body = local_tier.get(key)
            if body is not None:
                return True, loads_verified(body)
        return False, None

    def _lookup(self, key: str) -> tuple[Any, Any, Any]:
        """(found, result, fill state): from L1, then L2; state is what a fill must match."""
        found, result = self._peek(key)
        if found:
            return True, result, None
        if not bus.trusted():
            bus.ensure_started()
        if not bus.trusted():
            return False, None, None
        token = local_tier.token(self.label)
        try:
            res = redis_tier.run_many([("dread", self._keys(key), [fresh_token()])])[0]
        except Unavailable:
            return False, None, ("local", token)
        if res[0] == 1:
            try:
                body = verify(key, res[1].split(b"|", 3)[3])
                result = loads_verified(body)
            except (CorruptPayload, IndexError):
                return False, None, ("local", token)
            local_tier.set(key, self.label, "", body, self._l1_ttl(result), token)
            return True, result, None
        g, wstr, tomb = (x.decode() if isinstance(x, bytes) else x for x in res[1:4])
        return False, None, ("l2", token, g, wstr, tomb)

    def _store(self, key: str, result: Any, state: Any) -> None:
        if state is None:
            return
        body = dumps(result)
        if state[0] == "l2":
            _, token, g, wstr, tomb = state
            signed = sign(key, body)
            try:
                ok = redis_tier.run_many([(
                    "dfill", self._keys(key),
                    [g, wstr, tomb, signed, int(self._ttl(result) * 1000)],
                )])[0]
            except Unavailable:
                ok = 1
            if not ok:
                return  # a dependency was written meanwhile: the result may be stale
        else:
            token = state[1]
        if bus.trusted():
            local_tier.set(key, self.label, "", body, self._l1_ttl(result), token)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.key(*args, **kwargs)
        if self._dirty():
            return self.fn(*args, **kwargs)
        found, result, state = self._lookup(key)
        if found:
            return result
        result = self.fn(*args, **kwargs)
        self._store(key, result, state)
        return result

    async def _acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.key(*args, **kwargs)
        found, result = self._peek(key)
        if found:
            return result
        found, result, state = await sync_to_async(self._lookup)(key)
        if found:
            return result
        result = await self.fn(*args, **kwargs)
        if state is not None:
            await sync_to_async(self._store)(key, result, state)
        return result

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """Await a sync cached function: L1 hits stay on the loop, the rest is one hop."""
        if self.is_async:
            return await self._acall(args, kwargs)
        found, result = self._peek(self.key(*args, **kwargs))
        if found:
            return result
        return await sync_to_async(self._call)(args, kwargs)

    # -- invalidation ------------------------------------------------------------------
    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the result for these arguments in both tiers of every process."""
        key = self.key(*args, **kwargs)
        local_tier.drop_key(key, self.label)
        try:
            redis_tier.run_many([self.drop_key_args(key)], force=True)
        except Unavailable:
            # No process trusts its tiers while Redis is away; the drop is applied from
            # the outbox before any of them trusts L2 again.
            from .models import PendingInvalidation

            PendingInvalidation.objects.create(model_label=self.label, rows=[key])
            bus.undelivered()

    def drop_key_args(self, key: str) -> tuple[str, list[str], list[Any]]:
        msg = json.dumps({"o": origin["id"], "k": key, "m": self.label})
        return ("ddrop", [key], ["T|" + fresh_token(), int(self.timeout * 1000), channel(), msg])


def cached(
    depends_on: Iterable[type[models.Model] | str],
    timeout: float | None = None,
    negative_timeout: float | None = None,
    l1_timeout: float | None = None,
) -> Callable[[Callable[..., Any]], CachedFunction]:
    """Cache a function of several models' rows:

        @cached(depends_on=[Provider, Model, GlobalModel], timeout=600)
        def resolve_global_model(name): ...

    None results are kept for negative_timeout."""

    def wrap(fn: Callable[..., Any]) -> CachedFunction:
        return CachedFunction(fn, depends_on, timeout, negative_timeout, l1_timeout)

    return wrap
