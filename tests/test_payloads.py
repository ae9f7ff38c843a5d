"""What Redis hands back is authenticated before it is decoded (guarantee 6), and a model's
schema is part of its keys (guarantee 7)."""

from __future__ import annotations

import datetime
import logging
import marshal
import os
import pickle
import uuid
import zoneinfo
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from django.test import override_settings
from django.test.utils import isolate_apps

import tiered_cache
from tests.cache_fixtures import counters, l2_keys, write_outside_django
from tests.testapp.factories import UserFactory
from tests.testapp.models import Code, Document, Specimen, User
from tiered_cache import keys as tc_keys
from tiered_cache.bus import bus
from tiered_cache.registry import first_model_cache, reset_registry
from tiered_cache.tiers import redis_tier

pytestmark = pytest.mark.django_db(transaction=True)

PWNED = Path(f"/tmp/tiered_cache_pwned_{os.getpid()}")


class Exploit:
    """Unpickling this runs code: it must never happen to a payload read from Redis."""

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {PWNED}",))


def cached_user() -> tuple[User, bytes, bytes]:
    user = UserFactory(first_name="real")
    assert bus.wait_trusted(5)  # an untrusted read fills nothing (a lapse on a slow CI)
    User.objects.get_cached(pk=user.pk)
    tiered_cache.clear_local()
    (key,) = l2_keys(User)
    return user, key, redis_tier.client.get(key)


def replace_body(value: bytes, body: bytes) -> bytes:
    """Keep the header ("kind|gen|row|version|expiry|"), put `body` where MAC + body were."""
    head = value.split(b"|", 5)
    return b"|".join(head[:5]) + b"|" + body


@pytest.fixture(autouse=True)
def no_pwn() -> Any:
    PWNED.unlink(missing_ok=True)
    yield
    assert not PWNED.exists(), "a payload from Redis was unpickled unverified"


@pytest.fixture(params=["get_cached", "get_many_cached"])
def read(request: Any) -> Callable[[Any], User]:
    """A read of one user by pk: get_cached, or get_many_cached, which checks and opens
    the entries of its MGET on a path of its own."""
    if request.param == "get_cached":
        return lambda pk: User.objects.get_cached(pk=pk)
    return lambda pk: User.objects.get_many_cached([pk])[pk]


def assert_miss_read_from_db(user: User, caplog: Any, read: Callable[[Any], User]) -> None:
    before = counters(User)
    with caplog.at_level(logging.WARNING, logger="tiered_cache"):
        got = read(user.pk)
    assert got.first_name == "real"
    after = counters(User)
    assert after["corrupt"] == before["corrupt"] + 1
    assert after["l2_hits"] == before["l2_hits"]
    assert "bad L2 payload" in caplog.text


def test_flipped_byte_is_a_miss(caplog: Any, read: Callable[[Any], User]) -> None:
    user, key, value = cached_user()
    tampered = value[:-1] + bytes([value[-1] ^ 1])
    redis_tier.client.set(key, tampered)
    assert_miss_read_from_db(user, caplog, read)


def test_code_running_pickle_is_never_loaded(caplog: Any, read: Callable[[Any], User]) -> None:
    user, key, value = cached_user()
    evil = pickle.dumps(Exploit())
    redis_tier.client.set(key, replace_body(value, b"\0" * 32 + evil))
    assert_miss_read_from_db(user, caplog, read)
    assert not PWNED.exists()


def test_payload_signed_with_another_secret_is_a_miss(
    caplog: Any, read: Callable[[Any], User]
) -> None:
    import hashlib

    from tiered_cache.keys import RowHeader
    from tiered_cache.serialization import mac_key, open_signed

    user, key, value = cached_user()
    body = pickle.dumps(Exploit())
    header = replace_body(value, b"")  # what sign() covers besides the key and the body

    def signed_with(secret: bytes) -> bytes:
        mac = hashlib.blake2b(key + b"\0" + header + body, key=secret, digest_size=32)
        return mac.digest() + body

    # Signed as sign() signs, so that only the secret differs: ours would be accepted
    # (checked without decoding), the other secret's is not.
    open_signed(key.decode(), header + signed_with(mac_key()), RowHeader)
    other = hashlib.sha256(b"tiered_cache.payload:someone else's secret").digest()
    foreign = signed_with(other)
    redis_tier.client.set(key, replace_body(value, foreign))
    assert_miss_read_from_db(user, caplog, read)


