"""How a read goes: L1, then L2 under a lease, then the database, and the fills back."""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any, TypeVar

from django.core.exceptions import ObjectDoesNotExist
from django.db import DEFAULT_DB_ALIAS, connections, models, router
from django.db.models.query import ModelIterable

from . import recording, signals
from .bus import bus
from .conf import conf
from .counters import hot
from .groups import read_group, replica_of
from .keys import (
    BUSY,
    HIT,
    LEASE,
    NO_LEASE,
    NO_ROW,
    ROW,
    Group,
    Read,
    ReadMany,
    RowHeader,
    ScriptCall,
    Shard,
    ValidEntry,
    equal_as_in_python,
    fill_call,
    keyable_values,
    l1_value,
    lease_key,
    peek_many_call,
    read_call,
    read_many_call,
    release_call,
    row_header,
    split_header,
    valid_entries,
)
from .registry import Lookup, ModelCache, plain_managers, plain_model_cache
from .serialization import CorruptPayload, dumps, loads_verified, sign, verified_body
from .tiers.local import NEGATIVE, local_tier, weigh_payload
from .tiers.remote import Unavailable, fresh_token, redis_tier
from .transactions import bypass, nothing_to_bypass

logger = logging.getLogger("tiered_cache")

# A row with deferred fields (from a manager whose queryset defers some): handed back as
# it is and stored nowhere.
UNCACHEABLE = object()


class _Flight:
    """One in-process load of a key; other threads wanting it wait here (single-flight).
    The event is made only when someone waits: most loads have no company."""

    __slots__ = ("done", "finished", "value")

    def __init__(self) -> None:
        self.done: threading.Event | None = None
        self.finished = False
        self.value: Any = None


# Keyed by (L1 key, L1 token).
_flights: dict[tuple[tuple[Any, ...], tuple[int, int, int]], _Flight] = {}
_flights_lock = threading.Lock()


def _after_fork() -> None:
    """A forked child waits on no load of its parent's threads."""
    global _flights_lock
    _flights_lock = threading.Lock()
    _flights.clear()


os.register_at_fork(after_in_child=_after_fork)


class Fill:
    """One FILL of a frozen row or NEGATIVE under key, signed once the row version is
    known (see RedisTier.run_fills). Generations, counters and versions stay bytes as
    Redis gave them: junk in a counter key must make a fill fail in Redis, never raise
    here."""

    __slots__ = (
        "g",
        "label",
        "codec",
        "key",
        "lease",
        "gen",
        "writes",
        "kind",
        "rid",
        "body",
        "ttl",
        "version",
        "row_seen",
    )

    def __init__(
        self,
        g: Group,
        mc: ModelCache,
        key: str,
        lease: str,
        gen: Any,
        writes: Any,
        value: Any,
        ttl: float,
        rid: str,
        row_seen: bytes | None = None,
    ) -> None:
        """row_seen: the row's version when the read began, if it named the row (see
        keys.fill_call); None: the fill is guarded by the model's write count."""
        self.g, self.key, self.lease = g, key, lease
        self.label, self.codec = mc.label, mc.codec
        self.gen, self.writes = _raw(gen), _raw(writes)
        # Encoded by call(), on the filler thread: the caller has its row already.
        self.body: Any = value
        self.row_seen: bytes | None = None
        if value is NEGATIVE:
            self.kind, self.rid, self.body = NO_ROW, "", None
            self.version: bytes = self.writes
        elif isinstance(row_seen, bytes):
            # Signed with the version the row has: no second round trip to sign again.
            self.kind, self.rid, self.row_seen = ROW, rid, row_seen
            self.version = row_seen
        else:
            self.kind, self.rid = ROW, rid
            self.version = fresh_token().encode()
        self.ttl = ttl

    def call(self, version: bytes) -> ScriptCall:
        now = time.time()
        header = row_header(self.kind, self.gen, self.rid, version, int(now + self.ttl) + 1)
        body = dumps(None) if self.kind == NO_ROW else self.codec.encode(self.body)
        return fill_call(
            self.g,
            self.label,
            self.key,
            self.rid,
            self.lease,
            self.gen,
            self.writes,
            self.kind,
            sign(self.key, header, body),
            max(1, int(self.ttl * 1000)),  # under 1 ms: PX 0 is an error reply
            version,
            int((conf.TIMEOUT + 60) * 1000),
            int((now + self.ttl) * 1000),
            self.row_seen,
        )


class Release:
    """A lease given back unfilled, on the filler thread: the row read cannot be cached
    (fields left deferred), and every other reader of the key would wait LEASE_WAIT for a
    fill that never comes, until the lease expired."""

    __slots__ = ("key", "lease", "version")

    def __init__(self, key: str, lease: str) -> None:
        self.key, self.lease, self.version = key, lease, b""

    def call(self, version: bytes) -> ScriptCall:
        return release_call(lease_key(self.key), self.lease)


def _raw(v: Any) -> bytes:
    return v if isinstance(v, bytes) else str(v).encode()


# -- one row ---------------------------------------------------------------------


