"""Every Redis key name tiered_cache uses, and the wire format of what it stores and sends.

The one owner of the key space: lookup values made injective (encode_values), the keys of
an invalidation group, of derived functions, statistics, operations and locks; the header
of a stored value; the bus messages; and the Lua scripts with the layout of their KEYS,
ARGV and replies. Nothing else builds a key name or parses a header.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import functools
import hashlib
import itertools
import json
import os
import threading
import uuid
import zlib
from collections.abc import Iterable, Sequence
from importlib import resources
from typing import Any, NamedTuple

from django.conf import settings
from django.core.cache import caches
from django.db import models
from django.utils.safestring import SafeData
from redis.crc import key_slot

from .cluster import is_cluster_client
from .conf import conf

__all__ = [
    "FORMAT_VERSION",
    "TREND_FIELDS",
    "Command",
    "DerivedDrop",
    "DerivedHeader",
    "DerivedRead",
    "Group",
    "Read",
    "ReadMany",
    "RowHeader",
    "RowsMessage",
    "Script",
    "ScriptCall",
    "Shard",
    "Undelivered",
    "ValidEntry",
    "base_prefix",
    "channel",
    "derived_header",
    "KEY_TYPES",
    "encode_value",
    "INTEGER_FIELDS",
    "encode_values",
    "equal_as_in_python",
    "fn_gen_key",
    "fn_tag",
    "forget",
    "cluster_mode",
    "group",
    "group_by_id",
    "int_encodings",
    "adapted_otherwise",
    "keyable",
    "keyable_values",
    "l1_value",
    "l1_values",
    "invalidate_calls",
    "publish_in_script",
    "lease_key",
    "lock_key",
    "lookup_key",
    "lookup_keys",
    "ops_key",
    "parse_message",
    "parse_trend",
    "peek_many_call",
    "pk_row_id",
    "row_header",
    "row_id",
    "row_id_of_encoding",
    "schema_fingerprint",
    "shard_count",
    "split_header",
    "trend_call",
    "valid_entries",
    "value_field",
]

# Bumped whenever the payload layout changes, so old payloads are never decoded: old
# entries are left to expire, not logged as corrupt by every reader during a rolling
# deploy. 2: the MAC is keyed BLAKE2b (was HMAC-SHA256). 3: rows are marshalled values.
FORMAT_VERSION = "3"

# Keys longer than this are hashed; Redis keys are binary-safe but long keys cost memory.
_MAX_PLAIN = 200


# -- lookup values -----------------------------------------------------------------------


def encode_value(value: Any) -> str:
    """A type-tagged text form: 1 and "1" and True never share a form."""
    # f-strings where `value` is Any: the result is a str whatever mypy knows of `value`.
    t = type(value)
    if t is int:
        try:
            return "i" + str(value)
        except ValueError:  # more digits than str() converts (sys.set_int_max_str_digits)
            return "I" + hex(value)
    if t is str:
        return f"s{value}"
    if value is None:
        return "n"
    if t is bool:
        return "b1" if value else "b0"
    if t is uuid.UUID:
        return f"u{value.hex}"
    if t is decimal.Decimal:
        # Normalized in a context that rounds nothing: the default one keeps 28 digits,
        # and two wider values would share a form.
        return "d" + str(value.normalize(_EXACT) if value.is_finite() else value)
    if t is datetime.datetime:
        return f"t{value.isoformat()}"
    if t is datetime.date:
        return f"D{value.isoformat()}"
    if t is float:
        return "f" + repr(value)
    if t is bytes:
        return f"x{value.hex()}"
    k = keyable(value)
    if k is not value:  # a subclass of one of the types above, or a buffer: what it holds
        return encode_value(k)
    if isinstance(value, models.Model):  # pragma: no cover - normalized away before
        raise TypeError("model instances are normalized to their pk before keying")
    return "r" + type(value).__qualname__ + ":" + repr(value)


_EXACT = decimal.Context(prec=decimal.MAX_PREC, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN)

# The types of the values the tiers key a lookup by: encode_value() gives each an injective
# form, and they are hashable (L1's keys). A lookup with a value of any other type (a JSON
# value, an expression, a type of a library's own) reads the database, which answers it.
KEY_TYPES = frozenset(
    {
        int,
        str,
        bool,
        type(None),
        float,
        bytes,
        uuid.UUID,
        decimal.Decimal,
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
    }
)


def adapted_otherwise(value: Any) -> bool:
    """Whether the database may be sent `value` otherwise than keyable() keys it: a
    subclass of str, int or float other than an enum member (Django's choices) or
    Django's safe string. psycopg picks a value's dumper by its class, and such a class
    may have one of its own (one that lowercases, say). A lookup by such a value reads
    the database, and a write bounded by one drops its model."""
    if type(value) in KEY_TYPES:
        return False
    return isinstance(value, (str, int, float)) and not isinstance(value, (enum.Enum, SafeData))


def keyable(value: Any) -> Any:
    """value as the one of KEY_TYPES the database compares it as, when it is a subclass of
    str, int or float (a TextChoices member: its text) or a bytes-like buffer (a
    memoryview, a bytearray: its bytes); anything else unchanged."""
    if type(value) in KEY_TYPES:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__index__(value)
    if isinstance(value, float):
        return float.__float__(value)
    return value


def l1_value(value: Any) -> Any:
    """A value as L1's keys hold it: a str or an int as it is, any other value by its
    encode_value() form, in a 1-tuple (which no str or int equals). Python finds values
    equal that the database tells apart (1, True and 1.0 for a field that sends each as
    it is; a datetime and its fold; aware times of one instant in two zones), and an L1
    key compares by Python's equality; encode_value() tells them apart, as L2's keys do."""
    t = type(value)
    return value if t is str or t is int else (encode_value(value),)


def l1_values(values: tuple[Any, ...]) -> tuple[Any, ...]:
    """l1_value() of each value; `values` itself when they are all str and int."""
    for v in values:
        t = type(v)
        if t is not str and t is not int:
            return tuple([l1_value(v) for v in values])
    return values


def keyable_values(values: Iterable[Any]) -> bool:
    """Whether every value is of KEY_TYPES."""
    return KEY_TYPES.issuperset(map(type, values))


def encode_values(values: Iterable[Any]) -> str:
    """Length-prefixed parts, so ("a:b", "c") and ("a", "b:c") differ."""
    if type(values) is tuple and len(values) == 1:
        p = encode_value(values[0])
        if len(p) < _MAX_PLAIN - 8:
            return f"{len(p)}.{p}"
    out = []
    for v in values:
        p = encode_value(v)
        out.append(f"{len(p)}.{p}")
    s = "".join(out)
    if len(s) > _MAX_PLAIN:
        return "h" + hashlib.sha256(s.encode()).hexdigest()
    return s


def row_id(pk: Any) -> str:
    """The id of a row inside a model's keys; contains no '|' (the header separator)."""
    return row_id_of_encoding(encode_values((pk,)))


def row_id_of_encoding(encoded: str) -> str:
    """row_id() of the pk whose encode_values((pk,)) is `encoded`."""
    return encoded.replace("%", "%25").replace("|", "%7C")


def value_field(f: Any) -> Any:
    """The field whose values f holds: f itself, or for a relation (a foreign key, a
    multi-table child's pk, which is its parent link) the field at the end of its chain."""
    while f.is_relation:
        f = f.target_field
    return f


# Value fields that the database compares as Python compares the values the ORM prepares
# for them. Text only without a collation of its own (one may ignore case or accents), on
# PostgreSQL (whose database collations are deterministic: equal strings are equal bytes,
# and varchar keeps trailing spaces) and SQLite (BINARY). Not a datetime (another zone's
# spelling of one instant) nor a custom field (char(n) pads).
INTEGER_FIELDS: frozenset[type[models.Field[Any, Any]]] = frozenset(
    {
        models.AutoField,
        models.BigAutoField,
        models.SmallAutoField,
        models.IntegerField,
        models.BigIntegerField,
        models.SmallIntegerField,
        models.PositiveIntegerField,
        models.PositiveBigIntegerField,
        models.PositiveSmallIntegerField,
    }
)
_EXACT_FIELDS = INTEGER_FIELDS | {models.UUIDField}
_EXACT_TEXT = frozenset(
    {models.CharField, models.TextField, models.SlugField, models.EmailField, models.URLField}
)


def equal_as_in_python(f: Any, vendor: str) -> bool:
    """Whether the database (of `vendor`) finds two values of field f (or of the field at
    the end of its relation) equal exactly when their row ids are: a write that names a row
    by another spelling of its key ("BOB" for "bob" under a collation that ignores case)
    then drops that row's entries, and a row whose key is another spelling of the one a
    relation holds is not this relation's. A subclass of such a field counts as it when it
    converts and stores values as it does (`class Id(BigAutoField): pass`)."""
    f = value_field(f)
    base = _exact_base(type(f))
    if base is None:
        return False
    if base in _EXACT_FIELDS:
        return True
    return getattr(f, "db_collation", None) is None and vendor in ("postgresql", "sqlite")


# What a field does to the values it is given and the column it stores them in.
_CONVERSIONS = (
    "to_python",
    "get_prep_value",
    "get_db_prep_value",
    "get_db_prep_save",
    "from_db_value",
    "db_type",
    "cast_db_type",
)
_exact_bases: dict[type, type | None] = {}


def _exact_base(cls: type) -> type | None:
    """The exact field class that `cls` is, or behaves as; None if none."""
    try:
        return _exact_bases[cls]
    except KeyError:
        pass
    base = next((b for b in cls.__mro__ if b in _EXACT_FIELDS or b in _EXACT_TEXT), None)
    if base is not None and any(
        getattr(cls, name, None) is not getattr(base, name, None) for name in _CONVERSIONS
    ):
        base = None
    _exact_bases[cls] = base
    return base


def pk_row_id(pk_field: Any, value: Any) -> str:
    """The row id of a pk value, the same whether it comes from an instance (a read) or
    from a statement's parameters (a write): the value as the ORM prepares it."""
    f = value_field(pk_field)
    return row_id(f.get_prep_value(f.to_python(value)))


def schema_fingerprint(model: type[models.Model]) -> str:
    """Changes whenever the model's stored fields change, so a deploy never decodes old rows;
    and with the settings that decide how the ORM builds a row's values from the database's
    (a datetime read under USE_TZ is aware, in UTC; without it, naive in TIME_ZONE)."""
    zone = "" if settings.USE_TZ else settings.TIME_ZONE  # aware values are UTC's whatever it is
    parts = [FORMAT_VERSION, model._meta.label_lower, f"tz/{settings.USE_TZ}/{zone}"]
    for f in model._meta.concrete_fields:
        cls = type(f)
        parts.append(f"{f.attname}/{f.column}/{cls.__module__}.{cls.__qualname__}/{f.null}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


# -- the key space -----------------------------------------------------------------------

_base: list[str] = []


def base_prefix() -> str:
    """Our KEY_PREFIX inside the cache alias's own KEY_PREFIX and VERSION (Django's
    make_key), so two projects sharing one Redis database never share an entry. Braces
    would break Redis Cluster hash tags: they are replaced."""
    if not _base:
        key = caches[conf.CACHE_ALIAS].make_key(conf.KEY_PREFIX)
        _base.append(key.replace("{", "(").replace("}", ")"))
    return _base[0]


@dataclasses.dataclass(frozen=True)
class Shard:
    """The keys one script of a group may touch: a generation, a write counter, the row
    versions and the entry indexes, all under one hash tag (one Redis Cluster slot). A
    group has one shard on a single server; on a cluster it has SHARDS of them, spread
    over the slot space, so that one model's entries land on every master."""

    tag: str
    gen_key: str
    writes_key: str
    row_prefix: str

    def row_key(self, rid: str) -> str:
        return self.row_prefix + rid

    def index_key(self, label: str, gen: bytes | str) -> str:
        """The entries a model stored in this shard in one generation, scored by expiry
        (ms since the epoch): counted and cleaned without a SCAN of the database."""
        g = gen.decode() if isinstance(gen, bytes) else gen
        return f"{self.tag}:i:{label}:{g}"

    @property
    def indexes_key(self) -> str:
        """The set of the shard's index keys (old generations' too, until cleaned)."""
        return f"{self.tag}:ix"

    @property
    def log_key(self) -> str:
        """The last writes of the shard's group (512 items), newest first: each write's
        marker, then its row keys. A marker holds the write's token and the write count it
        replaced, and says whether the write named its rows or touched the whole model (a
        flush, a write naming no row or more than 256). A fill under a lookup other than
        the pk, which learns its row only from the database, is refused by a moved write
        count unless the markers chain back to the reader's count and none of those writes
        touched that row (invalidate.lua writes it, fill.lua reads it)."""
        return f"{self.tag}:l"


def _shard(tag: str) -> Shard:
    return Shard(tag=tag, gen_key=tag + ":g", writes_key=tag + ":w", row_prefix=tag + ":r:")


@dataclasses.dataclass(frozen=True)
class Group:
    """The Redis keys of one invalidation group (one database, one table hierarchy): its
    shards, and the keys of the whole group (statistics, hot rows) under the first one's
    hash tag. A write changes every shard (any of them may hold an entry of the row, under
    a lookup other than the pk); a read, a fill or a cleanup touches the one shard of its
    key, so every script touches one Redis Cluster slot."""

    id: str  # "<alias>:<root model label>", as carried by bus messages and the outbox
    alias: str
    label: str  # the root model's label
    shards: tuple[Shard, ...]
    # Mirror of the write counter in the derived functions' hash slot.
    fn_counter: str

    @property
    def tag(self) -> str:
        return self.shards[0].tag

    # The first shard's keys: the only ones on a single server (tests look inside).
    @property
    def gen_key(self) -> str:
        return self.shards[0].gen_key

    @property
    def writes_key(self) -> str:
        return self.shards[0].writes_key

    def row_key(self, rid: str) -> str:
        return self.shards[0].row_key(rid)

    def index_key(self, label: str, gen: bytes | str) -> str:
        return self.shards[0].index_key(label, gen)

    @property
    def indexes_key(self) -> str:
        return self.shards[0].indexes_key

    def shard_of(self, key: str) -> Shard:
        """The shard an entry key (or an index key) belongs to: the hash tag it starts with."""
        if len(self.shards) == 1:
            return self.shards[0]
        return self._by_tag[key[: key.index("}") + 1]]

    @functools.cached_property
    def _by_tag(self) -> dict[str, Shard]:
        return {s.tag: s for s in self.shards}

    def shard_for(self, suffix: str) -> Shard:
        """The shard an entry with this key suffix is stored in (spread by a hash)."""
        n = len(self.shards)
        return self.shards[0] if n == 1 else self.shards[zlib.crc32(suffix.encode()) % n]

    def stats_key(self, label: str) -> str:
        """A model's counters summed over every process."""
        return f"{self.tag}:s:{label}"

    def procs_key(self, label: str) -> str:
        """The processes that reported a model's counters, scored by when."""
        return f"{self.tag}:p:{label}"

    def trend_key(self, label: str) -> str:
        """A model's reads per minute by tier, every process summed: a capped list
        (TREND's elements)."""
        return f"{self.tag}:t:{label}"

    def hot_key(self, label: str) -> str:
        """A model's sampled hottest rows."""
        return f"{self.tag}:hot:{label}"

    def hot_decay_key(self, label: str) -> str:
        """When the hot-row sample last decayed: in its hash slot (one MULTI decays both)."""
        return f"{self.tag}:hot:{label}:at"

    @staticmethod
    def data_suffix(schema: str, key_prefix: str) -> str:
        """Every entry of one model schema and manager has this right after its hash tag."""
        return f":{schema}:{key_prefix}"


_groups: dict[tuple[str, str], Group] = {}
_lock = threading.Lock()
_SLOTS = 16384


def shard_count() -> int:
    """SHARDS, or its default: 1 on a single server or behind Sentinel, 12 on a cluster
    (a multiple of 2, 3, 4 and 6 masters: each gets an equal part of a model's entries)."""
    n = conf.SHARDS
    if n is None:
        n = 12 if cluster_mode() else 1
    # Held to 1..1024 by check E013, and here: past the slots, ranges would have no tag.
    return max(1, min(int(n), 1024))


def _shard_tags(base: str, n: int) -> list[str]:
    """n hash tags whose slots fall one in each n-th of the slot space, so that any
    cluster whose masters hold equal ranges of slots holds an equal number of shards.
    Found by trying suffixes: the same in every process, whatever the cluster."""
    if n == 1:
        return ["{" + base + "}"]
    tags = []
    for i in range(n):
        lo, hi = i * _SLOTS // n, (i + 1) * _SLOTS // n
        for suffix in itertools.count():
            inner = f"{base}:{suffix}"
            if lo <= key_slot(inner.encode()) < hi:
                tags.append("{" + inner + "}")
                break
    return tags


def group(alias: str, label: str) -> Group:
    g = _groups.get((alias, label))
    if g is None:
        gid = f"{alias}:{label}"
        g = Group(
            id=gid,
            alias=alias,
            label=label,
            shards=tuple(_shard(t) for t in _shard_tags(base_prefix() + ":" + gid, shard_count())),
            fn_counter=fn_tag() + ":w:" + gid,
        )
        with _lock:
            _groups[(alias, label)] = g
    return g


def group_by_id(gid: str) -> Group | None:
    alias, _, label = gid.partition(":")
    if not label:
        return None
    return group(alias, label)


def lookup_key(
    g: Group, schema: str, key_prefix: str, alias_part: str, values: Any, encoded: str = ""
) -> str:
    """An entry's key: the hash tag of its shard, the model's schema, the model, manager
    and lookup (key_prefix), the database read, and the values (`encoded`: their
    encode_values(), when the caller has it already)."""
    suffix = f":{schema}:{key_prefix}{alias_part}:{encoded or encode_values(values)}"
    return g.shard_for(suffix).tag + suffix


def lookup_keys(
    g: Group,
    schema: str,
    key_prefix: str,
    alias_part: str,
    pks: list[Any],
    encoded: list[str] | None = None,
) -> tuple[list[str], list[str]]:
    """lookup_key() of each one-value lookup (get_many_cached's pks), the shared part once,
    and each value's encode_values((pk,)), which row_id_of_encoding() takes (`encoded`:
    those, when the caller has them already)."""
    mid = f":{schema}:{key_prefix}{alias_part}:"
    if encoded is None:
        encoded = [encode_values((pk,)) for pk in pks]
    if len(g.shards) == 1:
        start = g.shards[0].tag + mid
        return [start + e for e in encoded], encoded
    shard_for = g.shard_for
    keys = []
    for e in encoded:
        suffix = mid + e
        keys.append(shard_for(suffix).tag + suffix)
    return keys, encoded


# An int below this in size has a plain encode_value() ("i" and its digits, fewer than
# _MAX_PLAIN - 8 characters), which encode_values() does not hash.
_PLAIN_INT = 10 ** (_MAX_PLAIN - 12)


def int_encodings(pks: list[Any]) -> list[str] | None:
    """encode_values((pk,)) of each pk, when all are ints of a plain size; None otherwise.
    Written out for get_many_cached's usual integer pks: two calls per pk fewer. Digits need
    no escaping, so each encoding is its row's id as well (row_id_of_encoding)."""
    if not pks or not all(type(pk) is int for pk in pks) or max(map(abs, pks)) >= _PLAIN_INT:
        return None
    return [f"{len(s) + 1}.i{s}" for s in map(str, pks)]


def lease_key(key: str) -> str:
    """The lease of an entry, in its hash slot; cleanup leaves keys of this form alone."""
    return key + "|L"


def negative_row_key(key: str) -> str:
    """Where a "no such row" entry keeps its version (it has no row id)."""
    return key + "|R"


def fn_tag() -> str:
    """Every derived entry shares one hash slot with the counters it is checked against."""
    return "{" + base_prefix() + ":fn}"


def fn_gen_key() -> str:
    return fn_tag() + ":g"


def fn_key_prefix(qualname: str, digest: str) -> str:
    return f"{fn_tag()}:{qualname}:{digest}:"


def channel() -> str:
    """The invalidation bus."""
    return base_prefix() + ":bus"


def heartbeat_channel(process: str) -> str:
    """Where one process publishes its own heartbeats, to itself: in the bus channel's hash
    slot (a cluster's sharded pub/sub delivers both on one connection, in order)."""
    return "{" + channel() + "}:hb:" + process


def ops_key() -> str:
    """The last maintenance runs, and when hot-row samples last decayed (the project's own:
    under base_prefix(), as every key)."""
    return base_prefix() + ":ops"


def lock_key(name: str) -> str:
    return f"{base_prefix()}:lock:{name}"


def _after_fork() -> None:
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def forget(**kwargs: Any) -> None:
    """Settings changed (tests): build key names anew on next use."""
    with _lock:
        _base.clear()
        _groups.clear()
        _cluster.clear()


# -- stored values ---------------------------------------------------------------------
# A row entry is "kind|gen|row id|version|expiry|" + MAC + body (kind P: a row, N: no such
# row, whose version is the write count it was stored under); a derived entry is
# "D|gen|counters|expiry|" + MAC + body, or a tombstone "T|token". The MAC covers the key
# and the whole header (serialization.sign). Lua reads the row header in row_header.lua.

ROW = b"P"
NO_ROW = b"N"
DERIVED = b"D"
TOMBSTONE = "T|"


class RowHeader(NamedTuple):
    """The header of a row entry (kind ROW or NO_ROW)."""

    kind: bytes
    gen: bytes
    rid: bytes
    version: bytes
    expires: bytes


class DerivedHeader(NamedTuple):
    """The header of a derived result."""

    kind: bytes
    gen: bytes
    counters: bytes
    expires: bytes


def row_header(kind: bytes, gen: bytes, rid: str, version: bytes, expires: int) -> bytes:
    return b"|".join([*RowHeader(kind, gen, rid.encode(), version, str(expires).encode()), b""])


def derived_header(gen: bytes, counters: bytes, expires: int) -> bytes:
    return b"|".join([*DerivedHeader(DERIVED, gen, counters, str(expires).encode()), b""])


def split_header(raw: bytes, fields: int) -> tuple[list[bytes], bytes] | None:
    """A value's first `fields` header fields and what follows the header (MAC and body),
    or None when it has fewer."""
    parts = raw.split(b"|", fields)
    if len(parts) != fields + 1:
        return None
    return parts[:fields], parts[fields]


# -- bus messages --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RowsMessage:
    """Rows of a group were written (flush: all of them): drop them from every L1."""

    origin: str
    group_id: str
    rows: tuple[str, ...]
    flush: bool

    def encode(self) -> str:
        return json.dumps(
            {"o": self.origin, "g": self.group_id, "r": list(self.rows), "f": int(self.flush)}
        )


@dataclasses.dataclass(frozen=True)
class DerivedDrop:
    """One derived result was dropped (fn.invalidate()): drop it from every L1."""

    origin: str
    key: str
    fn_label: str

    def encode(self) -> str:
        return json.dumps({"o": self.origin, "k": self.key, "m": self.fn_label})


@dataclasses.dataclass(frozen=True)
class Undelivered:
    """A process's invalidation is in the outbox although Redis answered: Redis refused
    its scripts (out of memory, too few replicas to write...), so L2 still
    holds the old rows, and no bus message went out with them. Every process stops
    trusting the tiers until the outbox is delivered, as the writer's own does."""

    origin: str

    def encode(self) -> str:
        return json.dumps({"o": self.origin, "u": 1})


def parse_message(data: bytes) -> RowsMessage | DerivedDrop | Undelivered | None:
    """A bus message, or None for anything else (valid JSON of another shape must not kill
    the listener: it would clear every L1)."""
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(msg, dict) or not isinstance(msg.get("o"), str):
        return None
    if "u" in msg:
        u = msg["u"]
        return Undelivered(msg["o"]) if type(u) is int and u == 1 and len(msg) == 2 else None
    if "k" in msg:
        if isinstance(msg["k"], str) and isinstance(msg.get("m"), str):
            return DerivedDrop(msg["o"], msg["k"], msg["m"])
        return None
    rows = msg.get("r")
    if (
        isinstance(msg.get("g"), str)
        and isinstance(rows, list)
        and all(isinstance(r, str) for r in rows)
        and msg.get("f") in (0, 1)
    ):
        return RowsMessage(msg["o"], msg["g"], tuple(rows), bool(msg["f"]))
    return None


# -- scripts ---------------------------------------------------------------------------


class Script(enum.Enum):
    """The Lua scripts (tiered_cache/lua/), each with the shared functions it uses."""

    READ = ("read", ("common", "row_header"))
    READ_MANY = ("read_many", ("common", "row_header"))
    FILL = ("fill", ("common",))
    INVALIDATE = ("invalidate", ("common",))
    BUMP = ("bump", ("common",))
    DERIVED_READ = ("derived_read", ("common",))
    DERIVED_FILL = ("derived_fill", ("common",))
    DERIVED_DROP = ("derived_drop", ())
    CLEAN = ("clean", ("common", "row_header"))
    RELEASE = ("release", ())
    TREND = ("trend", ())

    @property
    def source(self) -> str:
        return _source(self.value)

    @property
    def sha(self) -> str:
        return _sha(self.value)


@functools.cache
def _lua(name: str) -> str:
    return resources.files(__package__).joinpath("lua", name + ".lua").read_text()


@functools.cache
def _source(value: tuple[str, tuple[str, ...]]) -> str:
    name, parts = value
    return "".join(_lua(p) for p in parts) + _lua(name)


@functools.cache
def _sha(value: tuple[str, tuple[str, ...]]) -> str:
    return hashlib.sha1(_source(value).encode()).hexdigest()


class ScriptCall(NamedTuple):
    """One EVALSHA: a script with its KEYS and ARGV."""

    script: Script
    keys: Sequence[str]
    args: Sequence[Any]

    def command(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


class Command(NamedTuple):
    """A plain command on keys of one slot, sent beside the scripts (RedisTier.scripts)."""

    name: str
    keys: Sequence[str]

    def command(self) -> tuple[Any, ...]:
        return (self.name, *self.keys)


# READ codes: a valid hit; no lease asked; lease granted; someone else fills.
HIT, NO_LEASE, LEASE, BUSY = 1, 0, 2, 3


def read_call(
    g: Group, key: str, lease: str, lease_ms: int, fresh: str, rid: str = ""
) -> ScriptCall:
    """rid: the row id of the key's row when the key names it (a pk lookup): a miss then
    tells the row's version, which guards its fill instead of the model's write count."""
    s = g.shard_of(key)
    return ScriptCall(
        Script.READ,
        [s.gen_key, s.writes_key, key, lease_key(key)],
        [lease, lease_ms, fresh, s.row_prefix, rid],
    )


class Read(NamedTuple):
    """READ's reply: a HIT with its value, or a code with the generation and write count a
    fill must find unchanged (bytes as Redis gave them)."""

    code: int
    value: bytes | None
    gen: bytes | None
    writes: bytes | None
    # The row's version on a miss when the read named its row (read_call's rid), or None.
    version: bytes | None = None

    @classmethod
    def of(cls, res: list[Any]) -> Read:
        if res[0] == HIT:
            return cls(HIT, res[1], None, None)
        return cls(int(res[0]), None, res[1], res[2], res[3] if len(res) > 3 else None)


def read_many_call(
    s: Shard,
    keys: Sequence[str],
    leases: Sequence[str],
    lease_ms: int,
    fresh: str,
    rids: Sequence[str] = (),
) -> ScriptCall:
    """Keys of one shard (Group.shard_of); none: only the shard's counters, made if
    missing. rids: each key's row id (pk keys), as in read_call."""
    return ScriptCall(
        Script.READ_MANY,
        [s.gen_key, s.writes_key, *keys],
        [lease_ms, fresh, s.row_prefix, *leases, *rids],
    )


def peek_many_call(s: Shard, keys: Sequence[str], rids: Sequence[str]) -> Command:
    """One MGET of a shard's generation and write count, entries (pk keys) and their rows'
    versions: all that row_header.lua's valid() reads, read at once (valid_entries)."""
    return Command("MGET", [s.gen_key, s.writes_key, *keys, *(s.row_prefix + r for r in rids)])


# An entry valid_entries() found valid: the value, its header's fields and what follows
# them (split_header's parts, so that opening it does not split it again). A plain tuple:
# a NamedTuple's constructor costs a hundred rows 25 µs.
ValidEntry = tuple[bytes, list[bytes], bytes]


def valid_entries(reply: Sequence[Any], rids: Sequence[str]) -> list[ValidEntry | None]:
    """Per key of peek_many_call, its value split (a ValidEntry) if valid as row_header.lua's
    valid() judges it (the same generation, and the row's version or, for "no such row",
    the write count it was stored under), else None: a miss to ask READ_MANY about, which
    also makes missing counters and clears junk (a junk counter here matches no entry)."""
    gen, writes = reply[0], reply[1]
    n = len(rids)
    out: list[ValidEntry | None] = [None] * n
    if not isinstance(gen, bytes) or not isinstance(writes, bytes):
        return out
    fields = len(RowHeader._fields)
    for i in range(n):
        v = reply[2 + i]
        if not isinstance(v, bytes):
            continue
        head = split_header(v, fields)
        if head is None or head[0][1] != gen:
            continue
        kind, _, rid, ver, _ = head[0]
        if kind == ROW:
            if rid == rids[i].encode() and reply[2 + n + i] == ver:
                out[i] = (v, *head)
        elif kind == NO_ROW and ver == writes:
            out[i] = (v, *head)
    return out


class ReadMany(NamedTuple):
    """READ_MANY's reply: the generation, the write count, and per key a value (bytes) or
    [LEASE or BUSY, the row's version or None]."""

    gen: bytes
    writes: bytes
    entries: list[Any]

    @classmethod
    def of(cls, res: list[Any]) -> ReadMany:
        return cls(res[0], res[1], res[2:])


def fill_call(
    g: Group,
    label: str,
    key: str,
    rid: str,
    lease: str,
    gen: bytes,
    writes: bytes,
    kind: bytes,
    signed: bytes,
    ttl_ms: int,
    version: bytes,
    version_ttl_ms: int,
    expires_ms: int,
    row_seen: bytes | None = None,
) -> ScriptCall:
    """FILL replies 1 (stored), 0 (refused) or [2, current row version]. A stored entry is
    added to its model's index of the generation (which the fill checked is current).
    row_seen: the row's version when the read began (a positive fill of a read that named
    its row): the fill is refused if that row was written since, not if any row of the
    model was. Else it is guarded by the model's write count, `writes`; for a row read
    under another (unique) lookup, a changed count is forgiven when the shard's log shows
    that no write since touched the row (Shard.log_key). Under a unique lookup another row
    can only come to match after this one stopped matching, which is a write of this row."""
    s = g.shard_of(key)
    row_key = s.row_key(rid) if rid else negative_row_key(key)
    guard_key, guard = s.writes_key, writes
    # A row read under another lookup: the writes since the read began are looked up in the
    # shard's log, and only a write of this row (or of the whole model) refuses the fill.
    by_log = "1" if kind == ROW and rid and row_seen is None else "0"
    if row_seen is not None and rid:
        guard_key, guard = row_key, row_seen
    return ScriptCall(
        Script.FILL,
        [
            s.gen_key,
            guard_key,
            key,
            lease_key(key),
            row_key,
            s.index_key(label, gen),
            s.indexes_key,
            s.log_key,
        ],
        [
            lease,
            gen,
            guard,
            kind.decode(),
            signed,
            ttl_ms,
            version,
            version_ttl_ms,
            expires_ms,
            by_log,
        ],
    )


def publish_in_script() -> bool:
    """Whether the invalidation script itself publishes the bus message: only where one
    script changes the whole group (one shard) on a server whose PUBLISH reaches every
    subscriber. Otherwise the message goes out after every shard's script has run (a
    process dropping its L1 must not read an entry back from a shard not yet changed)."""
    return shard_count() == 1 and not cluster_mode()


def cluster_mode() -> bool:
    """Whether our cache alias is a Redis Cluster (tiered_cache.cluster.ClusterClient). Asked
    on every Redis call: read from the settings once (forget() after they change)."""
    if not _cluster:
        options = settings.CACHES.get(conf.CACHE_ALIAS, {}).get("OPTIONS", {})
        _cluster.append(is_cluster_client(options))
    return _cluster[0]


_cluster: list[bool] = []


def invalidate_calls(
    g: Group,
    rids: Sequence[str],
    message: RowsMessage,
    fresh: str,
    version_ttl_ms: int,
    fresh_gen: str,
) -> list[ScriptCall]:
    """One INVALIDATE per shard: each gets new row versions for the rows, a new write
    counter and, for a flush, a new generation."""
    inside = publish_in_script()
    return [
        ScriptCall(
            Script.INVALIDATE,
            [s.gen_key, s.writes_key, *[s.row_key(r) for r in rids], s.log_key],
            [
                channel() if inside else "",
                message.encode(),
                len(rids),
                fresh,
                version_ttl_ms,
                "1" if message.flush else "0",
                fresh_gen,
            ],
        )
        for s in g.shards
    ]


def bump_call(counters: Sequence[str], fresh: str) -> ScriptCall:
    return ScriptCall(Script.BUMP, list(counters), [fresh])


def derived_keys(key: str, counters: Sequence[str]) -> list[str]:
    return [fn_gen_key(), key, *counters]


def derived_read_call(key: str, counters: Sequence[str], fresh: str, marker_ms: int) -> ScriptCall:
    """marker_ms: how long the marker a read leaves for its fill lives (derived_read.lua)."""
    return ScriptCall(Script.DERIVED_READ, derived_keys(key, counters), [fresh, marker_ms])


class DerivedRead(NamedTuple):
    """DERIVED_READ's reply: a hit's value, or what a fill must find unchanged."""

    hit: bool
    value: bytes | None
    gen: bytes
    counters: bytes
    tombstone: bytes

    @classmethod
    def of(cls, res: list[Any]) -> DerivedRead:
        if res[0] == 1:
            return cls(True, res[1], b"", b"", b"")
        g, w, t = (x if isinstance(x, bytes) else str(x).encode() for x in res[1:4])
        return cls(False, None, g, w, t)


def derived_fill_call(
    key: str, counters: Sequence[str], seen: DerivedRead, signed: bytes, ttl_ms: int
) -> ScriptCall:
    return ScriptCall(
        Script.DERIVED_FILL,
        derived_keys(key, counters),
        [seen.gen, seen.counters, seen.tombstone, signed, ttl_ms],
    )


def derived_drop_call(message: DerivedDrop, tombstone: str, ttl_ms: int) -> ScriptCall:
    """Replace one derived result by a tombstone, which refuses fills begun before it.
    On a cluster the message is published after the script (publish_in_script)."""
    return ScriptCall(
        Script.DERIVED_DROP,
        [message.key],
        [TOMBSTONE + tombstone, ttl_ms, channel() if not cluster_mode() else "", message.encode()],
    )


def clean_call(g: Group, index: str, keys: Sequence[str], now_ms: int) -> ScriptCall:
    """CLEAN replies [entries of old generations deleted, stale entries deleted, index
    members left]: it checks entries of one index, forgets the gone ones there, and drops
    an index left empty."""
    s = g.shard_of(index)
    return ScriptCall(
        Script.CLEAN,
        [s.gen_key, s.writes_key, index, s.indexes_key, *keys],
        [s.row_prefix, now_ms],
    )


def release_call(key: str, token: str) -> ScriptCall:
    return ScriptCall(Script.RELEASE, [key], [token])


# The counters a TREND element holds after its minute, in this order.
TREND_FIELDS = ("l1_hits", "l2_hits", "negative_hits", "misses", "bypassed")


def trend_call(
    g: Group, label: str, minute: int, counts: Sequence[int], keep: int, ttl_ms: int
) -> ScriptCall:
    """Add one push's reads (TREND_FIELDS) to the model's minute `minute` (since the
    epoch): an element "minute l1 l2 negative misses bypassed" of a list holding the last
    `keep` minutes that had reads. Replies 1 (a new minute) or 0 (added to the last)."""
    return ScriptCall(Script.TREND, [g.trend_key(label)], [minute, keep, ttl_ms, *counts])


def parse_trend(raw: bytes | str) -> tuple[int, ...] | None:
    """A TREND element as (minute, *counts in TREND_FIELDS order), or None for junk."""
    text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
    parts = text.split()
    if len(parts) != 1 + len(TREND_FIELDS) or not all(p.isdigit() for p in parts):
        return None
    return tuple(int(p) for p in parts)