def test_valid_payload_moved_to_another_key_is_a_miss(
    caplog: Any, read: Callable[[Any], User]
) -> None:
    user, key, value = cached_user()
    other = UserFactory(first_name="other")
    User.objects.get_cached(pk=other.pk)
    tiered_cache.clear_local()
    other_key = next(k for k in l2_keys(User) if k != key)
    other_value = redis_tier.client.get(other_key)
    # Keep this key's valid header, carry the other key's authentic body over.
    redis_tier.client.set(key, replace_body(value, other_value.split(b"|", 4)[4]))
    assert_miss_read_from_db(user, caplog, read)


@pytest.mark.parametrize("junk", [b"", b"P|", b"P|x|y|z|", b"\x00\xff" * 10])
def test_truncated_or_junk_values_are_misses(junk: bytes, read: Callable[[Any], User]) -> None:
    user, key, _ = cached_user()
    redis_tier.client.set(key, junk)
    assert read(user.pk).first_name == "real"


def test_key_of_another_redis_type_is_a_miss(read: Callable[[Any], User]) -> None:
    user, key, _ = cached_user()
    redis_tier.client.delete(key)
    redis_tier.client.hset(key, "field", "value")
    assert read(user.pk).first_name == "real"
    # The junk was replaced by a real entry.
    tiered_cache.clear_local()
    User.objects.get_cached(pk=user.pk)
    assert counters(User)["l2_hits"] == 1


def test_schema_is_part_of_every_key(monkeypatch: Any) -> None:
    user, old_key, _ = cached_user()
    mc = first_model_cache(User)
    assert mc is not None and mc.schema.encode() in old_key
    # A deploy that changes the model's fields changes the fingerprint...
    monkeypatch.setattr("tiered_cache.registry.schema_fingerprint", lambda model: "0ther5chema")
    reset_registry()
    try:
        before = counters(User)["misses"]
        got = User.objects.get_cached(pk=user.pk)
        # ...so the old payload is not even looked at: a miss, read from the database.
        assert got.pk == user.pk
        assert counters(User)["misses"] == before + 1
        assert counters(User)["corrupt"] == 0
    finally:
        reset_registry()