def get(manager: Any, mc: ModelCache, lk: Lookup, values: tuple[Any, ...]) -> Any:
    manager, db, g, why, scope, mode = settle(manager, mc, lk)
    if why is None:
        if None in values:
            # SQL's NULL equals no other: get(field=None) matches every row with NULL
            # there, so no lookup is unique by it (a nullable unique field may hold many).
            why = "a value is None, and NULL makes no lookup unique"
        elif not lk.keyed or not keyable_values(values):
            why = "a value of a type the tiers do not key (a JSON value, an expression)"
    if why is not None:
        mc.counters.bypassed += 1
        if recording.active:
            recording.served(recording.BYPASSED, why)
        return _bypassed(manager, mc, lk.orm_kwargs(values))
    assert scope is not None  # a queryset that is not cacheable has a reason (why)
    found = _get_scoped(manager, mc, g, lk, values, db, scope)
    if mode is not None:
        fetch_as(mode, [found])
    return found


# Set while a project's own get() runs for get_cached(): one that calls get_cached() itself
# (for some lookups) reads the queryset then, as before it had a get() of its own.
_in_own_get: contextvars.ContextVar[bool] = contextvars.ContextVar("tiered_cache_own_get")


def _bypassed(manager: Any, mc: ModelCache, kwargs: dict[str, Any]) -> Any:
    """A read that skips the tiers: what the caller's .get() answers, through a get() of
    the project's too (registry.own_get)."""
    if not mc.own_get or _in_own_get.get(False):
        return manager.get_queryset().get(**kwargs)
    reset = _in_own_get.set(True)
    try:
        return manager.get(**kwargs)
    finally:
        _in_own_get.reset(reset)


def _get_scoped(
    manager: Any, mc: ModelCache, g: Group, lk: Lookup, values: tuple[Any, ...], db: str, scope: str
) -> Any:
    """get() once it is settled that the tiers serve this read."""
    # L1 is keyed by the lookup, the database, the manager's filter and the values: no
    # string is built here.
    l1key = lk.l1_key(db, scope, values)
    found = peek_local(mc, l1key, db)
    if found is not None:
        return found
    if not bus.trusted():
        bus.ensure_started()
        # Trust lapsed while this process was idle and came back with a heartbeat: what
        # L1 holds is vouched for again.
        found = peek_local(mc, l1key, db)
        if found is not None:
            return found
        if conf.OUTAGE_STALE_SECONDS and not bus.trusted():
            found = stale_local(mc, l1key, db)
            if found is not None:
                return found
    return _fetch(manager, mc, g, lk, values, l1key, db, scope)


def _fetch(
    manager: Any,
    mc: ModelCache,
    g: Group,
    lk: Lookup,
    values: tuple[Any, ...],
    l1key: Any,
    db: str,
    scope: str,
) -> Any:
    """The read past L1, once L1 missed: from L2 or the database, one load per key and
    process at a time, filling both tiers back."""
    # The token is part of the flight: a thread whose own save dropped this group since
    # a load began must not be handed that load's (older) row.
    token = local_tier.token(g.id)
    flight_key = (l1key, token)
    with _flights_lock:
        flight = _flights.get(flight_key)
        leader = flight is None
        if flight is None:
            flight = _flights[flight_key] = _Flight()
        elif flight.done is None:
            flight.done = threading.Event()
        done = flight.done
    if not leader:
        assert done is not None
        value = flight.value if done.wait(conf.LEASE_TIMEOUT) else None
        if value is not None and value is not UNCACHEABLE:
            if recording.active:
                recording.served(recording.L1, "shared another thread's load of this key")
            return _deliver(mc, value, None, db)
        value, obj = _load(manager, mc, g, lk, values, l1key, db, scope, token, lease=False)
        return _deliver(mc, value, obj, db)
    try:
        value, obj = _load(manager, mc, g, lk, values, l1key, db, scope, token, lease=True)
        flight.value = value
    finally:
        with _flights_lock:
            _flights.pop(flight_key, None)
            if flight.done is not None:
                flight.done.set()
    return _deliver(mc, value, obj, db)


def hit(manager: Any, lookup: dict[str, Any]) -> Any:
    """get_cached() when it is the commonest read of all, an L1 hit through a model's own
    manager, in one function; on an L1 miss of such a read, the read past L1 (_fetch()),
    with what was settled here. None for anything else, which get() then takes.

    get() makes a dozen calls (resolve, db, cache_group, bypass, peek_local...) that
    each settle a case this checks for and leaves to get(): a related manager, db_manager()
    or hints, a router, a manager's own db property, a filtering get_queryset(), a value
    the ORM converts or a model instance, a transaction that wrote or reads a snapshot,
    trust lapsed, a remembered absence, cache_hit receivers. What is served is what
    peek_local() would serve, counted the same way, with the heartbeat and bus poll it
    would make (_vouched())."""
    # Calls are most of what a hit costs beyond its floor: the common case makes only the
    # transaction check's besides L1's and the instance's (the manager is known by
    # identity; the lookup of one field, the bus's deadlines and the hot-row sample's
    # count are read in place).
    known = plain_managers.get(id(manager))
    found = known[1] if known is not None and known[0] is manager else plain_model_cache(manager)
    if found is None:
        return None
    mc = found
    # Checked on every read too: Django never sets them on a model's own manager, but
    # nothing stops code that does, and routers come and go with settings.
    if manager._db or manager._hints or router.routers:
        return None
    lk: Lookup
    if len(lookup) == 1:
        ((name, value),) = lookup.items()
        single = mc.plain_single.get(name)
        if single is None or type(value) is not single[1]:
            return None
        lk = single[2]
        key: tuple[Any, ...] = (single[0], DEFAULT_DB_ALIAS, "", value)
    else:
        plain = mc.plain_many(lookup)
        if plain is None:
            return None
        lk, values = plain
        key = (lk.key_prefix, DEFAULT_DB_ALIAS, "", *values)
    if not nothing_to_bypass(DEFAULT_DB_ALIAS):
        return None
    now = time.monotonic()
    due = now >= bus.renew_at or now >= bus.poll_at or now >= bus.trusted_until
    if due and not _vouched(now):
        return None
    v = local_tier.get(key, now)
    if v is None:
        # On to L2 with what was settled here, which get() would settle again: the group
        # of the default database, no filter (scope ""), nothing to bypass, L1 trusted.
        if len(lookup) == 1:
            values = (value,)
        return _fetch(
            manager,
            mc,
            read_group(DEFAULT_DB_ALIAS, mc.root),
            lk,
            values,
            key,
            DEFAULT_DB_ALIAS,
            "",
        )
    if v is NEGATIVE or signals.cache_hit.receivers:
        return None
    mc.counters.l1_hits += 1
    hot.tick += 1  # hot.touch(), in place
    if not hot.tick % hot.SAMPLE_EVERY:
        hot.sample(mc.label, v[2])
    return mc.codec.thaw(v, DEFAULT_DB_ALIAS)


