"""Row payloads: authenticated bytes for Redis, and an immutable form for L1."""

from __future__ import annotations

import copyreg
import datetime
import decimal
import functools
import hashlib
import hmac
import inspect
import io
import logging
import marshal
import pickle
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from django.conf import settings
from django.db import models
from django.db.models.base import ModelState
from django.db.models.fields.files import FileDescriptor, ImageFileDescriptor
from django.db.models.fields.related_descriptors import ForeignKeyDeferredAttribute
from django.db.models.signals import post_init, pre_init
from django.dispatch.dispatcher import NO_RECEIVERS

from .keys import INTEGER_FIELDS, DerivedHeader, RowHeader, split_header, value_field

logger = logging.getLogger("tiered_cache")

MAC_SIZE = 32


class CorruptPayload(Exception):
    """A payload failed authentication or decoding; treated as a miss."""


# Derived from SECRET_KEY once, and again when a test changes the setting (reading
# settings costs more than the MAC itself on the L2 hit path).
_mac_key: list[bytes] = []
# The MAC keyed once: copying it skips hashing the key block again for every payload.
_keyed: list[hashlib.blake2b] = []


def mac_key() -> bytes:
    if not _mac_key:
        _mac_key.append(
            hashlib.sha256(b"tiered_cache.payload:" + settings.SECRET_KEY.encode()).digest()
        )
    return _mac_key[0]


def forget_mac_key(setting: str = "SECRET_KEY", **kwargs: Any) -> None:
    if setting == "SECRET_KEY":
        _mac_key.clear()
        _keyed.clear()


def _mac(key: str, header: bytes, body: bytes) -> bytes:
    """Keyed BLAKE2b of key, NUL, header and body: a MAC by design (no length extension, so
    no HMAC construction). Not HMAC-SHA256: through OpenSSL 3 that looks its algorithm up on
    every call, which cost an L2 hit 20-25 µs of its 50 µs of decoding right after the round
    trip (caches cold), against 1.1 µs warm for this (2.4 µs for HMAC) in CPython's own C.
    The parts are fed one by one, not joined: joining copied the body once more per read."""
    if not _keyed:
        _keyed.append(hashlib.blake2b(key=mac_key(), digest_size=MAC_SIZE))
    h = _keyed[0].copy()
    h.update(key.encode() + b"\0")
    h.update(header)
    h.update(body)
    return h.digest()


def sign(key: str, header: bytes, body: bytes) -> bytes:
    """header + MAC + body. The MAC binds the body to its key (a valid payload moved to
    another key is refused) and to its header: everything that decides whether the entry
    is served (kind, generation, row id, row version or write count, expiry), so an old
    authentic body cannot be served under a current header."""
    return header + _mac(key, header, body) + body


H = TypeVar("H", RowHeader, DerivedHeader)


def open_signed(key: str, raw: bytes, header: type[H]) -> tuple[H, bytes]:
    """(the header, the body) if the MAC holds; nothing is decoded before this."""
    split = split_header(raw, len(header._fields))
    if split is None:
        raise CorruptPayload("malformed header")
    return header(*split[0]), verified_body(key, raw, split[1])


def verified_body(key: str, raw: bytes, rest: bytes) -> bytes:
    """The body of `raw` if its MAC holds; `rest`: what follows its header (split_header's
    second part), for a caller that has split it already."""
    if len(rest) < MAC_SIZE:
        raise CorruptPayload("truncated payload")
    body = rest[MAC_SIZE:]
    if not hmac.compare_digest(rest[:MAC_SIZE], _mac(key, raw[: len(raw) - len(rest)], body)):
        raise CorruptPayload("payload MAC does not match")
    return body


def _utc() -> datetime.timezone:
    return datetime.UTC


def _reduce_timezone(tz: datetime.timezone) -> Any:
    # Aware datetimes are mostly UTC: refer to the singleton instead of rebuilding it
    # (a third of the cost of unpickling a row otherwise).
    if tz is datetime.UTC:
        return (_utc, ())
    return tz.__reduce__()


def _reduce_memoryview(view: memoryview) -> Any:
    # pickle refuses a memoryview (Django's Model.__getstate__ turns them into bytes for
    # the same reason); a field whose from_db_value() gives one gets one back, read-only,
    # as a view of the bytes it was read from.
    return (memoryview, (view.tobytes(),))