@isolate_apps("tests.testapp")
def test_fingerprint_changes_with_the_fields() -> None:
    from django.db import models

    class Before(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"
            managed = False

    class After(models.Model):
        name = models.TextField()

        class Meta:
            app_label = "testapp"
            managed = False

    a, b = tc_keys.schema_fingerprint(Before), tc_keys.schema_fingerprint(After)
    assert a != b


def test_a_release_that_reads_datetimes_otherwise_never_decodes_old_rows() -> None:
    """USE_TZ (and TIME_ZONE, where naive values live) decide what the ORM makes of a stored
    datetime: a process of a release that changed them keys its rows apart, and reads as
    the ORM does (an old payload's aware UTC datetime was served as it was)."""
    spec = Specimen.objects.create(moment=datetime.datetime(2024, 1, 1, 12, tzinfo=datetime.UTC))
    Specimen.objects.get_cached(pk=spec.pk)
    redis_tier.wait_for_fills()
    for changed in ({"USE_TZ": False}, {"TIME_ZONE": "Asia/Tokyo", "USE_TZ": False}):
        with override_settings(**changed):
            reset_registry()  # a process of the new release
            tiered_cache.clear_local()
            try:
                cached = Specimen.objects.get_cached(pk=spec.pk).moment
                orm = Specimen.objects.get(pk=spec.pk).moment
                assert (cached, cached.tzinfo) == (orm, orm.tzinfo), changed
            finally:
                reset_registry()


def test_key_encoding_is_injective() -> None:
    enc = tc_keys.encode_values
    assert enc(("a:b", "c")) != enc(("a", "b:c"))
    assert enc((1,)) != enc(("1",)) != enc((True,))
    assert enc(("",)) != enc(()) != enc((None,))
    long = "x" * 500
    assert enc((long,)) != enc((long + "y",))
    assert len(enc((long,))) < 100


def test_old_body_under_the_current_header_is_a_miss(
    caplog: Any, read: Callable[[Any], User]
) -> None:
    """A replay: the authentic payload of an earlier version of the row, put back under the
    header (generation, row version) the current entry was stored with."""
    user, key, old = cached_user()
    User.objects.filter(pk=user.pk).update(first_name="newer")
    User.objects.get_cached(pk=user.pk)  # stores the new version's entry
    redis_tier.wait_for_fills()
    new = redis_tier.client.get(key)
    assert new is not None and new != old
    header = b"|".join(new.split(b"|", 5)[:5]) + b"|"
    redis_tier.client.set(key, header + old.split(b"|", 5)[5])
    tiered_cache.clear_local()
    with caplog.at_level(logging.WARNING, logger="tiered_cache"):
        assert read(user.pk).first_name == "newer"
    assert counters(User)["corrupt"] == 1
    assert "MAC does not match" in caplog.text


def test_entry_put_back_after_its_expiry_is_not_served(
    settings: Any, read: Callable[[Any], User]
) -> None:
    """The expiry is inside the MAC: restoring an old entry (and its row version) with a
    fresh Redis TTL does not make it servable past the TIMEOUT it was stored for."""
    import time

    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "TIMEOUT": 1}
    reset_registry()
    try:
        user = UserFactory(first_name="real")
        User.objects.get_cached(pk=user.pk)
        redis_tier.wait_for_fills()
        mc = first_model_cache(User)
        assert mc is not None
        key = mc.key(mc.pk_lookup, (user.pk,))
        row_key = mc.home.row_key(mc.row_id_of(user.pk))
        saved = redis_tier.client.get(key), redis_tier.client.get(row_key)
        assert saved[0] is not None and saved[1] is not None
        time.sleep(2.2)
        write_outside_django(
            f"UPDATE {User._meta.db_table} SET first_name = 'later' WHERE id = %s", [user.pk]
        )
        redis_tier.client.set(key, saved[0])
        redis_tier.client.set(row_key, saved[1])
        tiered_cache.clear_local()
        assert read(user.pk).first_name == "later"
    finally:
        reset_registry()


# -- a row's values as L2 holds them (serialization.RowCodec.encode/decode) --------------

_SPECIMENS: dict[str, dict[str, Any]] = {
    "every field null": {},
    "ordinary values": {
        "small": -7,
        "big": 2**62,
        "positive": 12,
        "positive_small": 3,
        "positive_big": 2**40,
        "ratio": 0.1,
        "amount": Decimal("1234.500000"),
        "day": datetime.date(2026, 11, 30),
        "moment": datetime.datetime(2026, 11, 30, 16, 5, 7, 123456, tzinfo=datetime.UTC),
        "clock": datetime.time(23, 59, 59, 999999),
        "span": datetime.timedelta(days=-3, seconds=5, microseconds=1),
        "token": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "address": "2001:db8::1",
        "flag": False,
        "slug": "a-slug",
        "url": "https://example.com/é",
        "text": "naïve ☃ 😀\ttab\nline",
        "blob": b"\x00\xff\x80M",
        "data": {"a": [1, 2.5, None, "x"]},
    },
    "edges": {
        "small": -32768,
        "big": -(2**63),
        "positive": 0,
        "ratio": float("-inf"),
        "amount": Decimal("-0.000001"),
        "day": datetime.date(1, 1, 1),
        "moment": datetime.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=datetime.UTC),
        "clock": datetime.time(0, 0),
        "span": datetime.timedelta(0),
        "flag": True,
        "text": "",
        "data": [],
    },
}