def peek_local(mc: ModelCache, key: Any, db: str) -> Any:
    """An instance from L1, None on a miss; raises DoesNotExist for a remembered absence.
    Does no I/O, so async callers use it on the event loop."""
    now = time.monotonic()
    if not _vouched(now):
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
    hot.touch(mc.label, v[2])
    return mc.codec.thaw(v, db)


def _vouched(now: float) -> bool:
    """Whether the bus vouches for L1 now. A reading process renews its trust (a heartbeat
    at most every BUS_HEARTBEAT) and, busy, applies the drops its listener waits to apply
    (at most once a millisecond) from here."""
    if now >= bus.trusted_until:
        return False
    if now >= bus.renew_at:
        bus.ping()
    if now >= bus.poll_at:
        bus.poll(now)
    return True


def stale_local(mc: ModelCache, key: Any, db: str) -> Any:
    """As peek_local() while the bus cannot vouch for L1, under OUTAGE_STALE_SECONDS: an
    entry at most that many seconds past the last moment it was known to match the
    database (LocalTier.get_stale). None on a miss; raises DoesNotExist for an absence."""
    v = local_tier.get_stale(key, time.monotonic(), bus.vouched_at, conf.OUTAGE_STALE_SECONDS)
    if v is None:
        return None
    mc.counters.stale_hits += 1
    if recording.active:
        recording.served_l1(v is not NEGATIVE, v is NEGATIVE, stale=True)
    if v is NEGATIVE:
        mc.counters.negative_hits += 1
        raise _does_not_exist(mc)
    mc.counters.l1_hits += 1
    return mc.codec.thaw(v, db)


def _deliver(mc: ModelCache, value: Any, obj: Any, db: str) -> Any:
    if value is NEGATIVE:
        raise _does_not_exist(mc)
    if obj is not None:
        return obj  # read from the database by this very call: already the caller's own
    return mc.codec.thaw(value, db)


def _does_not_exist(mc: ModelCache) -> ObjectDoesNotExist:
    # django-stubs declares DoesNotExist on concrete models only, not on type[Model].
    cls: type[ObjectDoesNotExist] = mc.model.DoesNotExist  # type: ignore[attr-defined]
    return cls(f"{mc.model._meta.object_name} matching query does not exist.")


def _signal_hit(mc: ModelCache, tier: str, key: Any) -> None:
    if signals.cache_hit.receivers:
        signals.cache_hit.send(sender=mc.model, tier=tier, key=key)


def _read_call(g: Group, key: str, lease: str, rid: str = "") -> ScriptCall:
    return read_call(g, key, lease, int(conf.LEASE_TIMEOUT * 1000), fresh_token(), rid)


_EXPIRED = object()


_ROW_FIELDS = len(RowHeader._fields)


def decode(mc: ModelCache, key: str, raw: bytes) -> tuple[Any, str, int]:
    """A verified L2 value: (frozen row or NEGATIVE, its row id, its weight in L1), with
    _EXPIRED for the value past the expiry its MAC covers (an old entry put back with a
    fresh Redis TTL); CorruptPayload otherwise. The row id and the weight come from the
    header and the payload's size: nothing is recomputed from the values."""
    split = split_header(raw, _ROW_FIELDS)
    if split is None:
        raise CorruptPayload("malformed header")
    return decode_split(mc, key, raw, split[0], split[1], time.time())


def decode_split(
    mc: ModelCache, key: str, raw: bytes, fields: list[bytes], rest: bytes, now: float
) -> tuple[Any, str, int]:
    """decode() of a value whose header is split already (split_header's parts), at
    time.time() `now`."""
    body = verified_body(key, raw, rest)
    kind, _, rid, _, expires = fields
    try:
        if int(expires) < now:
            return _EXPIRED, "", 0
    except ValueError:
        raise CorruptPayload("malformed expiry") from None
    if kind == NO_ROW:
        payload = loads_verified(body)
        if payload is not None:
            raise CorruptPayload("negative entry with a row")
        return NEGATIVE, "", weigh_payload(0, 0)
    if kind != ROW:
        raise CorruptPayload("an entry of no known kind")
    payload = mc.codec.decode(body)
    return payload, rid.decode(), weigh_payload(len(body), mc.codec.count)