_dispatch = copyreg.dispatch_table.copy()
_dispatch[datetime.timezone] = _reduce_timezone
_dispatch[memoryview] = _reduce_memoryview


def dumps(value: Any) -> bytes:
    buf = io.BytesIO()
    pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = _dispatch
    pickler.dump(value)
    return buf.getvalue()


def loads_verified(body: bytes) -> Any:
    """Only ever called on bytes whose MAC was checked with our secret."""
    try:
        return pickle.loads(body)
    except Exception as exc:  # authentic but undecodable: a bug or a changed class
        raise CorruptPayload(f"authentic payload failed to decode: {exc!r}") from exc


# -- the L2 body of a row ----------------------------------------------------------------
#
# A row's body is its frozen values in field order, not a pickle of them: marshal writes
# and reads ints, strings, floats, bytes and tuples in C with no class lookups, and the few
# value types it lacks (datetime, date, time, Decimal, UUID, timedelta) travel as the
# state their own constructors take back. Unpickling the same row looked up three classes
# and cost 2.9 µs warm against 0.8 µs; cold, right after the round trip, most of an L2
# hit's decoding. A row holding anything else (a str subclass, a datetime in another zone)
# is pickled as before: its body starts with pickle's PROTO opcode, never with _MARSHALLED.
# Bodies are only decoded after their MAC holds, so marshal only ever reads our own bytes.

_MARSHALLED = b"M"
_MARSHAL_VERSION = 4  # readable by every Python 3 since 3.4

# Fields whose Python values are immutable, by exact class: a subclass may return anything
# from from_db_value() (a list behind a CharField), so subclasses are copied on the way out
# of L1 like JSON, arrays and custom fields, and a caller's mutation never reaches the cache.
# These hold ints, strs, bools or floats, which marshal writes as they are; _TYPED below,
# the other immutable ones.
_PLAIN_FIELDS: frozenset[type[models.Field[Any, Any]]] = INTEGER_FIELDS | frozenset(
    {
        models.CharField,
        models.TextField,
        models.EmailField,
        models.SlugField,
        models.URLField,
        models.BooleanField,
        models.FloatField,
        models.GenericIPAddressField,
    }
)
_PLAIN_TYPES = (int, str, bool, float)

# A naive datetime's or time's state carries this one byte more than a UTC one's.
_NAIVE = b"n"
_UTC_STATE_SIZE = {datetime.datetime: 10, datetime.time: 6}


class _NotMarshallable(Exception):
    """A value of a type the marshalled form does not hold: the row is pickled instead."""


def _state(value: datetime.date | datetime.time) -> bytes:
    """The bytes a datetime, date or time pickles itself as (with protocol 4, which keeps
    the fold), for values that are naive or in UTC."""
    state = value.__reduce_ex__(4)[1][0]
    assert isinstance(state, bytes)
    tz = getattr(value, "tzinfo", None)
    if tz is None:
        return state if type(value) is datetime.date else state + _NAIVE
    if tz is not datetime.UTC:
        raise _NotMarshallable
    return state


def _naive_or_utc(kind: type) -> Any:
    utc_size = _UTC_STATE_SIZE[kind]

    def build(state: bytes) -> Any:
        if len(state) == utc_size:
            return kind(state, datetime.UTC)
        return kind(state[:utc_size])

    return build


def _uuid(raw: bytes) -> uuid.UUID:
    # What UUID(bytes=raw) does, without the argument checks of its __init__ (a UUID read
    # from the database is SafeUUID.unknown too).
    u = object.__new__(uuid.UUID)
    object.__setattr__(u, "int", int.from_bytes(raw))
    object.__setattr__(u, "is_safe", uuid.SafeUUID.unknown)
    return u


# Field class -> (the one value type it holds, its marshallable form, and back).
_TYPED: dict[type[models.Field[Any, Any]], tuple[type, Any, Any]] = {
    models.DateTimeField: (datetime.datetime, _state, _naive_or_utc(datetime.datetime)),
    models.DateField: (datetime.date, _state, datetime.date),
    models.TimeField: (datetime.time, _state, _naive_or_utc(datetime.time)),
    models.DecimalField: (decimal.Decimal, str, decimal.Decimal),
    models.UUIDField: (uuid.UUID, lambda v: v.bytes, _uuid),
    models.DurationField: (
        datetime.timedelta,
        lambda v: (v.days, v.seconds, v.microseconds),
        lambda t: datetime.timedelta(*t),
    ),
}


