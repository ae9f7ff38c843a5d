"""How a read goes: L1, then L2 under a lease, then the database, and the fills back."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from . import signals
from .bus import bus
from .invalidation import in_dirty_transaction
from .keys import row_id
from .registry import Lookup, ModelCache
from .counters import hot
from .serialization import CorruptPayload, dumps, loads_verified, sign, verify
from .tiers.local import NEGATIVE, local_tier
from .tiers.remote import Unavailable, fresh_token, redis_tier

logger = logging.getLogger("tiered_cache")

# What one read of L2 or the database yields: a frozen row, NEGATIVE, or UNCACHEABLE
# (a row with deferred fields, handed back as it is and stored nowhere).
UNCACHEABLE = object()

_HIT, _NO_LEASE, _LEASE, _BUSY = 1, 0, 2, 3


class _Flight:
    """One in-process load of a key; other threads wanting it wait here (single-flight)."""

    __slots__ = ("done", "value", "obj")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.obj: Any = None


_flights: dict[tuple[str, Any], _Flight] = {}
_flights_lock = threading.Lock()

# Tests set this to pause a reader between its database read and its fills.
fill_hook: Any = None


def get(manager: Any, mc: ModelCache, lk: Lookup, values: tuple[Any, ...]) -> Any:
    # L1 is keyed by the lookup and its values: no string is built on the hot path.
    l1key = (lk.key_prefix, values)
    db = manager.db
    if in_dirty_transaction(mc.label, db):
        mc.counters.bypassed += 1
        return manager.get_queryset().get(**lk.orm_kwargs(values))

    found = peek_local(mc, l1key, db)
    if found is not None:
        return found

    if not bus.trusted():
        bus.ensure_started()
    flight_key = (db, l1key)
    with _flights_lock:
        flight = _flights.get(flight_key)
        leader = flight is None
        if leader:
            flight = _flights[flight_key] = _Flight()
    assert flight is not None
    if not leader:
        value = flight.value if flight.done.wait(mc_wait()) else None
        if value is not None and value is not UNCACHEABLE:
            return _deliver(mc, flight.value, flight.obj, db)
        value, obj = _load(manager, mc, lk, values, l1key, db, fill=False)
        return _deliver(mc, value, obj, db)
    try:
        value, obj = _load(manager, mc, lk, values, l1key, db, fill=True)
        flight.value, flight.obj = value, obj
    finally:
        flight.done.set()
        with _flights_lock:
            _flights.pop(flight_key, None)
    return _deliver(mc, value, obj, db, own=True)


def peek_local(mc: ModelCache, key: Any, db: str) -> Any:
    """An instance from L1, None on a miss; raises DoesNotExist for a remembered absence.
    Does no I/O, so async callers use it on the event loop."""
    now = time.monotonic()
    if now >= bus._trusted_until:
        return None
    v = local_tier.get(key, now)
    if v is None:
        return None
    if v is NEGATIVE:
        mc.counters.negative_hits += 1
        _signal_hit(mc, "l1", key)
        raise _does_not_exist(mc)
    mc.counters.l1_hits += 1
    if signals.cache_hit.receivers:
        _signal_hit(mc, "l1", key)
    hot.touch(mc, v)
    return mc.codec.thaw(v, db)


def mc_wait() -> float:
    from .conf import conf

    return conf.LEASE_TIMEOUT


def _deliver(mc: ModelCache, value: Any, obj: Any, db: str, own: bool = False) -> Any:
    if value is NEGATIVE:
        raise _does_not_exist(mc)
    if value is UNCACHEABLE:
        return obj
    if own and obj is not None:
        return obj
    return mc.codec.thaw(value, db)


def _does_not_exist(mc: ModelCache) -> Exception:
    return mc.model.DoesNotExist(f"{mc.model._meta.object_name} matching query does not exist.")


def _signal_hit(mc: ModelCache, tier: str, key: str) -> None:
    if signals.cache_hit.receivers:
        signals.cache_hit.send(sender=mc.model, tier=tier, key=key)


def _read_args(mc: ModelCache, key: str, lease: str) -> tuple[list[str], list[Any]]:
    from .conf import conf

    return (
        [mc.gen_key, mc.writes_key, key, key + "|L"],
        [lease, int(conf.LEASE_TIMEOUT * 1000), fresh_token(), mc.row_prefix],
    )


def decode(mc: ModelCache, key: str, raw: bytes) -> Any:
    """A verified L2 value as a frozen row or NEGATIVE; CorruptPayload otherwise."""
    parts = raw.split(b"|", 4)
    if len(parts) != 5:
        raise CorruptPayload("malformed header")
    kind = parts[0]
    payload = loads_verified(verify(key, parts[4]))
    if kind == b"N":
        if payload is not None:
            raise CorruptPayload("negative entry with a row")
        return NEGATIVE
    if not isinstance(payload, tuple) or len(payload) != len(mc.codec.attnames):
        raise CorruptPayload("row of the wrong shape")
    return mc.codec.freeze(payload)


def _corrupt(mc: ModelCache, key: str, exc: Exception) -> None:
    mc.counters.corrupt += 1
    logger.warning("tiered_cache: ignoring a bad L2 payload at %r: %s", key, exc)
    try:
        redis_tier.call(lambda: redis_tier.client.delete(key))
    except Unavailable:
        pass


def _load(
    manager: Any, mc: ModelCache, lk: Lookup, values: tuple[Any, ...], l1key: Any, db: str,
    fill: bool,
) -> tuple[Any, Any]:
    """(frozen row | NEGATIVE | UNCACHEABLE, instance read from the database or None)."""
    from .conf import conf

    key = lk.key(values)
    trusted = bus.trusted()
    token = local_tier.token(mc.label)
    lease = fresh_token() if fill else ""
    code, gen, writes = _NO_LEASE, None, None
    if trusted:
        try:
            res = redis_tier.read(*_read_args(mc, key, lease))
            code = res[0]
            if code == _HIT:
                try:
                    value = decode(mc, key, res[1])
                except CorruptPayload as exc:
                    _corrupt(mc, key, exc)
                    code = _NO_LEASE
                else:
                    _count_l2_hit(mc, key, value)
                    if fill:
                        local_tier.set(l1key, mc.label, _row_of(mc, value), value,
                                       _l1_timeout(mc, value), token)
                    return value, None
            else:
                gen, writes = res[1], res[2]
            if code == _BUSY:
                # Another process is filling this key: take its value when it lands,
                # or read the database ourselves after a bound (its holder may be dead).
                deadline = time.monotonic() + conf.LEASE_WAIT
                pause = 0.001
                while time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.01)
                    res = redis_tier.read(*_read_args(mc, key, ""))
                    if res[0] == _HIT:
                        try:
                            value = decode(mc, key, res[1])
                        except CorruptPayload as exc:
                            _corrupt(mc, key, exc)
                            break
                        _count_l2_hit(mc, key, value)
                        return value, None
        except Unavailable:
            code = _NO_LEASE

    mc.counters.misses += 1
    if signals.cache_miss.receivers:
        signals.cache_miss.send(sender=mc.model, key=key)
    try:
        obj = manager.get_queryset().get(**lk.orm_kwargs(values))
    except mc.model.DoesNotExist:
        value, obj, row_vals = NEGATIVE, None, None
    else:
        row_vals = mc.codec.values(obj)
        if row_vals is None:
            return UNCACHEABLE, obj
        value = mc.codec.freeze(row_vals)

    if fill_hook is not None:
        fill_hook(mc, key)

    stored = True
    if code == _LEASE:
        stored = _fill_l2(mc, key, lease, gen, writes, value, row_vals)
    if fill and trusted and stored:
        local_tier.set(l1key, mc.label, _row_of(mc, value), value, _l1_timeout(mc, value), token)
    return value, obj


def _count_l2_hit(mc: ModelCache, key: str, value: Any) -> None:
    if value is NEGATIVE:
        mc.counters.negative_hits += 1
    else:
        mc.counters.l2_hits += 1
        hot.touch(mc, value)
    _signal_hit(mc, "l2", key)


def _row_of(mc: ModelCache, value: Any) -> str:
    return "" if value is NEGATIVE else row_id(value[2])


def _l1_timeout(mc: ModelCache, value: Any) -> float:
    if value is NEGATIVE:
        return min(mc.l1_timeout, mc.negative_timeout)
    return mc.l1_timeout


def fill_args(
    mc: ModelCache, key: str, lease: str, gen: Any, writes: Any, value: Any, row_vals: Any
) -> tuple[list[str], list[Any]]:
    if value is NEGATIVE:
        body = sign(key, dumps(None))
        rid, kind, ttl = "", "N", mc.negative_timeout
    else:
        body = sign(key, dumps(row_vals))
        rid, kind, ttl = row_id(row_vals[mc.codec.pk_index]), "P", mc.timeout
    row_key = mc.row_key(rid) if rid else key + "|R"
    return (
        [mc.gen_key, mc.writes_key, key, key + "|L", row_key],
        [lease, gen, writes, kind, rid, body, int(ttl * 1000), fresh_token(),
         int((mc.timeout + 60) * 1000)],
    )


def _fill_l2(
    mc: ModelCache, key: str, lease: str, gen: Any, writes: Any, value: Any, row_vals: Any
) -> bool:
    try:
        ok = redis_tier.fill_many([fill_args(mc, key, lease, gen, writes, value, row_vals)])[0]
    except Unavailable:
        return True  # L2 is down; L1 still follows the bus rule
    if ok:
        mc.counters.fills += 1
        return True
    mc.counters.fills_refused += 1
    return False


def get_many(manager: Any, mc: ModelCache, pks: list[Any]) -> dict[Any, Any]:
    lk = mc.pk_lookup
    prep = lk.preps[0]
    db = manager.db
    wanted: dict[Any, str] = {}
    for pk in pks:
        v = prep(pk.pk if hasattr(pk, "_meta") else pk)
        if v not in wanted:
            wanted[v] = lk.key((v,))
    prefix = lk.key_prefix
    if in_dirty_transaction(mc.label, db):
        mc.counters.bypassed += len(wanted)
        return manager.get_queryset().in_bulk(list(wanted))

    found: dict[Any, Any] = {}
    trusted = bus.trusted()
    if not trusted:
        bus.ensure_started()
        trusted = bus.trusted()
    todo: dict[Any, str] = {}
    if trusted:
        for pk, key in wanted.items():
            v = local_tier.get((prefix, (pk,)))
            if v is None:
                todo[pk] = key
            elif v is NEGATIVE:
                mc.counters.negative_hits += 1
            else:
                mc.counters.l1_hits += 1
                found[pk] = mc.codec.thaw(v, db)
    else:
        todo = dict(wanted)
    if not todo:
        return found

    token = local_tier.token(mc.label)
    leases = {pk: fresh_token() for pk in todo}
    results: list[Any] = []
    if trusted:
        try:
            results = redis_tier.read_many(
                [_read_args(mc, key, leases[pk]) for pk, key in todo.items()]
            )
        except Unavailable:
            results = []
    missing: dict[Any, tuple[str, Any]] = {}
    for i, (pk, key) in enumerate(todo.items()):
        res = results[i] if results else [_NO_LEASE, None, None]
        if res[0] == _HIT:
            try:
                value = decode(mc, key, res[1])
            except CorruptPayload as exc:
                _corrupt(mc, key, exc)
                missing[pk] = (key, None)
                continue
            _count_l2_hit(mc, key, value)
            local_tier.set((prefix, (pk,)), mc.label, _row_of(mc, value), value,
                           _l1_timeout(mc, value), token)
            if value is not NEGATIVE:
                found[pk] = mc.codec.thaw(value, db)
        else:
            missing[pk] = (key, res if res[0] == _LEASE else None)
    if not missing:
        return found

    mc.counters.misses += len(missing)
    objs = manager.get_queryset().in_bulk(list(missing))
    fills = []
    frozen: dict[Any, Any] = {}
    for pk, (key, res) in missing.items():
        obj = objs.get(pk)
        row_vals = mc.codec.values(obj) if obj is not None else None
        if obj is not None:
            found[pk] = obj
            if row_vals is None:
                continue
        value = NEGATIVE if obj is None else mc.codec.freeze(row_vals)
        frozen[pk] = (key, value)
        if res is not None:
            fills.append(fill_args(mc, key, leases[pk], res[1], res[2], value, row_vals))
    stored_ok = True
    if fills:
        try:
            oks = redis_tier.fill_many(fills)
            mc.counters.fills += sum(1 for ok in oks if ok)
            mc.counters.fills_refused += sum(1 for ok in oks if not ok)
            stored_ok = all(oks)
        except Unavailable:
            pass
    if trusted and stored_ok:
        for pk, (key, value) in frozen.items():
            local_tier.set((prefix, (pk,)), mc.label, _row_of(mc, value), value,
                           _l1_timeout(mc, value), token)
    return found


def warm(manager: Any, mc: ModelCache, objs_query: Any, batch_size: int = 500) -> dict[str, int]:
    """Store rows in L2 under their pk key, in pipelined batches. The generation and write
    counter are read before the rows, so a write committed meanwhile refuses the fills."""
    from .conf import conf

    stored = refused = 0
    lk = mc.pk_lookup
    qs = objs_query
    last_pk = None
    while True:
        head = redis_tier.call(
            lambda: redis_tier.client.mget([mc.gen_key, mc.writes_key])
        )
        if head[0] is None:
            # No generation yet: a read creates one; make one now so fills can match it.
            redis_tier.read(*_read_args(mc, lk.key_prefix + "warm", ""))
            head = redis_tier.call(lambda: redis_tier.client.mget([mc.gen_key, mc.writes_key]))
        gen, writes = head[0], head[1] or b"0"
        page = qs.order_by("pk")
        if last_pk is not None:
            page = page.filter(pk__gt=last_pk)
        rows = list(page[:batch_size])
        if not rows:
            break
        fills = []
        for obj in rows:
            vals = mc.codec.values(obj)
            if vals is None:
                continue
            key = lk.key((vals[mc.codec.pk_index],))
            fills.append(fill_args(mc, key, "", gen.decode(), writes.decode(), vals, vals))
        if fills:
            oks = redis_tier.fill_many(fills)
            stored += sum(1 for ok in oks if ok)
            refused += sum(1 for ok in oks if not ok)
        last_pk = rows[-1].pk
        if len(rows) < batch_size:
            break
    mc.counters.fills += stored
    del conf
    return {"stored": stored, "refused": refused}