def _corrupt(mc: ModelCache, key: str, exc: Exception) -> None:
    mc.counters.corrupt += 1
    logger.warning("tiered_cache: ignoring a bad L2 payload at %r: %s", key, exc)
    try:
        redis_tier.call(lambda: redis_tier.client.delete(key))
    except Unavailable:
        pass


def _load(
    manager: Any,
    mc: ModelCache,
    g: Group,
    lk: Lookup,
    values: tuple[Any, ...],
    l1key: Any,
    db: str,
    scope: str,
    token: Any,
    lease: bool,
) -> tuple[Any, Any]:
    """(frozen row | NEGATIVE | UNCACHEABLE, instance read from the database or None)."""
    # A pk names its row: a miss learns the row's version, and the fill is refused only if
    # that row is written meanwhile (other rows' writes refused every fill of the model).
    if lk is mc.pk_lookup:
        key, rid = mc.pk_key(g, _alias_part(db, scope), values[0])
    else:
        key, rid = lk.key(g, mc.schema, _alias_part(db, scope), values), ""
    read_at = time.monotonic()
    trusted = bus.trusted()
    source = _miss_source(manager, db)
    lease_token = fresh_token() if lease and source is not False else ""
    code: int = NO_LEASE
    gen = writes = row_seen = None
    if trusted:
        try:
            reply = redis_tier.scripts([_read_call(g, key, lease_token, rid)])[0]
            if time.monotonic() >= bus.trusted_until:
                # Trust ended while Redis answered (a failover another thread saw): the
                # reply may come from a server that lacks invalidations.
                raise Unavailable("trust ended during the read")
            if reply[0] == HIT:
                # The commonest reply of all, taken in place (Read.of, _keep_local): an L2
                # hit's Python work runs after the wait for Redis, where each call costs
                # several times its warm cost.
                entry = _l2_value(mc, key, reply[1])
                if entry is not None:
                    value, rid, weight = entry
                    local_tier.set_many(
                        g.id, token, [(l1key, rid, value, _l1_timeout(mc, value), weight)]
                    )
                    return value, None
            else:
                res = Read.of(reply)
                code, gen, writes, row_seen = res.code, res.gen, res.writes, res.version
            if code == BUSY:
                value, granted = _wait_for_fill(mc, g, key, lease_token, rid)
                if value is not None:
                    return value, None
                if granted is not None:  # the holder let go without a fill: the lease is ours
                    code, gen, writes = granted.code, granted.gen, granted.writes
                    row_seen = granted.version
        except Unavailable as exc:
            code = NO_LEASE
            if recording.active:
                recording.why(f"Redis unavailable ({exc})")

    mc.counters.misses += 1
    if recording.active:
        recording.missed(trusted, code == BUSY, source)
    if signals.cache_miss.receivers:
        signals.cache_miss.send(sender=mc.model, key=key)
    kwargs = lk.orm_kwargs(values)
    try:
        obj, noted = _read(mc, _miss_queryset(manager, source), source, lambda qs: qs.get(**kwargs))
    except mc.model.DoesNotExist:  # type: ignore[attr-defined]  # as in _does_not_exist()
        value, obj = NEGATIVE, None
    else:
        frozen = None if source is False else _frozen(mc, obj, noted)
        if frozen is None:
            if code == LEASE:
                redis_tier.fill_later([Release(key, lease_token)])
            return UNCACHEABLE, obj
        value = frozen
        if source is not None:
            obj = None  # read from the primary: the caller gets it as read through `db`
    if source is False:
        return value, obj  # NEGATIVE: the answer, but nothing cached

    if code == LEASE:
        # The caller has its row; the fill runs on the filler thread, and Redis refuses it
        # if the model was written since our read.
        redis_tier.fill_later(
            [
                Fill(
                    g,
                    mc,
                    key,
                    lease_token,
                    gen,
                    writes,
                    value,
                    _ttl(mc, value),
                    _row_of(mc, value),
                    row_seen if rid and _row_of(mc, value) == rid else None,
                )
            ],
            _counted(mc),
        )
    if trusted:
        _keep_local(mc, g, l1key, value, token)
    elif conf.OUTAGE_STALE_SECONDS:
        _keep_local(mc, g, l1key, value, token, read_at)
    return value, obj


def _l2_value(mc: ModelCache, key: str, raw: bytes) -> tuple[Any, str, int] | None:
    """decode() counted and signalled as _served_l2() counts (written out for the one entry
    of every L2 hit); None for a bad or expired payload (a miss)."""
    try:
        entry = decode(mc, key, raw)
    except CorruptPayload as exc:
        _corrupt(mc, key, exc)
        return None
    value = entry[0]
    if value is _EXPIRED:
        return None
    if value is NEGATIVE:
        mc.counters.negative_hits += 1
    else:
        mc.counters.l2_hits += 1
        hot.touch(mc.label, value[2])
    if recording.active:
        recording.served_l2(value is NEGATIVE)
    if signals.cache_hit.receivers:
        _signal_hit(mc, "l2", key)
    return entry


def _l2_entry(
    mc: ModelCache, key: str, raw: bytes | ValidEntry, now: float | None = None
) -> tuple[Any, str, int] | None:
    """decode() of a value as READ gave it, or of one valid_entries() split, at time.time()
    `now` (read here if None); None for a bad payload (logged and deleted) or an expired
    one."""
    try:
        if isinstance(raw, tuple):  # a ValidEntry
            when = time.time() if now is None else now
            entry = decode_split(mc, key, raw[0], raw[1], raw[2], when)
        else:
            entry = decode(mc, key, raw)
    except CorruptPayload as exc:
        _corrupt(mc, key, exc)
        return None
    return None if entry[0] is _EXPIRED else entry