@pytest.mark.parametrize("values", _SPECIMENS.values(), ids=_SPECIMENS.keys())
def test_every_field_type_comes_back_from_l2_as_the_orm_gives_it(values: dict[str, Any]) -> None:
    document = Document.objects.create(title="d")
    code = Code.objects.create(code="c-1", description="c")
    row = Specimen.objects.create(document=document, code=code, **values)
    assert bus.wait_trusted(5)
    Specimen.objects.get_cached(pk=row.pk)  # a miss, filled
    (key,) = l2_keys(Specimen)
    # Stored as marshalled values, not a pickle (its body follows the header and the MAC).
    assert redis_tier.client.get(key).split(b"|", 5)[5][32:33] == b"M"
    tiered_cache.clear_local()
    before = counters(Specimen)["l2_hits"]
    cached = Specimen.objects.get_cached(pk=row.pk)
    assert counters(Specimen)["l2_hits"] == before + 1
    orm = Specimen.objects.get(pk=row.pk)
    # The instance's attributes are the ORM's, in its order (vars(), model_to_dict-style
    # code and reprs of __dict__ see the same), and so is its state.
    assert list(vars(cached)) == list(vars(orm))
    assert (cached._state.db, cached._state.adding) == (orm._state.db, orm._state.adding)
    for field in Specimen._meta.concrete_fields:
        got, want = getattr(cached, field.attname), getattr(orm, field.attname)
        assert (type(got), got) == (type(want), want), field.attname
        if isinstance(want, datetime.datetime | datetime.time):
            assert got.tzinfo is want.tzinfo, field.attname


def _user_fields() -> tuple[str, ...]:
    mc = first_model_cache(User)
    assert mc is not None
    return mc.codec.imm_names


def test_a_decoded_row_holds_its_pk_as_the_orm_does() -> None:
    """The frozen row's pk (what L1 indexes, samples and shows) is the value, not the form
    it travels in: a UUID, not its bytes."""
    document = Document.objects.create(title="d")
    for model, pk in ((Document, document.pk), (Specimen, Specimen.objects.create().pk)):
        mc = first_model_cache(model)
        assert mc is not None
        frozen = mc.codec.freeze(mc.codec.values(model.objects.get(pk=pk)))
        body = mc.codec.encode(frozen)
        assert body[:1] == b"M"
        back = mc.codec.decode(body)
        assert back == frozen
        assert type(back[2]) is type(pk) and back[2] == pk


class Tagged(str):
    """A str of a class of its own: marshal refuses it, pickle keeps its class."""


def _codec_round_trip(values: tuple[Any, ...]) -> tuple[bytes, tuple[Any, ...]]:
    mc = first_model_cache(Specimen)
    assert mc is not None
    codec = mc.codec
    frozen = codec.freeze(values)
    body = codec.encode(frozen)
    back = codec.decode(body)
    assert codec.is_frozen(back)
    return body, codec.thaw(back, "default").__dict__


def _specimen_values(**changes: Any) -> tuple[Any, ...]:
    names = [f.attname for f in Specimen._meta.concrete_fields]
    return tuple(changes.get(name, 1 if name == "id" else None) for name in names)


