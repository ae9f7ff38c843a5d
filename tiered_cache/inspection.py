"""What the cache holds for one lookup of one model, and whether a read would be served
from it: this process's L1, L2 in Redis and the database row, side by side.

Read-only: L1 is peeked at (no LRU move, no removal), Redis is read with plain GET, PTTL
and MEMORY USAGE (never a script: no lease, no fill, no delete), and the database through
the manager's own queryset. Validity is decided as a read decides it (lua/read.lua and
row_header.lua, then reads.decode): the entry's generation against the shard's, a row's
version against its row-version key, a "no such row" against the write counter, the MAC
and the expiry it covers. `manage.py tiered_cache inspect` and the dashboard's form show
what inspect_entry() returns.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import time
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError, models

from .bus import bus
from .exceptions import UndeclaredLookup
from .keys import NO_ROW, ROW, Group, RowHeader, Shard, lease_key, split_header
from .reads import decode, settle
from .registry import ModelCache, cached_managers, model_cache, resolve_models
from .serialization import CorruptPayload, loads_verified, open_signed
from .tiers.local import NEGATIVE, Peeked, local_tier
from .tiers.remote import Unavailable, redis_tier

__all__ = [
    "REASONS",
    "CannotInspect",
    "DatabaseRow",
    "Inspection",
    "TierState",
    "inspect_entry",
    "parse_lookup",
    "reason_text",
]

# Why an entry is not served: a code (stable, in --json), a short name and what it means.
REASONS: dict[str, tuple[str, str]] = {
    "not_cached": ("not cached", "nothing is stored under this key"),
    "expired": ("expired", "the entry is past its expiry"),
    "generation_changed": (
        "generation changed",
        "the model was flushed since the entry was stored",
    ),
    "generation_missing": (
        "generation missing",
        "the model's generation is gone from Redis (a restart, an eviction, FLUSHALL): the "
        "next read starts a new one, and no older entry is served",
    ),
    "row_version_changed": (
        "row version changed",
        "the row was written or invalidated since the entry was stored",
    ),
    "row_version_missing": (
        "row version missing",
        "the row's version is gone from Redis (expired or lost)",
    ),
    "negative_invalidated": (
        "negative entry invalidated by a write",
        'the model was written since this "no such row" was stored',
    ),
    "corrupt": (
        "corrupt",
        "the stored value fails its MAC or does not decode (a read deletes it)",
    ),
    "bus_not_trusted": (
        "bus not trusted",
        "until a heartbeat on the invalidation bus is answered, this process reads the database",
    ),
    "redis_unavailable": ("Redis unavailable", "Redis could not be read"),
    "not_unique": ("lookup not unique", "get_cached() reads the database for it"),
    "queryset_not_cacheable": (
        "queryset not cacheable",
        "the manager's queryset is not cacheable: get_cached() reads the database",
    ),
}


def reason_text(code: str, detail: str = "") -> str:
    """A reason's short name, with what it means and the detail in parentheses."""
    short, long = REASONS.get(code, (code, ""))
    inside = "; ".join(p for p in (long, detail) if p)
    return f"{short} ({inside})" if inside else short


_TOKEN = re.compile(rb"[\w:-]+")
_SHOWN = 80  # characters of a value shown in a line


class CannotInspect(ValueError):
    """The lookup cannot be inspected: malformed, undeclared, refused by its field, or a
    manager or database that does not exist. The message names the problem."""


@dataclasses.dataclass
class TierState:
    """What one tier holds under the key. `valid`: the entry itself would be served (the
    bus aside); `reason`: a code of REASONS when not. `facts`: (label, text) lines."""

    tier: str
    held: bool = False
    kind: str | None = None  # "row" or "no such row"
    pk: Any = None
    age: float | None = None  # seconds since it was stored
    ttl: float | None = None  # seconds left
    valid: bool = False
    reason: str | None = None
    detail: str = ""
    values: dict[str, Any] | None = None  # a row's fields, when they could be read
    matches_database: bool | None = None
    differs: list[str] = dataclasses.field(default_factory=list)
    facts: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)  # tier-specific

    def state_text(self) -> str:
        return "valid" if self.valid else reason_text(self.reason or "", self.detail)


