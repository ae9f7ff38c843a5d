"""Cached functions: results derived from several models, dropped in every process when
any row of a dependency is written (per-model write counters, never a scan)."""

from __future__ import annotations

import datetime
import decimal
import enum
import functools
import hashlib
import inspect
import logging
import numbers
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import DEFAULT_DB_ALIAS, connections, models, router

from . import recording
from .bus import bus
from .conf import conf
from .exceptions import UncacheableArguments
from .groups import database_of, group_of
from .invalidation import Batch, local_hooks
from .keys import (
    KEY_TYPES,
    DerivedHeader,
    DerivedRead,
    Group,
    derived_fill_call,
    derived_header,
    derived_read_call,
    encode_value,
    encode_values,
    fn_key_prefix,
    schema_fingerprint,
)
from .registry import cached_managers
from .serialization import CorruptPayload, dumps, loads_verified, open_signed, sign
from .tiers.local import local_tier
from .tiers.remote import Unavailable, fresh_token, redis_tier
from .transactions import (
    bypass_any,
    open_writes,
    queue,
    snapshot_aliases,
    snapshot_statements,
)

# What the debug-toolbar panel calls a call of a cached function.
_API = "cached function"

# group id -> labels of the cached functions (known to this process) that depend on it
_dependents: dict[str, set[str]] = {}
logger = logging.getLogger("tiered_cache")

_functions: dict[str, CachedFunction] = {}


def cached_functions() -> list[CachedFunction]:
    """Every @cached function this process has defined."""
    return list(_functions.values())


class _FillState(NamedTuple):
    """What a fill of a derived result must match: this process's L1 token, and what L2
    answered (None: Redis was not asked, or its entry was unusable: L1 only)."""

    token: Any
    seen: DerivedRead | None


_PLAIN = KEY_TYPES


def _on_groups_written(gids: set[str]) -> None:
    for gid in gids:
        for fn_label in _dependents.get(gid, ()):
            local_tier.drop_model(fn_label)


local_hooks.append(_on_groups_written)


def _stable(value: Any, where: str) -> str:
    """A text form that is equal exactly when the arguments are equal, or TypeError."""
    if isinstance(value, enum.Enum):
        # The class's module too: two apps' `Status` share a qualname, not their members.
        cls = type(value)
        parts = [cls.__module__, cls.__qualname__, value.name, _stable(value.value, where)]
        return "E" + encode_values(parts)
    if type(value) in _PLAIN:
        if type(value) in (datetime.time, datetime.timedelta):
            return "r" + type(value).__qualname__ + ":" + repr(value)
        if type(value) is decimal.Decimal:
            # As written: the function sees Decimal("1.00") and Decimal("1") apart (a
            # lookup's decimals are keyed by value, as the database compares them).
            return "d=" + str(value)
        if type(value) is datetime.datetime and value.tzinfo is not None:
            # Its zone too: Europe/Paris and a fixed +01:00 print one isoformat() and
            # answer tzname(), DST and arithmetic apart.
            return "T" + encode_values([value.isoformat(), _zone(value)])
        return encode_value(value)
    if isinstance(value, models.Model):
        if value.pk is None:
            raise UncacheableArguments(f"{where}: an unsaved {type(value).__name__} has no key")
        # Its database too: the same pk is another row in another one. The database, not
        # the alias (a replica's alias reads the rows its primary's writes).
        db = database_of(value._state.db or DEFAULT_DB_ALIAS)
        return "M" + encode_values([value._meta.label_lower, db, encode_value(value.pk)])
    if isinstance(value, (tuple, list)):
        tag = "T" if isinstance(value, tuple) else "L"
        return tag + encode_values([_stable(v, where) for v in value])
    if isinstance(value, (set, frozenset)):
        # Apart, as lists and tuples are: the function may tell them apart.
        tag = "F" if isinstance(value, frozenset) else "S"
        return tag + encode_values(sorted(_stable(v, where) for v in value))
    if isinstance(value, dict):
        items = sorted((_stable(k, where), _stable(v, where)) for k, v in value.items())
        return "D" + encode_values([p for kv in items for p in kv])
    raise UncacheableArguments(
        f"{where} is a {type(value).__qualname__}, which has no stable cache key; pass plain "
        "values (str, int, Decimal, UUID, dates, model instances, and tuples, lists, sets "
        "or dicts of them)."
    )