def _served_l2(mc: ModelCache, served: list[tuple[str, Any]]) -> None:
    """Count, sample and signal the entries (key, frozen row or NEGATIVE) served from L2."""
    rows = [value[2] for _, value in served if value is not NEGATIVE]
    mc.counters.l2_hits += len(rows)
    mc.counters.negative_hits += len(served) - len(rows)
    hot.touch_many(mc.label, rows)
    if recording.active:
        for _, value in served:
            recording.served_l2(value is NEGATIVE)
    if signals.cache_hit.receivers:
        for key, _ in served:
            _signal_hit(mc, "l2", key)


def _wait_for_fill(
    mc: ModelCache, g: Group, key: str, lease: str, rid: str
) -> tuple[Any, Read | None]:
    """Another process is filling this key: take its value when it lands, or give up after
    LEASE_WAIT and read the database ourselves (its holder may be dead). Polls asking for
    the lease: if the holder let go without filling (its fill was refused), the lease is
    granted to us and we fill instead of waiting out LEASE_WAIT for nothing.
    (value or None, the READ reply granting us the lease or None)."""
    deadline = time.monotonic() + conf.LEASE_WAIT
    pause = 0.001
    while time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
        res = Read.of(redis_tier.scripts([_read_call(g, key, lease, rid)])[0])
        if res.value is not None:
            entry = _l2_value(mc, key, res.value)
            return (entry[0] if entry is not None else None), None
        if res.code == LEASE:
            return None, res
    return None, None


def _counted(mc: ModelCache) -> Any:
    def done(results: list[Any]) -> None:
        for ok in results:
            if ok:
                mc.counters.fills += 1
            elif ok is not None:
                mc.counters.fills_refused += 1

    return done


def _keep_local(
    mc: ModelCache, g: Group, l1key: Hashable, value: Any, token: Any, read_at: float = 0.0
) -> None:
    """Put a frozen row or NEGATIVE read from the database in L1; refused there if the
    group was written since `token` was taken. `read_at`: for a row read while the bus was
    not trusted, when its database read began (served from then on for
    OUTAGE_STALE_SECONDS at most)."""
    local_tier.set(l1key, g.id, _row_of(mc, value), value, _l1_timeout(mc, value), token, read_at)


def _row_of(mc: ModelCache, value: Any) -> str:
    return "" if value is NEGATIVE else mc.row_id_of(value[2])


def _miss_source(manager: Any, db: str) -> Any:
    """Where a miss reads its row: None for `manager` itself; the manager on the primary
    when `db` is a replica that may lag (groups.replica_of); False to read `manager` and
    cache nothing, when the primary's connection is inside the caller's transaction
    (reading there would join it), or when whether `db` lags could not be known."""
    primary = replica_of(db)
    if primary is None:
        return None
    if primary == db or connections[primary].in_atomic_block:
        return False
    return manager.db_manager(primary)


def _miss_queryset(manager: Any, source: Any) -> Any:
    """What a miss reads: the manager's queryset, or, from _miss_source()'s manager on the
    primary, that one's pinned there: a get_queryset() that calls using() itself would
    take it back to the lagging replica."""
    if not source:
        return manager.get_queryset()
    return source.get_queryset().using(source._db)


# What a miss reading through _Noted notes, in this context: the model's codec, and the
# rows from_db() was given, frozen, by id() of the instance built from each (with the
# instance, which keeps that id its own).
_noting: contextvars.ContextVar[tuple[Any, dict[int, tuple[Any, Any]]] | None] = (
    contextvars.ContextVar("tiered_cache_noting", default=None)
)

_T = TypeVar("_T")


class _Noted(ModelIterable):  # type: ignore[type-arg]  # generic in django-stubs only
    """Django's ModelIterable, which also notes, for each instance it yields, the values
    from_db() was given, frozen before from_db() runs (a hook may change a JSON value in
    place). The instances are the ORM's own in every other way (select_related,
    annotations, known related objects, fetch modes): ModelIterable builds them, from
    rows its compiler's results_iter() hands it, which are watched on the way. The
    compiler is the one the query makes; it is reached through the query (an attribute
    of this one read's own clone, removed once the rows are read)."""

    def __iter__(self) -> Iterator[Any]:
        noting = _noting.get()
        if noting is None:
            yield from super().__iter__()
            return
        codec, noted = noting
        query = self.queryset.query
        last: list[Any] = [None]

        def get_compiler(*args: Any, **kwargs: Any) -> Any:
            compiler = type(query).get_compiler(query, *args, **kwargs)
            results_iter = compiler.results_iter

            def watched(*a: Any, **kw: Any) -> Iterator[Any]:
                # What ModelIterable hands from_db(): the row's slice of the model's own
                # fields, by these names. Other names (fields deferred): nothing stored.
                fields = compiler.klass_info["select_fields"]
                start, end = fields[0], fields[-1] + 1
                names = [f[0].target.attname for f in compiler.select[start:end]]
                whole = names == codec.attnames
                for row in results_iter(*a, **kw):
                    last[0] = codec.freeze_or_none(row[start:end]) if whole else None
                    yield row

            compiler.results_iter = watched
            return compiler

        query.get_compiler = get_compiler  # type: ignore[method-assign]  # this read's own
        try:
            for obj in super().__iter__():
                noted[id(obj)] = (obj, last[0])
                yield obj
        finally:
            del query.get_compiler