def _plain(value: Any) -> Any:
    if value is None or type(value) in _PLAIN_TYPES:
        return value
    raise _NotMarshallable


def _typed(kind: type, to_form: Any) -> Any:
    def encode(value: Any) -> Any:
        if value is None:
            return None
        if type(value) is not kind:  # a subclass may carry more than its value
            raise _NotMarshallable
        return to_form(value)

    return encode


def _field_codec(field: models.Field[Any, Any]) -> tuple[Any, Any] | None:
    """(value -> what marshal writes, raising _NotMarshallable for any other value; that
    form -> the value, or None where the form is the value), for a field whose values are
    immutable; None for any other field, whose values L1 holds pickled."""
    cls = type(value_field(field))  # a foreign key holds its target's
    if cls in _PLAIN_FIELDS:
        return _plain, None
    typed = _TYPED.get(cls)
    if typed is None:
        return None
    kind, to_form, from_form = typed
    return _typed(kind, to_form), from_form


def _body_reader(decoders: Sequence[Any], pk_at: int, n_mut: int) -> Any:
    """A function from a marshalled body to a frozen row, written out per model: a tuple
    display with the conversions inline costs a fraction of a loop over the fields. It
    raises on any body of another shape (the caller makes that CorruptPayload)."""
    namespace: dict[str, Any] = {"loads": marshal.loads}
    items = []
    for i, from_form in enumerate(decoders):
        if from_form is None:
            items.append(f"v[{i}]")
        else:
            namespace[f"c{i}"] = from_form
            items.append(f"None if v[{i}] is None else c{i}(v[{i}])")
    row = "v" if all(d is None for d in decoders) else "(" + "".join(f"{x}, " for x in items) + ")"
    source = (
        "def read(body):\n"
        "    v, mut = loads(body[1:])\n"
        f"    if (type(v) is not tuple or len(v) != {len(decoders)} or type(mut) is not tuple\n"
        f"            or len(mut) != {n_mut} or not all(type(b) is bytes for b in mut)):\n"
        "        raise ValueError('a row of another shape')\n"
        f"    row = {row}\n"
        f"    return (row, mut, row[{pk_at}])\n"
    )
    exec(source, namespace)
    return namespace["read"]


def _instance_builder(
    model: type[models.Model], attnames: list[str], mutable: tuple[int, ...]
) -> Callable[[tuple[Any, ...], tuple[bytes, ...], str], models.Model]:
    """A function building an instance from a frozen row's values (immutable ones, pickles
    of the mutable ones) as from_db() would, without running __init__: its __dict__ is a
    dict display with constant keys, in field order, the fastest way CPython builds one
    (as namedtuple and dataclasses generate code for the same reason). The names are
    attnames of model fields, so they are valid identifiers; repr() quotes them anyway."""
    items, n_imm, n_mut = [], 0, 0
    for i, name in enumerate(attnames):
        if i in mutable:
            items.append(f"{name!r}: loads(mut[{n_mut}])")
            n_mut += 1
        else:
            items.append(f"{name!r}: imm[{n_imm}]")
            n_imm += 1
    namespace: dict[str, Any] = {
        "cls": model,
        "new": model.__new__,
        "ModelState": ModelState,
        "loads": pickle.loads,
    }
    exec(
        "def build(imm, mut, db):\n"
        "    state = ModelState()\n"
        "    state.adding = False\n"
        "    state.db = db\n"
        "    obj = new(cls)\n"
        f"    obj.__dict__ = {{'_state': state, {', '.join(items)}}}\n"
        "    return obj\n",
        namespace,
    )
    build: Callable[[tuple[Any, ...], tuple[bytes, ...], str], models.Model] = namespace["build"]
    return build


# Django's field descriptors whose __set__, on an instance Model.__init__ is building, only
# puts the value in __dict__ under the field's attname, as a thaw does: a foreign key's
# also drops a cached related object (a new instance has none), an image's also updates
# its dimensions when the field held a file before (it held none).
_STORING_SETTERS = frozenset(
    vars(cls)["__set__"]
    for cls in (ForeignKeyDeferredAttribute, FileDescriptor, ImageFileDescriptor)
)