def _zone(value: datetime.datetime) -> str:
    """A text that tells an aware datetime's zone apart from other zones: its repr, unless
    that is an object's address (a tzinfo class of its own without a repr)."""
    text = repr(value.tzinfo)
    if " at 0x" in text:
        tz = type(value.tzinfo)
        text = f"{tz.__module__}.{tz.__qualname__}:{value.tzname()}:{value.utcoffset()}"
    return text


def _checked_deps(depends_on: Any, where: str) -> list[type[models.Model] | str]:
    """depends_on as a list of concrete models and "app_label.ModelName" labels, or a
    TypeError naming what else it holds (labels are looked up by the checks, E009, once
    the apps are loaded)."""
    if isinstance(depends_on, str):
        raise TypeError(
            f"{where}: depends_on={depends_on!r} is a string; did you mean "
            f"depends_on=[{depends_on!r}]?"
        )
    try:
        deps = list(depends_on)
    except TypeError:
        raise TypeError(
            f"{where}: depends_on={depends_on!r}: give a list of models or "
            "'app_label.ModelName' labels"
        ) from None
    if not deps:
        raise TypeError(f"{where} needs depends_on=[Model, ...]")
    for dep in deps:
        if isinstance(dep, type) and issubclass(dep, models.Model):
            if dep._meta.abstract:
                raise TypeError(
                    f"{where}: depends_on holds {dep.__name__}, an abstract model, which "
                    "has no rows to write; name the models that inherit from it"
                )
        elif not (isinstance(dep, str) and dep.count(".") == 1 and all(dep.split("."))):
            raise TypeError(
                f"{where}: depends_on holds {dep!r}, which is not a model or an "
                "'app_label.ModelName' label"
            )
    return deps


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
        name: str | None = None,
    ):
        functools.update_wrapper(self, fn)
        self.fn = fn
        # Its name is its identity in every process (its key prefix, its L1 label).
        self.qualname = f"{fn.__module__}.{name or fn.__qualname__}"
        self.label = "fn:" + self.qualname
        self.is_async = inspect.iscoroutinefunction(fn)
        if self.is_async:  # so async_to_sync() and Django's view machinery see a coroutine
            markcoroutinefunction(self)
        self.signature = inspect.signature(fn)
        self._deps = _checked_deps(depends_on, f"@cached on {self.qualname}")
        self.dep_labels = sorted(
            d._meta.label_lower if isinstance(d, type) else str(d).lower() for d in self._deps
        )
        # (alias, group) of each dependency, resolved on first use (models load later).
        self._dep_groups: list[Group] | None = None
        for arg, value in (
            ("timeout", timeout),
            ("negative_timeout", negative_timeout),
            ("l1_timeout", l1_timeout),
        ):
            # Checked here, not after the function has run: a fill that fails to store
            # would lose its result, and Redis refuses an entry that never expires.
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, numbers.Real)
                or not 0 <= value < 10**9  # NaN fails this too
            ):
                raise TypeError(
                    f"@cached on {self.qualname}: {arg}={value!r} must be a number of seconds "
                    "from 0 (which keeps nothing) to under 10**9, or None for the setting's"
                )
        self._timeout = timeout
        self._negative_timeout = negative_timeout
        self._l1_timeout = l1_timeout
        self._prefix: str | None = None
        known = _functions.get(self.label)
        if known is not None and name is None and not _same_function(known.fn, fn):
            # Two closures of one factory, two lambdas of one scope: their results would
            # share entries, here and in every process.
            raise ImproperlyConfigured(
                f"@cached: {self.qualname} is defined twice (a closure or a lambda made "
                "again); its results would share one cache. Give each a name of its own "
                '(@cached(depends_on=[...], name="...")), or define it once.'
            )
        _functions[self.label] = self

    # -- keys ----------------------------------------------------------------------
    def dep_models(self) -> list[type[models.Model]]:
        return [apps.get_model(lbl) for lbl in self.dep_labels]

    def unwatched(self) -> list[str]:
        """Dependencies without a cached manager: their writes bump no counter that every
        process sees, so the function cannot depend on them."""
        return [m._meta.label for m in self.dep_models() if not cached_managers(m)]

    def dep_groups(self) -> list[Group]:
        groups = self._dep_groups
        if groups is None:
            missing = self.unwatched()
            if missing:
                raise ImproperlyConfigured(
                    f"@cached on {self.qualname}: depends_on model(s) {', '.join(missing)} "
                    "have no cached manager, so writes to them in other processes are not "
                    "seen. Give each one a CachedManager (a second manager is enough)."
                )
            groups = []
            for model in self.dep_models():
                # Every database's: a write on any of them changes what the function may
                # read there (`using()` inside it). The write alias's first (invalidate()).
                first = router.db_for_write(model) if router.routers else DEFAULT_DB_ALIAS
                aliases = dict.fromkeys(database_of(a) for a in [first, *connections])
                for alias in aliases:
                    g = group_of(model, alias)
                    _dependents.setdefault(g.id, set()).add(self.label)
                    if g not in groups:
                        groups.append(g)
            self._dep_groups = groups
        return groups

    def _key_prefix(self) -> str:
        if self._prefix is None:
            # The dependencies' schemas are part of the key: results may hold their rows.
            schemas = ",".join(schema_fingerprint(m) for m in self.dep_models())
            digest = hashlib.sha256(schemas.encode()).hexdigest()[:10]
            self._prefix = fn_key_prefix(self.qualname, digest)
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

    def _counters(self) -> list[str]:
        """The write counters of the dependencies, as the derived entries mirror them."""
        return [g.fn_counter for g in self.dep_groups()]

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
        if recording.active:  # a debug-toolbar panel records (tiered_cache.panels)
            if self.is_async:
                return recording.aread(_API, self.label, (args, kwargs), self._acall, args, kwargs)
            return recording.read(_API, self.label, (args, kwargs), self._call, args, kwargs)
        if self.is_async:
            return self._acall(args, kwargs)
        return self._call(args, kwargs)

    def _dirty(self) -> bool:
        why = bypass_any([(g.alias, g.id) for g in self.dep_groups()])
        if why is not None and recording.active:
            recording.served(recording.BYPASSED, why)
        return why is not None

    def _peek(self, key: str) -> tuple[bool, Any]:
        if bus.trusted():
            body = local_tier.get(key)
            if body is not None:
                return True, loads_verified(body)
        return False, None

    def _lookup(self, key: str) -> tuple[bool, Any, _FillState | None]:
        """(found, result, fill state): from L1, then L2; state is what a fill must match."""
        found, result = self._peek(key)
        if found:
            return True, result, None
        if not bus.trusted():
            bus.ensure_started()
            if not bus.trusted():
                if recording.active:
                    recording.why("bus not trusted")
                return False, None, None
            found, result = self._peek(key)  # trust came back: L1 is vouched for again
            if found:
                return True, result, None
        token = local_tier.token(self.label)
        try:
            res = DerivedRead.of(
                redis_tier.scripts(
                    [derived_read_call(key, self._counters(), fresh_token(), _marker_ms())]
                )[0]
            )
        except Unavailable as exc:
            if recording.active:
                recording.why(f"Redis unavailable ({exc})")
            return False, None, _FillState(token, None)
        if res.value is not None:
            try:
                header, body = open_signed(key, res.value, DerivedHeader)
                if int(header.expires) < time.time():
                    raise CorruptPayload("expired")
                result = loads_verified(body)
            except (CorruptPayload, ValueError):
                return False, None, _FillState(token, None)
            local_tier.set(key, self.label, "", body, self._l1_ttl(result), token)
            if recording.active:
                recording.served(recording.L2)
            return True, result, None
        return False, None, _FillState(token, res)

    def _store(self, key: str, result: Any, state: _FillState | None) -> None:
        if state is None or self._dirty():
            # Dirty now: the function wrote a dependency in the caller's transaction,
            # whose rows must not reach a tier (guarantee 3).
            return
        ttl = self._ttl(result)
        if ttl <= 0:  # 0 keeps nothing, as Django's cache timeouts
            return
        try:
            body = dumps(result)
        except Exception as exc:  # a generator, a lock: returned, not kept
            logger.warning("%s: its result %r cannot be stored: %s", self.qualname, result, exc)
            return
        seen = state.seen
        if seen is not None:
            header = derived_header(seen.gen, seen.counters, int(time.time() + ttl) + 1)
            call = derived_fill_call(
                key, self._counters(), seen, sign(key, header, body), max(1, int(ttl * 1000))
            )
            try:
                ok = redis_tier.scripts([call])[0]
            except Unavailable:
                ok = 1
            if not ok:
                return  # a dependency was written meanwhile: the result may be stale
        if bus.trusted():
            local_tier.set(key, self.label, "", body, self._l1_ttl(result), state.token)

    def _call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.key(*args, **kwargs)
        if self._dirty():
            return self.fn(*args, **kwargs)
        found, result, state = self._lookup(key)
        if found:
            return result
        if recording.active:
            recording.served(recording.DATABASE, "computed")
        result = self.fn(*args, **kwargs)
        self._store(key, result, state)
        return result

    def _loop_may_peek(self) -> bool:
        """Whether an async caller may use L1 on the event loop: only while no transaction
        of this process holds writes and no alias reads from a snapshot. The transaction an
        async caller runs in lives on the thread sync_to_async hops to, not on the loop."""
        return open_writes() == 0 and not snapshot_aliases() and snapshot_statements() == 0

    async def _acall(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        key = self.key(*args, **kwargs)
        if self._loop_may_peek():
            found, result = self._peek(key)
            if found:
                return result
        elif await sync_to_async(self._dirty)():
            return await self.fn(*args, **kwargs)
        found, result, state = await sync_to_async(self._lookup)(key)
        if found:
            return result
        if recording.active:
            recording.served(recording.DATABASE, "computed")
        result = await self.fn(*args, **kwargs)
        if state is not None:
            await sync_to_async(self._store)(key, result, state)
        return result

    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        """Await a sync cached function: L1 hits stay on the loop, the rest is one hop."""
        if recording.active and recording.wanted():
            return await recording.aread(
                _API, self.label, (args, kwargs), self.acall, *args, kwargs=kwargs, again=True
            )
        if self.is_async:
            return await self._acall(args, kwargs)
        if self._loop_may_peek():
            found, result = self._peek(self.key(*args, **kwargs))
            if found:
                return result
        return await sync_to_async(self._call)(args, kwargs)

    def unregister(self) -> None:
        """Forget this function (one defined inside a test): system checks and the
        invalidation of its dependencies no longer know it."""
        _functions.pop(self.label, None)
        for labels in _dependents.values():
            labels.discard(self.label)

    # -- invalidation ------------------------------------------------------------------
    def invalidate(self, *args: Any, **kwargs: Any) -> None:
        """Drop the result for these arguments in both tiers of every process; inside a
        transaction, at its commit (a result computed from its uncommitted rows is then
        dropped too, and a rollback drops nothing that was right)."""
        batch = Batch()
        batch.add_fn_key(self.label, self.key(*args, **kwargs))
        groups = self.dep_groups()
        queue(batch, groups[0].alias if groups else DEFAULT_DB_ALIAS)


def _same_function(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """Whether b, defined under a's name, computes what a does: the same code with the
    same captured values (a module reloaded, a closure made again from the same values),
    so that sharing results is right. Two lambdas of one module, or one factory's
    closures over other values, are not."""
    if "<locals>" not in b.__qualname__ and "<lambda>" not in b.__qualname__:
        return True  # a module's function defined again (a reload): it replaces the old
    if getattr(a, "__code__", None) != getattr(b, "__code__", None):
        return False
    cells_a, cells_b = getattr(a, "__closure__", None) or (), getattr(b, "__closure__", None) or ()
    try:
        return len(cells_a) == len(cells_b) and all(
            x.cell_contents is y.cell_contents or x.cell_contents == y.cell_contents
            for x, y in zip(cells_a, cells_b, strict=True)
        )
    except Exception:  # an empty cell, a comparison that raises
        return False


def cached(
    depends_on: Iterable[type[models.Model] | str],
    timeout: float | None = None,
    negative_timeout: float | None = None,
    l1_timeout: float | None = None,
    name: str | None = None,
) -> Callable[[Callable[..., Any]], CachedFunction]:
    """Cache a function of several models' rows:

        @cached(depends_on=[Provider, Model, GlobalModel], timeout=600)
        def resolve_global_model(name): ...

    None results are kept for negative_timeout; a timeout of 0 keeps nothing. A function
    is known in every process by its module and qualified name: a closure or a lambda
    made more than once needs a `name` of its own."""

    if callable(depends_on) and not isinstance(depends_on, type):
        # @cached without its arguments: the function came as depends_on.
        raise TypeError(
            f"@cached needs its arguments: @cached(depends_on=[Model, ...]) above "
            f"{getattr(depends_on, '__qualname__', depends_on)!s}"
        )

    def wrap(fn: Callable[..., Any]) -> CachedFunction:
        return CachedFunction(fn, depends_on, timeout, negative_timeout, l1_timeout, name)

    return wrap


def _marker_ms() -> int:
    """How long the marker a derived read leaves for its fill lives: as long as an entry
    (a slower computation's result is not kept), and never 0 ms, which Redis refuses."""
    return max(1, int(conf.TIMEOUT * 1000))
