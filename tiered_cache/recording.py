"""What one request's cached reads and invalidations were, for the debug-toolbar panel
(tiered_cache.panels). Costs nothing while no panel records: the read paths test the
module-level `active` (a count of recording requests in the process) and go no further
when it is 0. While a panel records, its Recorder is found through a context variable,
which follows the request into sync_to_async threads and async tasks; other requests of
the process are not recorded."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from contextvars import ContextVar, Token
from typing import Any

import asgiref
import django
from django.core.exceptions import ObjectDoesNotExist

__all__ = [
    "Call",
    "Recorder",
    "active",
    "aread",
    "current",
    "invalidated",
    "missed",
    "read",
    "served",
    "served_l1",
    "served_l2",
    "start",
    "stop",
    "wanted",
    "why",
]

# Tiers a read is served from, as the panel names them.
L1, L2, NEGATIVE, DATABASE, BYPASSED = "L1", "L2", "negative", "database", "bypassed"
TIERS = (L1, L2, NEGATIVE, DATABASE, BYPASSED)

# How many calls and invalidations one request keeps in detail (the counts go on).
MAX_CALLS = 1000

# Requests recording now, in the whole process: the one thing the read paths look at.
active = 0
_lock = threading.Lock()

_recorder: ContextVar[Recorder | None] = ContextVar("tiered_cache_recorder", default=None)
# The innermost call being served in this context: where served() and why() write.
_call: ContextVar[Call | None] = ContextVar("tiered_cache_call", default=None)

# Frames skipped when finding who made a call (or a write): ours, Django's, and the threads
# and loops between a request and its code.
_SKIP = tuple(
    os.path.dirname(os.path.abspath(m.__file__ or "")) + os.sep
    for m in (sys.modules[__package__ or "tiered_cache"], django, asgiref, asyncio)
) + (threading.__file__ or "",)


class Call:
    """One get_cached / get_many_cached / cached-function call, as the panel shows it."""

    __slots__ = (
        "api",
        "counts",
        "depth",
        "entering",
        "error",
        "label",
        "lookup",
        "ms",
        "reasons",
        "result",
        "where",
    )

    def __init__(self, api: str, label: str, lookup: str, depth: int) -> None:
        self.api = api
        self.label = label
        self.lookup = lookup
        self.depth = depth
        # Rows served per tier (one row for get_cached and a cached function).
        self.counts: dict[str, int] = {}
        self.reasons: list[str] = []
        self.result = ""
        self.error = ""
        self.where = ""
        self.ms = 0.0
        # Set by aread() until the method it calls again sees it (wanted()).
        self.entering = False

    def tier(self) -> str:
        """The tier of a one-row call; for many rows, each tier with its count."""
        if len(self.counts) == 1 and not self.api.endswith("get_many_cached"):
            return next(iter(self.counts))
        return ", ".join(f"{t} {n}" for t, n in self.counts.items() if n) or "-"

    def as_dict(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "model": self.label,
            "lookup": self.lookup,
            "tier": self.tier(),
            "tiers": [t for t in TIERS if self.counts.get(t)],
            "counts": dict(self.counts),
            "reason": "; ".join(dict.fromkeys(r for r in self.reasons if r)),
            "result": self.result,
            "error": self.error,
            "ms": self.ms,
            "depth": self.depth,
            "where": self.where,
        }


class Recorder:
    """One request's calls and invalidations."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.invalidations: list[dict[str, Any]] = []
        self.totals: dict[str, int] = dict.fromkeys(TIERS, 0)
        self.reads = 0
        self.dropped_calls = 0
        self.dropped_invalidations = 0
        self._lock = threading.Lock()  # async tasks of one request may read at once

    def open(self, api: str, label: str, lookup: str, depth: int) -> Call:
        call = Call(api, label, lookup, depth)
        with self._lock:
            if len(self.calls) < MAX_CALLS:
                self.calls.append(call)
            else:
                self.dropped_calls += 1
        return call

    def close(self, call: Call) -> None:
        with self._lock:
            for tier, n in call.counts.items():
                self.totals[tier] += n
                self.reads += n

    def clear(self) -> None:
        """Forget what was recorded so far (tests)."""
        with self._lock:
            self.calls.clear()
            self.invalidations.clear()
            self.totals = dict.fromkeys(TIERS, 0)
            self.reads = self.dropped_calls = self.dropped_invalidations = 0

    def add_invalidation(self, entry: dict[str, Any]) -> None:
        with self._lock:
            if len(self.invalidations) < MAX_CALLS:
                self.invalidations.append(entry)
            else:
                self.dropped_invalidations += 1