@dataclasses.dataclass
class DatabaseRow:
    """The row the manager's queryset `.get(**lookup)` returns, or why none."""

    exists: bool = False
    pk: Any = None
    values: dict[str, Any] | None = None
    error: str | None = None
    query: str = ""


@dataclasses.dataclass
class Inspection:
    model: str
    manager: str
    database: str
    lookup: dict[str, Any]  # normalized as get_cached() normalizes it
    l1_key: tuple[Any, ...]
    l2_key: str | None
    bus: str  # this process's bus (Bus.state())
    bus_note: str  # why the verdict is not this process's own, when it does not listen
    bus_trusted: bool
    bus_listening: bool
    l1: TierState
    l2: TierState
    db: DatabaseRow
    served: bool
    served_from: str | None  # "L1", "L2" or None
    reason: str | None
    verdict: str

    def bus_text(self) -> str:
        return f"{self.bus} ({self.bus_note})" if self.bus_note else self.bus

    def lookup_text(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.lookup.items())

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able form (values the encoder cannot take are given as their repr)."""

        def tier(t: TierState) -> dict[str, Any]:
            return {
                "held": t.held,
                "kind": t.kind,
                "pk": _jsonable(t.pk),
                "age": _round(t.age),
                "ttl": _round(t.ttl),
                "valid": t.valid,
                "reason": t.reason,
                "reason_text": None if t.valid else t.state_text(),
                **{k: _jsonable(v) for k, v in t.data.items()},
                "matches_database": t.matches_database,
                "differs": t.differs,
                "values": None if t.values is None else _jsonable(t.values),
            }

        return {
            "model": self.model,
            "manager": self.manager,
            "database": self.database,
            "lookup": _jsonable(self.lookup),
            "l1_key": repr(self.l1_key),
            "l2_key": self.l2_key,
            "served": self.served,
            "served_from": self.served_from,
            "reason": self.reason,
            "verdict": self.verdict,
            "bus": self.bus,
            "bus_note": self.bus_note or None,
            "bus_trusted": self.bus_trusted,
            "bus_listening": self.bus_listening,
            "l1": tier(self.l1),
            "l2": tier(self.l2),
            "database_row": {
                "exists": self.db.exists,
                "pk": _jsonable(self.db.pk),
                "query": self.db.query,
                "error": self.db.error,
                "values": None if self.db.values is None else _jsonable(self.db.values),
            },
        }

    def differences(self) -> list[tuple[str, str, str]]:
        """(field, value served, database value) for the entry a read would serve, or
        else the first tier holding a row: the fields where the cache and the database
        disagree."""
        tier = {"L1": self.l1, "L2": self.l2}.get(self.served_from or "")
        if tier is None:
            tier = next((t for t in (self.l1, self.l2) if t.values is not None), None)
        if tier is None or tier.values is None or self.db.values is None:
            return []
        return [
            (f, _short(tier.values.get(f)), _short(self.db.values.get(f))) for f in tier.differs
        ]


# -- the lookup ----------------------------------------------------------------------


def parse_lookup(parts: Iterable[str] | str) -> dict[str, str]:
    """`field=value` words (a string is split as a shell would: quote values with
    spaces) as a dict; CannotInspect names a word that is not one, or a field given
    twice."""
    try:
        words = shlex.split(parts) if isinstance(parts, str) else list(parts)
    except ValueError as exc:  # an unclosed quote
        raise CannotInspect(f"malformed lookup {parts!r}: {exc}") from None
    out: dict[str, str] = {}
    for word in words:
        name, eq, value = word.partition("=")
        name = name.strip()
        if not eq or not name:
            raise CannotInspect(
                f"malformed lookup {word!r}: write field=value, e.g. pk=1 or email=a@b.c "
                "(a composite lookup as several: tenant_id=t1 session_id=s1)"
            )
        if name in out:
            raise CannotInspect(f"the lookup names {name!r} twice")
        out[name] = value
    if not out:
        raise CannotInspect("no lookup given: write field=value, e.g. pk=1")
    return out


def _manager(model: type[models.Model], name: str | None, using: str | None) -> Any:
    managers = cached_managers(model)
    if name is None:
        manager = managers[0]
    else:
        found = [m for m in managers if m.name == name]
        if not found:
            raise CannotInspect(
                f"{model._meta.label} has no cached manager {name!r}; its cached managers: "
                + ", ".join(m.name for m in managers)
            )
        manager = found[0]
    if using is not None:
        if using not in settings.DATABASES:
            raise CannotInspect(
                f"no database {using!r}; databases: " + ", ".join(settings.DATABASES)
            )
        manager = manager.db_manager(using)
    return manager


def _resolve(mc: ModelCache, lookup: Mapping[str, Any]) -> tuple[Any, tuple[Any, ...]]:
    try:
        return mc.resolve(dict(lookup))
    except UndeclaredLookup as exc:
        raise CannotInspect(str(exc)) from None
    except ValidationError as exc:
        problem = "; ".join(exc.messages)
    except (ValueError, TypeError) as exc:
        problem = str(exc)
    given = " ".join(f"{k}={v}" for k, v in lookup.items())
    raise CannotInspect(f"{mc.label}: malformed value in {given}: {problem}") from None


def _binary_from_hex(mc: ModelCache, lookup: Mapping[str, Any]) -> dict[str, Any]:
    """Words typed for a binary field, as hex (the database would refuse the text)."""
    out = dict(lookup)
    for name, value in lookup.items():
        f = mc.named.get(name)
        if isinstance(f, models.BinaryField) and isinstance(value, str):
            try:
                out[name] = bytes.fromhex(value)
            except ValueError:
                raise CannotInspect(
                    f"{mc.label}: {name} is binary: give its value as hex, e.g. {name}=00ff"
                ) from None
    return out


# -- the inspection ------------------------------------------------------------------


def inspect_entry(
    model: type[models.Model] | str,
    lookup: Mapping[str, Any] | Iterable[str] | str,
    manager: str | None = None,
    using: str | None = None,
) -> Inspection:
    """What each tier holds for `lookup` (a mapping, or `field=value` words) of a cached
    model (or its "app_label.ModelName"), read through its first cached manager (or the
    one named) on its database (or `using`). Raises UnknownModel or CannotInspect; never
    Unavailable (Redis being away is part of the answer)."""
    if isinstance(model, str):
        (model,) = resolve_models([model])
    mgr = _manager(model, manager, using)
    mc = model_cache(mgr)
    # Typed words are text; a mapping holds the caller's own values, bytes included.
    given = lookup if isinstance(lookup, Mapping) else _binary_from_hex(mc, parse_lookup(lookup))
    lk, values = _resolve(mc, given)
    mgr, db, g, _, scope, _ = settle(mgr, mc, lk)
    # As reads.get() builds them: L1 by lookup, database, manager filter and values; L2
    # with the database and the filter in the key (reads._alias_part).
    l1key = lk.l1_key(db, scope, values)
    alias_part = f"{db}~{scope}" if scope else db
    l2key = lk.key(g, mc.schema, alias_part, values) if scope is not None else None

    if bus.listening():
        # What a read does after a pause: ask for a heartbeat and wait a round trip for
        # it (a PING on the subscription; no tier is touched).
        bus.ensure_started()
    trusted = time.monotonic() < bus.trusted_until

    row = _database_row(mgr, mc, lk.orm_kwargs(values))
    l1 = _l1_state(mc, l1key, db)
    l2 = (
        _l2_state(mc, g, l2key, db)
        if l2key is not None
        else TierState("L2", reason="queryset_not_cacheable")
    )
    for t in (l1, l2):
        _compare(t, row)

    served_from: str | None = None
    reason: str | None = None
    if not lk.unique:
        reason = "not_unique"
    elif scope is None:
        reason = "queryset_not_cacheable"
    elif bus.listening() and not trusted:
        reason = "bus_not_trusted"
    elif l1.valid and trusted:
        served_from = "L1"
    elif l2.valid:
        served_from = "L2"
    else:
        reason = next(
            (t.reason for t in (l2, l1) if t.held and t.reason),
            l2.reason if l2.reason == "redis_unavailable" else "not_cached",
        )
    if served_from is not None:
        verdict = f"yes, from {served_from} ({'this process' if served_from == 'L1' else 'Redis'})"
    else:
        code = reason or "not_cached"
        detail = ""
        if code == "bus_not_trusted":
            detail = f"the bus is {bus.state()}"
        elif code not in ("not_unique", "queryset_not_cacheable"):
            detail = next((t.detail for t in (l2, l1) if t.reason == code and t.detail), "")
        verdict = "no — " + reason_text(code, detail)
    return Inspection(
        model=model._meta.label,
        manager=mgr.name,
        database=db,
        lookup=dict(zip(lk.names, values, strict=True)),
        l1_key=l1key,
        l2_key=l2key,
        bus=bus.state(),
        bus_note=""
        if bus.listening()
        else "not listening, as in a management command: this process serves nothing from "
        "the tiers itself; the verdict is what a process whose bus is live would do",
        bus_trusted=trusted,
        bus_listening=bus.listening(),
        l1=l1,
        l2=l2,
        db=row,
        served=served_from is not None,
        served_from=served_from,
        reason=reason,
        verdict=verdict,
    )


def _fields(mc: ModelCache, obj: models.Model) -> dict[str, Any]:
    row = mc.codec.values(obj)
    if row is None:  # deferred fields (a manager that defers some): load them
        return {a: getattr(obj, a) for a in mc.codec.attnames}
    return dict(zip(mc.codec.attnames, row, strict=True))


def _database_row(manager: Any, mc: ModelCache, kwargs: dict[str, Any]) -> DatabaseRow:
    shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    row = DatabaseRow(query=f"{manager.name}.get({shown}) on {manager.db}")
    try:
        obj = manager.get_queryset().get(**kwargs)
    except mc.model.DoesNotExist:  # type: ignore[attr-defined]  # see reads._does_not_exist
        return row
    except mc.model.MultipleObjectsReturned as exc:  # type: ignore[attr-defined]
        row.error = str(exc)
        return row
    except DatabaseError as exc:
        row.error = f"the database could not be read: {exc}"
        return row
    row.exists, row.pk, row.values = True, obj.pk, _fields(mc, obj)
    return row


def _compare(t: TierState, row: DatabaseRow) -> None:
    if not t.held or t.kind is None or row.error is not None:
        return
    if t.kind == "no such row":
        t.matches_database = not row.exists
        if row.exists:
            t.facts.append(("database", f"has the row now (pk {row.pk!r})"))
        else:
            t.facts.append(("database", "has no such row either"))
        return
    if t.values is None:
        return
    if not row.exists or row.values is None:
        t.matches_database = False
        t.facts.append(("database", "has no such row"))
        return
    t.differs = [f for f, v in t.values.items() if row.values.get(f) != v]
    t.matches_database = not t.differs
    t.facts.append(
        ("database", "differs: " + ", ".join(t.differs) if t.differs else "same as this entry")
    )


# -- L1 ----------------------------------------------------------------------------------


def _l1_state(mc: ModelCache, key: tuple[Any, ...], db: str) -> TierState:
    t = TierState("L1")
    p: Peeked | None = local_tier.peek(key)
    now = time.monotonic()
    if p is None:
        t.reason = "not_cached"
        t.facts.append(("holds", "nothing"))
        return t
    negative = p.value is NEGATIVE
    timeout = min(mc.l1_timeout, mc.negative_timeout) if negative else mc.l1_timeout
    t.held = True
    t.kind = "no such row" if negative else "row"
    t.ttl = p.expires_at - now
    t.age = max(0.0, timeout - t.ttl)
    t.data = {
        "weight": p.weight,
        "flush_epoch": p.epoch,
        "current_flush_epoch": p.current_epoch,
    }
    if negative:
        t.data.update(writes=p.writes, current_writes=p.current_writes)
    else:
        t.pk = p.value[2]
        t.values = _fields(mc, mc.codec.thaw(p.value, db))
    holds = "no such row" if negative else f"a row (pk {t.pk!r})"
    t.facts.append(("holds", f"{holds}, {p.weight:,} bytes by L1's weight"))
    t.facts.append(("age", f"stored {t.age:.1f} s ago"))
    t.facts.append(
        ("TTL", f"expires in {t.ttl:.1f} s" if t.ttl >= 0 else f"expired {-t.ttl:.1f} s ago")
    )
    versions = f"flush epoch {p.epoch} (now {p.current_epoch})"
    if negative:
        versions += f", write count {p.writes} (now {p.current_writes})"
    t.facts.append(("versions", versions))
    if p.read_at:
        t.facts.append(("outage", "filled while the bus was down (OUTAGE_STALE_SECONDS)"))
    # LocalTier._lookup's order.
    if p.expires_at < now:
        t.reason = "expired"
    elif p.epoch != p.current_epoch:
        t.reason, t.detail = "generation_changed", "this process saw the flush on the bus"
    elif negative and p.writes != p.current_writes:
        t.reason, t.detail = "negative_invalidated", "this process saw the write on the bus"
    else:
        t.valid = True
    return t


# -- L2 ----------------------------------------------------------------------------------


def _read_entry(shard: Shard, key: str) -> list[Any]:
    pipe = redis_tier.client.pipeline(transaction=False)
    pipe.get(shard.gen_key)
    pipe.get(shard.writes_key)
    pipe.get(key)
    pipe.pttl(key)
    pipe.pttl(lease_key(key))
    pipe.memory_usage(key)
    return pipe.execute(raise_on_error=False)


def _read_row_version(row_key: str) -> list[Any]:
    pipe = redis_tier.client.pipeline(transaction=False)
    pipe.get(row_key)
    pipe.pttl(row_key)
    return pipe.execute(raise_on_error=False)


def _token(v: Any) -> str | None:
    """A generation, write count or row version as text; None when missing or junk (a
    read makes a fresh one then: common.lua's generation())."""
    if isinstance(v, bytes) and _TOKEN.fullmatch(v):
        return v.decode()
    return None


def _l2_state(mc: ModelCache, g: Group, key: str, db: str) -> TierState:
    t = TierState("L2")
    shard = g.shard_of(key)
    try:
        gen_raw, writes_raw, raw, pttl, lease_pttl, size = redis_tier.call(
            partial(_read_entry, shard, key)
        )
    except Unavailable as exc:
        t.reason, t.detail = "redis_unavailable", str(exc) or "unavailable"
        t.facts.append(("holds", f"unknown: Redis could not be read ({t.detail})"))
        return t
    gen, writes = _token(gen_raw), _token(writes_raw)
    t.data = {"generation": gen, "writes": writes}
    if isinstance(lease_pttl, int) and lease_pttl > 0:
        t.facts.append(("lease", f"a fill is under way (lease held, {lease_pttl} ms left)"))
        t.data["lease_ms"] = lease_pttl
    if raw is None or (isinstance(pttl, int) and pttl == -2):
        t.reason = "not_cached"
        t.facts.append(("holds", "nothing"))
        return t
    t.held = True
    if not isinstance(raw, bytes):  # WRONGTYPE: someone's junk under our key
        t.reason, t.detail = "corrupt", "a key of another type"
        t.facts.append(("holds", "a key of another type (junk)"))
        return t
    if isinstance(size, int):
        t.data["memory_bytes"] = size
    split = split_header(raw, len(RowHeader._fields))
    if split is None:
        t.reason, t.detail = "corrupt", "malformed header"
        t.facts.append(("holds", f"{len(raw):,} bytes without a header"))
        return t
    header = RowHeader(*split[0])
    kind = header.kind
    t.kind = {ROW: "row", NO_ROW: "no such row"}.get(kind)
    rid = header.rid.decode("utf-8", "replace")
    t.data.update(
        header_kind=kind.decode("utf-8", "replace"),
        header_generation=header.gen.decode("utf-8", "replace"),
        header_row_id=rid,
        header_version=header.version.decode("utf-8", "replace"),
        header_expires=header.expires.decode("utf-8", "replace"),
        redis_pttl_ms=pttl if isinstance(pttl, int) else None,
    )

    # The MAC, and what it covers: nothing of the body is decoded before it holds.
    mac = "valid"
    payload: Any = None
    try:
        _, body = open_signed(key, raw, RowHeader)
    except CorruptPayload as exc:
        mac = str(exc)
    else:
        try:
            payload = mc.codec.decode(body) if kind == ROW else loads_verified(body)
        except CorruptPayload as exc:
            mac = f"valid, but {exc}"
    t.data["mac"] = mac
    if kind == ROW and mc.codec.is_frozen(payload):
        t.pk = payload[2]
        t.values = _fields(mc, mc.codec.thaw(payload, db))

    # Age and TTL: the Redis TTL from the fill's timeout; the expiry the MAC covers.
    full = mc.negative_timeout if kind == NO_ROW else mc.timeout
    now = time.time()
    expires: int | None
    try:
        expires = int(header.expires)
    except ValueError:
        expires = None
    if isinstance(pttl, int) and pttl >= 0:
        t.ttl = pttl / 1000
        t.age = max(0.0, full - t.ttl)
    elif expires is not None:
        t.ttl = expires - now
        t.age = max(0.0, full + 1 - t.ttl)
    what = {"row": f"a row (pk {t.pk!r}, row id {rid})", "no such row": "no such row"}
    holds = what.get(t.kind or "", f"an entry of unknown kind {t.data['header_kind']!r}")
    if isinstance(size, int):
        holds += f", {size:,} bytes in Redis"
    t.facts.append(("holds", holds))
    if t.age is not None:
        t.facts.append(("age", f"stored {t.age:.1f} s ago"))
    ttl = (
        f"{pttl / 1000:.1f} s (Redis PTTL)"
        if isinstance(pttl, int) and pttl >= 0
        else "no Redis expiry"
    )
    if expires is not None:
        at = datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        left = expires - now
        when = f"in {left:.0f} s" if left >= 0 else f"{-left:.0f} s ago"
        ttl += f"; MAC-covered expiry {when} ({at})"
        t.data["expires_in"] = round(left, 3)
    t.facts.append(("TTL", ttl))
    t.facts.append(
        (
            "generation",
            f"entry {t.data['header_generation']!r}, current "
            + (repr(gen) if gen else "missing")
            + (" (same)" if gen and gen == t.data["header_generation"] else ""),
        )
    )

    # Validity, in read.lua's order, then reads.decode()'s.
    row_version: str | None = None
    if kind == ROW:
        try:
            rv_raw, rv_pttl = redis_tier.call(partial(_read_row_version, shard.row_key(rid)))
        except Unavailable as exc:
            t.reason, t.detail = "redis_unavailable", str(exc) or "unavailable"
            return t
        row_version = _token(rv_raw)
        t.data.update(row_version=row_version, row_version_pttl_ms=rv_pttl)
        rv_left = (
            f", its key expires in {rv_pttl / 1000:.0f} s"
            if isinstance(rv_pttl, int) and rv_pttl >= 0
            else ""
        )
        t.facts.append(
            (
                "row version",
                f"entry {t.data['header_version']!r}, current "
                + (repr(row_version) if row_version else "missing")
                + (" (same)" if row_version == t.data["header_version"] else "")
                + (rv_left if row_version else ""),
            )
        )
    elif kind == NO_ROW:
        t.facts.append(
            (
                "write count",
                f"entry {t.data['header_version']!r}, current "
                + (repr(writes) if writes else "missing")
                + (" (same)" if writes == t.data["header_version"] else ""),
            )
        )
    t.facts.append(("MAC", mac))

    if gen is None:
        t.reason = "generation_missing"
    elif t.data["header_generation"] != gen:
        t.reason = "generation_changed"
    elif kind == NO_ROW and t.data["header_version"] != writes:
        t.reason = "negative_invalidated"
    elif kind == ROW and row_version is None:
        t.reason = "row_version_missing"
    elif kind == ROW and row_version != t.data["header_version"]:
        t.reason = "row_version_changed"
    elif kind not in (ROW, NO_ROW):
        t.reason, t.detail = "corrupt", "unknown kind"
    else:
        try:
            value = decode(mc, key, raw)[0]
        except CorruptPayload as exc:
            t.reason, t.detail = "corrupt", str(exc)
        else:
            if value is not NEGATIVE and not mc.codec.is_frozen(value):
                # decode()'s answer for a value past the expiry its MAC covers.
                t.reason, t.detail = "expired", "its MAC-covered expiry passed"
            else:
                t.valid = True
    return t


# -- values shown ----------------------------------------------------------------------


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _jsonable(value: Any) -> Any:
    try:
        result: Any = json.loads(json.dumps(value, cls=DjangoJSONEncoder))
    except (TypeError, ValueError):
        if isinstance(value, dict):
            return {str(k): _jsonable(v) for k, v in value.items()}
        return repr(value)
    return result


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"