def _read(
    mc: ModelCache, qs: Any, source: Any, read: Callable[[Any], _T]
) -> tuple[_T, dict[int, tuple[Any, Any]] | None]:
    """read(qs)'s answer, with what _frozen() needs to tell the rows it read as from_db()
    was given them: None when the instances hold them (RowCodec.holds_as_loaded(), most
    models), else what _Noted noted of them (nothing from a queryset with an iterable of
    its own: those rows are not stored). `source` False: nothing is stored anyway."""
    if source is False or mc.codec.holds_as_loaded():
        return read(qs), None
    noted: dict[int, tuple[Any, Any]] = {}
    if qs._iterable_class is not ModelIterable:
        return read(qs), noted
    qs = qs.all()  # a clone: get_queryset() may hand out a queryset it keeps
    qs._iterable_class = _Noted
    token = _noting.set((mc.codec, noted))
    try:
        return read(qs), noted
    finally:
        _noting.reset(token)


def _frozen(mc: ModelCache, obj: models.Model, noted: dict[int, tuple[Any, Any]] | None) -> Any:
    """The frozen row of an instance _read() read, as from_db() was given it; None when it
    is not to be stored (fields deferred, nothing noted)."""
    if noted is None:
        row = mc.codec.values(obj)
        return None if row is None else mc.codec.freeze_or_none(row)
    seen = noted.get(id(obj))
    return seen[1] if seen is not None and seen[0] is obj else None


def settle(
    manager: Any, mc: ModelCache, lk: Lookup
) -> tuple[Any, str, Group, str | None, str | None, Any]:
    """What a read through `manager` by `lk` goes through: (the manager, which is a copy
    for the database when its queryset picks one itself with using(), as db_manager()
    would make; the database read; its invalidation group; why the read skips the tiers,
    or None; the key part of the manager's filter, None if its queryset is not
    cacheable; the fetch mode its queryset gives instances, None for Django's default)."""
    scope, mode, picked = mc.read_scope(manager) if lk.unique else ("", None, None)
    if picked is not None and picked != manager._db:
        # Its rows are that database's, and so are the writes that change them.
        manager = manager.db_manager(picked)
    db = manager.db
    g = manager.cache_group(mc, db)
    if not lk.unique:
        return manager, db, g, "the lookup is not unique", "", None
    if scope is None:
        return manager, db, g, "the manager's queryset is not cacheable", None, None
    return manager, db, g, bypass(db, g.alias, g.id), scope, mode


def fetch_as(mode: Any, objs: Iterable[Any]) -> None:
    """Give instances served from the tiers the fetch mode (Django 6.1+) of the manager's
    queryset, as the ORM does: FETCH_RAISE blocks their lazy loads, and FETCH_PEERS makes
    the instances of one call fetch a field for all of them at once."""
    objs = list(objs)
    peers = [weakref.ref(o) for o in objs] if mode.track_peers else None
    for o in objs:
        o._state.fetch_mode = mode
        if peers is not None:
            o._state.peers = peers


def _alias_part(db: str, scope: str) -> str:
    return f"{db}~{scope}" if scope else db


def _ttl(mc: ModelCache, value: Any) -> float:
    return mc.negative_timeout if value is NEGATIVE else mc.timeout


def _l1_timeout(mc: ModelCache, value: Any) -> float:
    if value is NEGATIVE:
        return min(mc.l1_timeout, mc.negative_timeout)
    return mc.l1_timeout


# -- many rows by pk ---------------------------------------------------------------


def get_many(manager: Any, mc: ModelCache, pks: list[Any]) -> dict[Any, Any]:
    lk = mc.pk_lookup
    prep = lk.preps[0]
    wanted: list[Any] = []
    seen: set[Any] = set()
    for pk in pks:
        if hasattr(pk, "_meta"):
            pk = lk.normalize({"pk": pk}, mc.aliases, mc.named)[0]
        v = prep(pk)
        if v not in seen:
            seen.add(v)
            wanted.append(v)
    manager, db, g, why, scope, mode = settle(manager, mc, lk)
    if why is None and not keyable_values(wanted):
        why = "a value of a type the tiers do not key (an expression)"
    if why is not None:
        mc.counters.bypassed += len(wanted)
        if recording.active:
            recording.served(recording.BYPASSED, why, len(wanted))
        rows: dict[Any, Any] = manager.get_queryset().in_bulk(wanted)
        return rows
    assert scope is not None  # as in get()
    found = _get_many_scoped(manager, mc, g, wanted, db, scope)
    if mode is not None:
        fetch_as(mode, found.values())
    return found


# A tuple, not `bytes | tuple`: that expression would build a union per row.
_ENTRY_TYPES = (bytes, tuple)