def start(recorder: Recorder) -> Token[Recorder | None]:
    """Record this context's calls (the panel's enable_instrumentation)."""
    global active
    with _lock:
        active += 1
    return _recorder.set(recorder)


def stop(token: Token[Recorder | None]) -> None:
    """Stop recording (once per start())."""
    global active
    with _lock:
        active -= 1
    try:
        _recorder.reset(token)
    except ValueError:  # reset from another context than start()'s
        _recorder.set(None)


def current() -> Recorder | None:
    return _recorder.get()


# -- calls --------------------------------------------------------------------------------


def _caller() -> str:
    """The first frame outside tiered_cache, Django, asgiref and asyncio: who called."""
    frame: Any = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_SKIP):
        frame = frame.f_back
    if frame is None:
        return ""
    return f"{_relative(frame.f_code.co_filename)}:{frame.f_lineno} in {frame.f_code.co_name}"


@functools.lru_cache(maxsize=512)
def _relative(filename: str) -> str:
    """Relative to the longest sys.path entry holding it: "demo/views.py", not the whole path."""
    for root in sorted((p.rstrip(os.sep) for p in sys.path if p), key=len, reverse=True):
        if filename.startswith(root + os.sep):
            return filename[len(root) + 1 :]
    return filename


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _describe(lookup: Any) -> str:
    """A lookup's kwargs, get_many's pks, or a cached function's (args, kwargs)."""
    if isinstance(lookup, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in lookup.items())
    if isinstance(lookup, list):
        pks = ", ".join(_short(pk) for pk in lookup[:10])
        more = f", ... ({len(lookup)} in all)" if len(lookup) > 10 else ""
        return f"pk in [{pks}{more}]"
    args, kwargs = lookup
    return ", ".join([*(_short(a) for a in args), *(f"{k}={_short(v)}" for k, v in kwargs.items())])


def _begin(rec: Recorder, api: str, label: str, lookup: Any) -> tuple[Call, Token[Call | None]]:
    outer = _call.get()
    call = rec.open(api, label, _describe(lookup), 0 if outer is None else outer.depth + 1)
    call.where = _caller()
    return call, _call.set(call)


def _end(rec: Recorder, call: Call, t0: float, result: Any, error: BaseException | None) -> None:
    call.ms = (time.perf_counter() - t0) * 1000
    if error is not None:
        if isinstance(error, ObjectDoesNotExist):
            call.result = "does not exist"
            if not call.counts:  # a remembered absence found in L1 (no other tier said so)
                call.counts[NEGATIVE] = 1
                call.reasons.append("from L1")
        else:
            call.error = f"{type(error).__name__}: {error}"
            call.result = "raised"
    elif isinstance(result, dict):
        call.result = f"{len(result)} row{'s' if len(result) != 1 else ''}"
    elif call.api == "cached function":
        call.result = "None" if result is None else type(result).__name__
        if not call.counts:
            call.counts[L1] = 1
    else:
        call.result = "found"
        if not call.counts:  # an L1 hit: the one path that notes nothing
            call.counts[L1] = 1
    rec.close(call)


def read(api: str, label: str, lookup: Any, fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), recorded as one call if this context records."""
    rec = _recorder.get()
    if rec is None:
        return fn(*args)
    call, token = _begin(rec, api, label, lookup)
    t0 = time.perf_counter()
    try:
        result = fn(*args)
    except BaseException as exc:
        _end(rec, call, t0, None, exc)
        raise
    finally:
        _call.reset(token)
    _end(rec, call, t0, result, None)
    return result


def wanted() -> bool:
    """Whether a method that records itself whole (aread(..., itself)) should: this
    context records, and the call is not the method's own, just opened by aread()."""
    if _recorder.get() is None:
        return False
    call = _call.get()
    if call is not None and call.entering:
        call.entering = False
        return False
    return True