@pytest.mark.parametrize(
    "changes, marshalled",
    [
        # Naive values (USE_TZ = False), the second of a repeated hour included.
        ({"moment": datetime.datetime(2026, 10, 25, 2, 30, fold=1)}, True),
        ({"clock": datetime.time(2, 30, 1, 5)}, True),
        # A zone other than UTC, a subclass of str, a lazy string: pickled, as any value.
        (
            {"moment": datetime.datetime(2026, 1, 1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris"))},
            False,
        ),
        (
            {
                "moment": datetime.datetime(
                    2026, 1, 1, tzinfo=datetime.timezone(datetime.timedelta(hours=2))
                )
            },
            False,
        ),
        ({"clock": datetime.time(1, 2, tzinfo=datetime.UTC)}, True),
        ({"slug": Tagged("subclass")}, False),
        ({"small": True}, True),
        ({"amount": Decimal("NaN")}, True),
        ({"ratio": 3}, True),
    ],
)
def test_values_of_any_type_survive_the_l2_body(changes: dict[str, Any], marshalled: bool) -> None:
    body, got = _codec_round_trip(_specimen_values(**changes))
    assert body[:1] == (b"M" if marshalled else b"\x80")
    for name, want in changes.items():
        value = got[name]
        if isinstance(want, Decimal) and want.is_nan():
            assert type(value) is Decimal and value.is_nan()
            continue
        assert (type(value), value) == (type(want), want), name
        if isinstance(want, datetime.datetime | datetime.time):
            assert (value.tzinfo, value.fold) == (want.tzinfo, want.fold), name


@pytest.mark.parametrize(
    "body",
    [
        b"M" + marshal.dumps(((1, 2), ())),  # too few values
        b"M\xff",  # not marshal's
        b"M" + marshal.dumps("x"),  # not a row
        b"M" + marshal.dumps((("x",) * len(_user_fields()), 5)),  # mutable values not a tuple
        b"M" + marshal.dumps((("x",) * len(_user_fields()), (5,))),  # nor pickles
    ],
)
def test_an_authentic_body_of_another_layout_is_a_miss(
    body: bytes, caplog: Any, read: Callable[[Any], User]
) -> None:
    """Marshal only ever reads our own signed bytes, but a body it cannot read as a row (a
    bug, a layout changed without the schema) is refused as corrupt, never served."""
    from tiered_cache.serialization import sign

    user, key, value = cached_user()
    head = b"|".join(value.split(b"|", 5)[:5]) + b"|"
    redis_tier.client.set(key, sign(key.decode(), head, body))
    assert_miss_read_from_db(user, caplog, read)


class _Remembering:
    """A field descriptor that does more than store: it remembers the value each instance
    was given first (as change-tracking libraries do), which Model.__init__ runs on load."""

    def __init__(self, field: Any) -> None:
        self.field = field

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        return instance.__dict__[self.field.attname]

    def __set__(self, instance: Any, value: Any) -> None:
        instance.__dict__.setdefault("_loaded", {})[self.field.attname] = value
        instance.__dict__[self.field.attname] = value


@isolate_apps("tests.testapp")
def test_an_instance_from_the_tiers_runs_what_init_runs_for_a_field_descriptor() -> None:
    """A thaw writes the values into a new instance's __dict__ only where the field's
    descriptor would do no more (Django's own: foreign keys, files); for any other setter
    the instance is built by from_db(), as the ORM builds it."""
    from django.db import models

    from tiered_cache.serialization import RowCodec

    class RememberingField(models.CharField):  # type: ignore[type-arg]
        descriptor_class = _Remembering

    class Tracked(models.Model):
        name = RememberingField(max_length=10)
        owner = models.ForeignKey(User, on_delete=models.CASCADE)
        upload = models.FileField()

        class Meta:
            app_label = "testapp"
            managed = False

    class Untracked(models.Model):
        owner = models.ForeignKey(User, on_delete=models.CASCADE)
        upload = models.FileField()

        class Meta:
            app_label = "testapp"
            managed = False

    for model, row in ((Tracked, (1, "ann", 7, "a.txt")), (Untracked, (1, 7, "a.txt"))):
        codec = RowCodec(model)
        orm = model.from_db("default", codec.attnames, list(row))
        thawed = codec.thaw(codec.freeze(codec.values(orm)), "default")
        assert vars(thawed).keys() == vars(orm).keys(), model.__name__
        assert getattr(thawed, "_loaded", None) == getattr(orm, "_loaded", None)
        assert [getattr(thawed, a) for a in codec.attnames] == list(row)


@isolate_apps("tests.testapp")
def test_an_instance_from_the_tiers_runs_a_models_own_setattr() -> None:
    """Model.__init__ sets every field with setattr(): a model that overrides __setattr__
    (to track what changed, say) sees each value on a load, and so on a read from the tiers."""
    from django.db import models

    from tiered_cache.serialization import RowCodec

    class Watched(models.Model):
        name = models.CharField(max_length=10)

        class Meta:
            app_label = "testapp"
            managed = False

        def __setattr__(self, name: str, value: Any) -> None:
            self.__dict__.setdefault("_set", []).append(name)
            super().__setattr__(name, value)

    codec = RowCodec(Watched)
    orm = Watched.from_db("default", codec.attnames, [1, "ann"])
    thawed = codec.thaw(codec.freeze(codec.values(orm)), "default")
    assert thawed.__dict__.get("_set") == orm.__dict__["_set"]
    assert (thawed.pk, thawed.name) == (1, "ann")