def _init_only_stores(model: type[models.Model], attname: str) -> bool:
    """Whether Model.__init__ setting this field does no more than store its value."""
    setter = getattr(type(inspect.getattr_static(model, attname, None)), "__set__", None)
    return setter is None or setter in _STORING_SETTERS


def _from_db_as_the_orm_calls_it(model: type[models.Model]) -> Any:
    """model.from_db as the ORM's iterable calls it for a queryset of the default fetch mode:
    on Django 6.1+, with fetch_mode=FETCH_ONE where it takes that argument (a from_db() of
    the project's may use it); another mode is given to the instance afterwards
    (reads.fetch_as), as before 6.1."""
    from_db = model.from_db
    fetch_one = getattr(models, "FETCH_ONE", None)
    if fetch_one is None:
        return from_db
    try:
        params = inspect.signature(from_db).parameters.values()
    except (TypeError, ValueError):  # no signature to read: called as before 6.1
        return from_db
    if any(p.name == "fetch_mode" or p.kind is p.VAR_KEYWORD for p in params):
        # django-stubs declares from_db() as Django 5.2's, without fetch_mode.
        return functools.partial(from_db, fetch_mode=fetch_one)  # type: ignore[call-arg]
    return from_db


class RowCodec:
    """Turns a model row into a tuple of values and back into a fresh instance."""

    def __init__(self, model: type[models.Model]):
        self.model = model
        self.fields = list(model._meta.concrete_fields)
        self.attnames = [f.attname for f in self.fields]
        self.pk_index = self.attnames.index(model._meta.pk.attname)
        self.count = len(self.attnames)
        codecs = [_field_codec(f) for f in self.fields]
        self.mutable = tuple(i for i, c in enumerate(codecs) if c is None)
        self.imm_names = tuple(a for i, a in enumerate(self.attnames) if i not in self.mutable)
        self.mut_names = tuple(a for i, a in enumerate(self.attnames) if i in self.mutable)
        self._build = _instance_builder(model, self.attnames, self.mutable)
        imm = [c for c in codecs if c is not None]
        pk_name = model._meta.pk.attname
        # The L2 body (encode/decode). A primary key of a mutable kind (a custom field)
        # keeps its rows pickled: the frozen row's pk is the value itself, which the
        # marshalled body does not hold.
        self._encoders: list[Any] | None = None
        self._read_body: Any = None
        if pk_name in self.imm_names:
            self._encoders = [encode for encode, _ in imm]
            self._read_body = _body_reader(
                [decode for _, decode in imm], self.imm_names.index(pk_name), len(self.mut_names)
            )
        # Building an instance without __init__ is only equivalent to from_db() when the
        # model keeps Django's own __init__ and from_db and nothing listens to its init
        # signals; otherwise (field trackers, ImageField dimensions...) from_db() it is.
        self._plain = (
            model.__init__ is models.Model.__init__
            # A bound classmethod has __func__; its declared (Callable) type does not say so.
            and model.from_db.__func__ is models.Model.from_db.__func__  # type: ignore[attr-defined]
            # __init__ sets each field with setattr(), through its descriptor, where a thaw
            # writes __dict__.
            and model.__setattr__ is models.Model.__setattr__
            # A __new__ of its own may pick the class by the values (or set attributes),
            # which from_db() passes it and a thaw does not.
            and model.__new__ is models.Model.__new__
            and all(_init_only_stores(model, a) for a in self.attnames)
        )
        self._unfreezable_logged = False
        self._from_db = _from_db_as_the_orm_calls_it(model)

    def values(self, obj: models.Model) -> tuple[Any, ...] | None:
        """The values an instance holds, in field order; None when fields are deferred
        (such rows are not cached). The row as loaded only if holds_as_loaded()."""
        d = obj.__dict__
        try:
            return tuple([d[a] for a in self.attnames])
        except KeyError:
            return None

    def freeze(self, values: Sequence[Any]) -> tuple[Any, ...]:
        """Immutable L1 form: (immutable values, pickled mutable values, pk), each in the
        order of imm_names and mut_names. A hit copies the first into the new instance's
        __dict__ and unpickles the rest, so every caller gets values of its own. Tuples,
        not dicts: L1 holds many thousands of these."""
        mutable = self.mutable
        if not mutable:
            return (tuple(values), (), values[self.pk_index])
        imm = []
        mut = []
        for i, value in enumerate(values):
            if i in mutable:
                mut.append(dumps(value))
            else:
                imm.append(value)
        return (tuple(imm), tuple(mut), values[self.pk_index])

    def freeze_or_none(self, values: Sequence[Any]) -> tuple[Any, ...] | None:
        """freeze(), or None for a row with a value pickle cannot copy (an object of a
        from_db_value() that holds a lock, a socket...): such rows are read from the
        database, as the ORM reads them, and not stored."""
        try:
            return self.freeze(values)
        except Exception as exc:  # pickle raises TypeError, PicklingError, AttributeError...
            if not self._unfreezable_logged:
                self._unfreezable_logged = True
                logger.warning(
                    "tiered_cache: rows of %s are read from the database, not cached: "
                    "a value cannot be copied (%s)",
                    self.model._meta.label,
                    exc,
                )
            return None

    def encode(self, frozen: tuple[Any, ...]) -> bytes:
        """The L2 body of a frozen row (see _MARSHALLED)."""
        encoders = self._encoders
        if encoders is not None:
            imm, mut, _ = frozen
            try:
                values = tuple([encode(v) for encode, v in zip(encoders, imm, strict=True)])
                return _MARSHALLED + marshal.dumps((values, mut), _MARSHAL_VERSION)
            except _NotMarshallable:
                pass  # a value of a type of its own: pickled, as any value can be
        return dumps(frozen)

    def decode(self, body: bytes) -> Any:
        """A frozen row from a verified body; CorruptPayload if it is not one."""
        if body[:1] != _MARSHALLED or self._read_body is None:
            row = loads_verified(body)
            if not self.is_frozen(row):
                raise CorruptPayload("row of the wrong shape")
            return row
        try:  # the reader checks the shape itself
            return self._read_body(body)
        except Exception as exc:  # authentic but undecodable: a bug or a changed layout
            raise CorruptPayload(f"authentic row failed to decode: {exc!r}") from exc

    def is_frozen(self, payload: Any) -> bool:
        """The shape freeze() produces. Only our own authenticated payloads get here, under
        keys that carry the schema, so this guards against our bugs, cheaply."""
        return (
            type(payload) is tuple
            and len(payload) == 3
            and type(payload[0]) is tuple
            and len(payload[0]) == len(self.imm_names)
            and type(payload[1]) is tuple
            and len(payload[1]) == len(self.mut_names)
        )

    def _no_init_receivers(self) -> bool:
        cls = self.model
        for signal in (pre_init, post_init):
            if signal.receivers and signal.sender_receivers_cache.get(cls) is not NO_RECEIVERS:
                return False
        return True

    def holds_as_loaded(self) -> bool:
        """Whether an instance the ORM loads now holds in its __dict__ the very values
        from_db() was given, as thaw() builds one without from_db(): nothing of the model
        (from_db(), __init__, __setattr__, a field's descriptor, an init signal's receiver)
        runs on them. What the tiers store is what from_db() was given: of any other
        model, a miss notes it as it reads (reads._Noted), since a thaw hands it to the
        same hooks again."""
        return self._plain and (
            not (pre_init.receivers or post_init.receivers) or self._no_init_receivers()
        )

    def pk_as_frozen(self) -> bool:
        """Whether the pk of an instance thaw() builds now is its frozen row's (frozen[2]):
        built as holds_as_loaded() says, with an immutable pk. get_many_cached() then keys
        its rows by that, as in_bulk() keys them by their pk, without asking each one."""
        return self.pk_index not in self.mutable and self.holds_as_loaded()

    def thaw(self, frozen: tuple[Any, ...], db: str) -> models.Model:
        imm, mut, _ = frozen
        # Most projects connect nothing to the init signals: known here without a call.
        if self._plain and (
            not (pre_init.receivers or post_init.receivers) or self._no_init_receivers()
        ):
            return self._build(imm, mut, db)
        by_name = dict(zip(self.imm_names, imm, strict=False))
        for attname, blob in zip(self.mut_names, mut, strict=False):
            by_name[attname] = pickle.loads(blob)
        # The field names, as the ORM passes them: an overridden from_db() may use them.
        obj: models.Model = self._from_db(db, self.attnames, [by_name[a] for a in self.attnames])
        return obj