async def aread(
    api: str,
    label: str,
    lookup: Any,
    fn: Callable[..., Coroutine[Any, Any, Any]],
    *args: Any,
    kwargs: dict[str, Any] | None = None,
    again: bool = False,
) -> Any:
    """await fn(*args, **kwargs), recorded as one call if this context records. again:
    fn is the very method that asked, which calls wanted() first (see there)."""
    rec = _recorder.get()
    if rec is None:
        return await fn(*args, **(kwargs or {}))
    call, token = _begin(rec, api, label, lookup)
    call.entering = again
    t0 = time.perf_counter()
    try:
        result = await fn(*args, **(kwargs or {}))
    except BaseException as exc:
        _end(rec, call, t0, None, exc)
        raise
    finally:
        _call.reset(token)
    _end(rec, call, t0, result, None)
    return result


# -- notes from the read paths (cold branches only) ---------------------------------------


def served(tier: str, reason: str = "", n: int = 1) -> None:
    """The call being served got n rows from `tier` (and why, when it is not the usual)."""
    call = _call.get()
    if call is None or n <= 0:
        return
    call.counts[tier] = call.counts.get(tier, 0) + n
    if reason:
        call.reasons.append(reason)


def served_l1(rows: int, negatives: int, stale: bool) -> None:
    """Rows and remembered absences found in L1 by get_many, or while the bus was not
    trusted (OUTAGE_STALE_SECONDS); a plain get_cached L1 hit notes nothing."""
    reason = "stale: bus not trusted, within OUTAGE_STALE_SECONDS" if stale else ""
    served(L1, reason, rows)
    served(NEGATIVE, "from L1", negatives)


def served_l2(negative: bool) -> None:
    """A row, or a remembered absence, from L2."""
    if negative:
        served(NEGATIVE, "from L2")
    else:
        served(L2)


def missed(trusted: bool, busy: bool, source: Any, n: int = 1) -> None:
    """n rows of the call being served were read from the database (reads._load and
    get_many): why, when it is more than "not in L2"."""
    if not trusted:
        reason = "bus not trusted"
    elif busy:
        reason = "another process's fill did not land within LEASE_WAIT"
    elif source is False:
        reason = "the primary's connection is in this transaction: read there, nothing cached"
    elif source is not None:
        reason = "read from the primary (the replica may lag)"
    else:
        reason = ""
    served(DATABASE, reason, n)


def why(reason: str) -> None:
    """A reason for what the call being served does next (e.g. Redis was unavailable)."""
    call = _call.get()
    if call is not None:
        call.reasons.append(reason)


# -- invalidations --------------------------------------------------------------------------


def _pk_text(rid: str) -> str:
    """A row id (keys.row_id: "3.i13") as the pk it encodes ("13"), or as it is."""
    text = rid.replace("%7C", "|").replace("%25", "%")
    size, dot, rest = text.partition(".")
    if dot and size.isdigit() and int(size) == len(rest) and rest[:1] in "isudtDf":
        return rest[1:]
    return rid


def invalidated(
    labels: list[str], rows: list[str], flush: bool, group: Any, derived_key: str = ""
) -> None:
    """An invalidation this context issued: rows (or all, flush) of the models that share
    a group (a keys.Group, or None for one derived result, derived_key)."""
    rec = _recorder.get()
    if rec is None:
        return
    shown = [_pk_text(rid) for rid in rows[:20]]
    if len(rows) > 20:
        shown.append(f"... ({len(rows)} in all)")
    rec.add_invalidation(
        {
            "models": list(dict.fromkeys(labels)),
            "database": getattr(group, "alias", ""),
            "rows": shown,
            "row_count": len(rows),
            "flush": flush,
            "derived_key": derived_key,
            "where": _caller(),
        }
    )