def _get_many_scoped(
    manager: Any, mc: ModelCache, g: Group, wanted: list[Any], db: str, scope: str
) -> dict[Any, Any]:
    """get_many() once it is settled that the tiers serve these reads."""
    lk = mc.pk_lookup
    prefix = lk.key_prefix
    found: dict[Any, Any] = {}
    if not bus.trusted():
        bus.ensure_started()
    trusted = bus.trusted()
    stale = conf.OUTAGE_STALE_SECONDS if not trusted else 0
    todo = wanted
    read_at = now = time.monotonic()
    if trusted or stale:
        l1keys = [(prefix, db, scope, l1_value(pk)) for pk in wanted]
        if trusted:
            got = local_tier.get_many(l1keys, now)
        else:
            vouched = bus.vouched_at
            got = [local_tier.get_stale(k, now, vouched, stale) for k in l1keys]
            mc.counters.stale_hits += len(got) - got.count(None)
        todo = []
        thaw = mc.codec.thaw
        # Keyed as in_bulk() keys rows, by their pk as read, not by the value asked for
        # (under a case-insensitive collation "BOB" reads the row "bob").
        as_frozen = mc.codec.pk_as_frozen()
        negatives = 0
        for pk, v in zip(wanted, got, strict=True):
            if v is None:
                todo.append(pk)
            elif v is NEGATIVE:
                negatives += 1
            elif as_frozen:
                found[v[2]] = thaw(v, db)
            else:
                obj = thaw(v, db)
                found[obj.pk] = obj
        mc.counters.negative_hits += negatives
        mc.counters.l1_hits += len(wanted) - len(todo) - negatives
        if recording.active:
            recording.served_l1(len(wanted) - len(todo) - negatives, negatives, bool(stale))
    if not todo:
        return found

    token = local_tier.token(g.id)
    keys, rids = mc.pk_keys(g, _alias_part(db, scope), todo)
    source = _miss_source(manager, db)
    leases = [""] * len(todo)
    results: list[Any] = []
    # Per key, the generation and write counter of its shard, which its fill must find.
    heads: list[tuple[Any, Any, Any]] = [(None, None, None)] * len(keys)
    if trusted:
        try:
            results, heads, leases = _read_many(g, keys, rids, source is not False)
            if time.monotonic() >= bus.trusted_until:  # as in _load
                results = []
        except Unavailable as exc:
            results = []
            if recording.active:
                recording.why(f"Redis unavailable ({exc})")
    missing: list[tuple[int, Any, str, str]] = []
    # What L1 takes, stored under one hold of its lock: (key, row id, value, timeout,
    # weight or None).
    keep: list[tuple[Any, str, Any, float, int | None]] = []
    served: list[tuple[str, Any]] = []
    wall = time.time()
    row_l1, negative_l1 = mc.l1_timeout, _l1_timeout(mc, NEGATIVE)
    for i, pk in enumerate(todo):
        r = results[i] if results else NO_LEASE
        # An entry (bytes from READ_MANY, a ValidEntry from the MGET), else LEASE, BUSY or
        # NO_LEASE; anything else is a miss too.
        entry = _l2_entry(mc, keys[i], r, wall) if isinstance(r, _ENTRY_TYPES) else None
        if entry is None:
            missing.append((i, pk, keys[i], leases[i] if r == LEASE else ""))
            continue
        value, rid, weight = entry
        served.append((keys[i], value))
        timeout = negative_l1 if value is NEGATIVE else row_l1
        keep.append(((prefix, db, scope, l1_value(pk)), rid, value, timeout, weight))
    # Counted and signalled before any instance is built, as get_cached does.
    _served_l2(mc, served)
    thaw = mc.codec.thaw
    as_frozen = mc.codec.pk_as_frozen()
    for _, _, value, _, _ in keep:
        if value is not NEGATIVE:
            obj = thaw(value, db)
            found[value[2] if as_frozen else obj.pk] = obj
    if not missing:
        local_tier.set_many(g.id, token, keep)
        return found

    mc.counters.misses += len(missing)
    if recording.active:
        recording.missed(trusted, False, source, len(missing))
    objs, noted = _read(
        mc,
        _miss_queryset(manager, source),
        source,
        lambda qs: qs.in_bulk([pk for _, pk, _, _ in missing]),
    )
    # in_bulk()'s rows under its keys; each one's frozen row, None if not to be stored.
    frozen: dict[int, Any] = {}
    for as_read, obj in objs.items():
        value = None if source is False else _frozen(mc, obj, noted)
        frozen[id(obj)] = value
        # From the primary: as read through `db`.
        found[as_read] = obj if source is None or value is None else mc.codec.thaw(value, db)
    exact: bool | None = None
    fills = []
    for i, pk, key, lease in missing:
        obj = objs.get(pk)
        if obj is None:
            if source is False:
                continue
            if exact is None:
                exact = equal_as_in_python(mc.model._meta.pk, connections[db].vendor)
            if not exact:
                # It may be another spelling of a row read under its own (a collation
                # that ignores case): no row of its own is known, and no absence.
                if lease:
                    redis_tier.fill_later([Release(key, lease)])
                continue
            value = NEGATIVE
        else:
            value = frozen[id(obj)]
            if value is None:
                if lease:
                    redis_tier.fill_later([Release(key, lease)])
                continue
        if lease:
            gen, writes, row_seen = heads[i]
            rid = _row_of(mc, value)
            fills.append(
                Fill(
                    g,
                    mc,
                    key,
                    lease,
                    gen,
                    writes,
                    value,
                    _ttl(mc, value),
                    rid,
                    row_seen if rid == rids[i] else None,
                )
            )
        if trusted or stale:
            keep.append(
                (
                    (prefix, db, scope, l1_value(pk)),
                    _row_of(mc, value),
                    value,
                    _l1_timeout(mc, value),
                    None,
                )
            )
    # Rows from L2 and from the database alike; those from the database while the bus was
    # down are served for OUTAGE_STALE_SECONDS from read_at at most.
    local_tier.set_many(g.id, token, keep, 0.0 if trusted else read_at)
    if fills:
        redis_tier.fill_later(fills, _counted(mc))
    return found


def _by_shard(g: Group, keys: list[str]) -> dict[str, list[int]]:
    if len(g.shards) == 1:
        return {g.shards[0].tag: list(range(len(keys)))}
    by_shard: dict[str, list[int]] = {}
    for i, key in enumerate(keys):
        by_shard.setdefault(g.shard_of(key).tag, []).append(i)
    return by_shard


def _pick(items: list[str], idx: list[int]) -> list[str]:
    """The items at the (increasing) positions idx: all of them, in order, with one shard."""
    return items if len(idx) == len(items) else [items[i] for i in idx]


def _read_many(
    g: Group, keys: list[str], rids: list[str], lease: bool
) -> tuple[list[Any], list[tuple[Any, Any, Any]], list[str]]:
    """Per key its L2 reply (a value, or LEASE / BUSY), the generation and write counter of
    its shard and the row's version (see read_call), which its fill must find unchanged,
    and its lease token ("" unless `lease`).

    First one MGET per shard of everything that decides whether the entries are valid
    (keys.peek_many_call), checked here; READ_MANY then runs, one script per shard, for
    the keys without a valid entry only. A warm get_many_cached so makes one round trip of
    plain reads, where READ_MANY's checks of a hundred entries in Lua cost twice the round
    trip itself."""
    shards = [(g.shard_of(keys[idx[0]]), idx) for idx in _by_shard(g, keys).values()]
    results: list[Any] = [None] * len(keys)
    heads: list[tuple[Any, Any, Any]] = [(None, None, None)] * len(keys)
    leases = [""] * len(keys)
    peeks = [peek_many_call(s, _pick(keys, idx), _pick(rids, idx)) for s, idx in shards]
    rest: list[tuple[Shard, list[int]]] = []
    for (s, idx), reply in zip(shards, redis_tier.scripts(peeks), strict=True):
        invalid = []
        for i, value in zip(idx, valid_entries(reply, _pick(rids, idx)), strict=True):
            if value is None:
                invalid.append(i)
            else:
                results[i] = value
        if invalid:
            rest.append((s, invalid))
    if not rest:
        return results, heads, leases

    lease_ms, fresh = int(conf.LEASE_TIMEOUT * 1000), fresh_token()
    for _, idx in rest:
        for i in idx:
            leases[i] = fresh_token() if lease else ""
    calls = [
        read_many_call(
            s,
            [keys[i] for i in idx],
            [leases[i] for i in idx],
            lease_ms,
            fresh,
            [rids[i] for i in idx],
        )
        for s, idx in rest
    ]
    for (_, idx), reply in zip(rest, redis_tier.scripts(calls), strict=True):
        many = ReadMany.of(reply)
        for i, entry in zip(idx, many.entries, strict=True):
            if isinstance(entry, list):  # a miss: [LEASE or BUSY, the row's version]
                results[i] = int(entry[0])
                heads[i] = (many.gen, many.writes, entry[1] if len(entry) > 1 else None)
            else:
                results[i] = entry
                heads[i] = (many.gen, many.writes, None)
    return results, heads, leases


# -- warmup -------------------------------------------------------------------------


_WARM_FILLS = 250


def warm(manager: Any, mc: ModelCache, queryset: Any, batch_size: int = 500) -> dict[str, int]:
    """Store rows in L2 under their pk key, in pipelined batches. The generation and write
    counter are read before the rows, so a write committed meanwhile refuses the fills."""
    stored = refused = 0
    lk = mc.pk_lookup
    manager, db, g, why, scope, _ = settle(manager, mc, lk)
    if why is not None:  # e.g. inside a transaction that wrote the model: nothing to store
        return {"stored": 0, "refused": 0}
    assert scope is not None  # as in get()
    # Rows come from the primary when `db` may lag (as misses do, see _miss_source), and
    # none when that could not be known.
    primary = replica_of(db)
    if primary == db:
        return {"stored": 0, "refused": 0}
    last_pk = None
    while True:
        # An empty read per shard makes sure its generation exists and tells its counters.
        lease_ms, fresh = int(conf.LEASE_TIMEOUT * 1000), fresh_token()
        replies = redis_tier.scripts([read_many_call(s, [], [], lease_ms, fresh) for s in g.shards])
        heads = {s.tag: ReadMany.of(r) for s, r in zip(g.shards, replies, strict=True)}
        page = (
            queryset.order_by("pk") if primary is None else queryset.using(primary).order_by("pk")
        )
        if last_pk is not None:
            page = page.filter(pk__gt=last_pk)
        rows, noted = _read(mc, page[:batch_size], None, list)
        if not rows:
            break
        fills = []
        for obj in rows:
            value = _frozen(mc, obj, noted)
            if value is not None:
                key = lk.key(g, mc.schema, _alias_part(db, scope), (value[2],))
                head = heads[g.shard_of(key).tag]
                fills.append(
                    Fill(
                        g,
                        mc,
                        key,
                        "",
                        head.gen,
                        head.writes,
                        value,
                        mc.timeout,
                        _row_of(mc, value),
                    )
                )
        # A few hundred fills per round trip: a page of thousands in one would hold each
        # server (and our socket timeout) for as long as all of them take.
        for i in range(0, len(fills), _WARM_FILLS):
            oks = redis_tier.run_fills(fills[i : i + _WARM_FILLS])
            stored += sum(1 for ok in oks if ok)
            refused += sum(1 for ok in oks if not ok)
        last_pk = rows[-1].pk
        if len(rows) < batch_size:
            break
    mc.counters.fills += stored
    return {"stored": stored, "refused": refused}
