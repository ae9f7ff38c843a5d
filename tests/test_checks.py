"""Each system check, by its ID."""

from __future__ import annotations

import re
from typing import Any

import pytest
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.db import models
from django.test.utils import isolate_apps
from django_redis.cache import RedisCache

from tiered_cache import CachedManager, CachedManagerMixin
from tiered_cache.checks import check_lookups, check_manager, check_settings
from tiered_cache.conf import DEFAULTS, Settings, conf


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


def test_defaults_pass() -> None:
    assert check_settings() == []
    assert check_lookups() == []


def test_every_setting_is_a_typed_attribute_read_live(settings: Any) -> None:
    # conf's values are plain attributes once read: each default is declared with its type,
    # and override_settings reaches the next read.
    assert set(Settings.__annotations__) == set(DEFAULTS)
    assert conf.L1_TIMEOUT == DEFAULTS["L1_TIMEOUT"]
    settings.TIERED_CACHE = {"L1_TIMEOUT": 7}
    assert conf.L1_TIMEOUT == 7
    with pytest.raises(AttributeError):
        conf.L1_TIMOUT  # noqa: B018 - a misspelt name is not a setting


def test_the_whole_check_framework_is_clean() -> None:
    assert [m for m in checks.run_checks() if m.id and m.id.startswith("tiered_cache")] == []


def test_e001_unknown_alias(settings: Any) -> None:
    settings.TIERED_CACHE = {"CACHE_ALIAS": "nope"}
    assert ids(check_settings()) == ["tiered_cache.E001"]
    assert "'nope'" in check_settings()[0].msg


def test_e002_alias_not_django_redis(settings: Any) -> None:
    settings.CACHES = {
        **settings.CACHES,
        "local": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    }
    settings.TIERED_CACHE = {"CACHE_ALIAS": "local"}
    assert ids(check_settings()) == ["tiered_cache.E002"]


def _sentinel_cache(sentinels: Any, location: str = "redis://mymaster/0") -> dict[str, Any]:
    return {
        "BACKEND": "django_redis.cache.RedisCache",
        "LOCATION": location,
        "OPTIONS": {
            "CLIENT_CLASS": "django_redis.client.SentinelClient",
            "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
            "CONNECTION_POOL_CLASS": "redis.sentinel.SentinelConnectionPool",
            "SENTINELS": sentinels,
        },
    }


def _plain_cache(location: str, **options: Any) -> dict[str, Any]:
    return {"BACKEND": "django_redis.cache.RedisCache", "LOCATION": location, "OPTIONS": options}


A = [("10.0.0.1", 26379), ("10.0.0.3", 26379)]
B = [("10.0.0.2", 26379)]


@pytest.mark.parametrize(
    ("other", "refused"),
    [
        # One service URL, other sentinels: one alias would reach the other's master.
        (_sentinel_cache(B), True),
        # The same through a project's own subclass of django-redis's cache.
        ({**_sentinel_cache(B), "BACKEND": "tests.test_checks.OwnRedisCache"}, True),
        # The same sentinels however written: one pool, one server, as it should be.
        (_sentinel_cache([["10.0.0.3", "26379"], ["10.0.0.1", 26379]]), False),
        # Another service name, or another database: pools of their own.
        (_sentinel_cache(B, "redis://other/0"), False),
        (_sentinel_cache(B, "redis://mymaster/1"), False),
        # A plain client on the URL django-redis's SentinelClient makes of the master's.
        (_plain_cache("redis://mymaster/0?is_master=1"), True),
        # A plain client on the service URL as written: SentinelClient never connects to it.
        (_plain_cache("redis://mymaster/0"), False),
        # Not a django-redis entry, or OPTIONS that are not a dict: nothing to compare.
        ({"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}, False),
        ({**_plain_cache("redis://mymaster/0?is_master=0"), "OPTIONS": None}, True),
    ],
)
def test_e016_one_pool_url_for_two_servers(settings: Any, other: Any, refused: bool) -> None:
    """django-redis keys its pools by URL alone, for the whole process: an alias that gives
    tiered_cache's URL other sentinels (or none) would reach the same pool's server."""
    settings.CACHES = {**settings.CACHES, "tc": _sentinel_cache(A), "sessions": other}
    settings.TIERED_CACHE = {"CACHE_ALIAS": "tc"}
    msgs = check_settings()
    if not refused:
        assert msgs == []
        return
    assert ids(msgs) == ["tiered_cache.E016"]
    assert "'sessions'" in msgs[0].msg and "redis://mymaster/0?is_master=" in msgs[0].msg


def test_e016_leaves_plain_aliases_of_one_server_alone(settings: Any) -> None:
    """Without Sentinel a URL names its server: two aliases sharing it (even through a
    factory of their own) share a pool of the same server, which is harmless."""
    settings.CACHES = {
        **settings.CACHES,
        "tc": _plain_cache("redis://127.0.0.1:6379/5,redis://127.0.0.1:6380/5"),
        "other": _plain_cache(
            "redis://127.0.0.1:6379/5", CONNECTION_FACTORY="django_redis.pool.ConnectionFactory"
        ),
    }
    settings.TIERED_CACHE = {"CACHE_ALIAS": "tc"}
    assert check_settings() == []


@pytest.mark.parametrize(
    "name",
    [
        "L1_MAX_ENTRIES",
        "L1_TIMEOUT",
        "TIMEOUT",
        "NEGATIVE_TIMEOUT",
        "SOCKET_TIMEOUT",
        "BREAKER_RECOVERY_TIME",
    ],
)
@pytest.mark.parametrize("value", [0, -1, "10", None, True])
def test_e003_non_positive_numbers(settings: Any, name: str, value: Any) -> None:
    settings.TIERED_CACHE = {name: value}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E003"]
    assert name in msgs[0].msg


@pytest.mark.parametrize(
    "name",
    [
        "L1_MAX_ENTRIES",
        "L1_MAX_BYTES",
        "BREAKER_FAILURE_THRESHOLD",
        "BREAKER_SUCCESS_THRESHOLD",
        "BULK_INVALIDATION_LIMIT",
        "OUTBOX_LIMIT",
    ],
)
def test_e003_counts_are_whole_numbers(settings: Any, name: str) -> None:
    """A count of 2.5 passed as a positive number; no entry, byte or failure is a fraction."""
    settings.TIERED_CACHE = {name: 2.5}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E003"]
    assert f"TIERED_CACHE['{name}'] must be a positive whole number, not 2.5" in msgs[0].msg
    for whole in (7, 1e4):  # a whole number written as a float is one
        settings.TIERED_CACHE = {name: whole}
        assert check_settings() == []


@pytest.mark.parametrize("alias", [["default"], None, 3])
def test_e001_alias_not_a_name(settings: Any, alias: Any) -> None:
    """A list crashed the check (unhashable) instead of naming the setting."""
    settings.TIERED_CACHE = {"CACHE_ALIAS": alias}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E001"]
    assert f"must be the name of a CACHES entry, not {alias!r}" in msgs[0].msg


class OwnRedisCache(RedisCache):
    """A project's own cache class on django-redis's."""


def test_e002_accepts_a_subclass_of_django_redis(settings: Any) -> None:
    """A project's own subclass of django-redis's cache (for metrics, say) is django-redis."""
    settings.CACHES = {
        **settings.CACHES,
        "own": {**settings.CACHES[settings.TIERED_CACHE.get("CACHE_ALIAS", "default")]},
    }
    settings.CACHES["own"]["BACKEND"] = "tests.test_checks.OwnRedisCache"
    settings.TIERED_CACHE = {**settings.TIERED_CACHE, "CACHE_ALIAS": "own"}
    assert "tiered_cache.E002" not in ids(check_settings())


def test_e004_not_a_dict(settings: Any) -> None:
    settings.TIERED_CACHE = ["KEY_PREFIX"]
    assert ids(check_settings()) == ["tiered_cache.E004"]


@pytest.mark.parametrize("prefix", ["", "a{b}", "a b", 5])
def test_e006_bad_prefix(settings: Any, prefix: Any) -> None:
    settings.TIERED_CACHE = {"KEY_PREFIX": prefix}
    assert ids(check_settings()) == ["tiered_cache.E006"]


@pytest.mark.parametrize(
    "given",
    [
        {"BUS_HEARTBEAT": 0.5},
        {"BUS_TRUST_WINDOW": 0.2},
        {"BUS_HEARTBEAT": 1, "BUS_TRUST_WINDOW": 1},
    ],
)
def test_e010_heartbeat_not_below_the_trust_window(settings: Any, given: dict[str, Any]) -> None:
    settings.TIERED_CACHE = given
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E010"]
    assert "BUS_HEARTBEAT" in msgs[0].msg and "BUS_TRUST_WINDOW" in msgs[0].msg


@pytest.mark.parametrize("acks", [-1, 1.5, "1", True])
def test_e011_replica_acks_not_a_count(settings: Any, acks: Any) -> None:
    settings.TIERED_CACHE = {"REPLICA_ACKS": acks}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E011"]
    assert "REPLICA_ACKS" in msgs[0].msg and repr(acks) in msgs[0].msg


@pytest.mark.parametrize("acks", [None, 0, 2])
def test_replica_acks_none_or_a_count_pass(settings: Any, acks: Any) -> None:
    settings.TIERED_CACHE = {"REPLICA_ACKS": acks}
    assert check_settings() == []


@pytest.mark.parametrize("shards", [0, -2, 2.0, "12", False, 16384])
def test_e013_shards_not_a_count(settings: Any, shards: Any) -> None:
    settings.TIERED_CACHE = {"SHARDS": shards}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E013"]
    assert "SHARDS" in msgs[0].msg


def test_e012_replica_ack_timeout_not_below_the_socket_timeout(settings: Any) -> None:
    settings.TIERED_CACHE = {"REPLICA_ACK_TIMEOUT": 0.2, "SOCKET_TIMEOUT": 0.1}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E012"]
    assert "REPLICA_ACK_TIMEOUT" in msgs[0].msg and "SOCKET_TIMEOUT" in msgs[0].msg


def test_w002_unknown_key(settings: Any) -> None:
    settings.TIERED_CACHE = {"L1_MAX_ENTRYS": 5}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.W002"]
    assert "L1_MAX_ENTRYS" in msgs[0].msg


@isolate_apps("tests.testapp")
def test_e005_unknown_field_and_w001_non_unique() -> None:
    class Thing(models.Model):
        code = models.CharField(max_length=10, unique=True)
        group = models.CharField(max_length=10)
        kind = models.CharField(max_length=10)

        objects = CachedManager(
            lookups=["code", "nope", "group", ("group", "kind"), ("code", "kind")]
        )

        class Meta:
            app_label = "testapp"

    msgs = check_manager(Thing.objects)
    assert ids(msgs) == ["tiered_cache.E005", "tiered_cache.W001", "tiered_cache.W001"]
    assert "'nope'" in msgs[0].msg
    assert "('group',)" in msgs[1].msg and "('group', 'kind')" in msgs[2].msg


@isolate_apps("tests.testapp")
def test_unique_constraint_counts_as_unique() -> None:
    class Pair(models.Model):
        a = models.CharField(max_length=10)
        b = models.CharField(max_length=10)

        objects = CachedManager(lookups=[("a", "b")])

        class Meta:
            app_label = "testapp"
            constraints = [models.UniqueConstraint(fields=["a", "b"], name="pair_ab")]

    assert check_manager(Pair.objects) == []


@isolate_apps("tests.testapp")
def test_e007_lookup_on_a_reverse_relation() -> None:
    class Parent(models.Model):
        objects = CachedManager(lookups=["child"])

        class Meta:
            app_label = "testapp"

    class Child(models.Model):
        parent = models.ForeignKey(Parent, models.CASCADE, related_name="child")

        class Meta:
            app_label = "testapp"

    assert ids(check_manager(Parent.objects)) == ["tiered_cache.E007"]
    # A process that skipped the checks gets the same error, not an AttributeError.
    with pytest.raises(ImproperlyConfigured, match="'child' must name a concrete field"):
        Parent.objects.get_cached(child=1)


@pytest.mark.parametrize("seconds", [-1, "5", True, 3601, None])
def test_e014_outage_stale_seconds_not_a_bounded_number(settings: Any, seconds: Any) -> None:
    settings.TIERED_CACHE = {"OUTAGE_STALE_SECONDS": seconds}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E014"]
    assert "OUTAGE_STALE_SECONDS" in msgs[0].msg


@pytest.mark.parametrize("seconds", [0, 0.5, 5, 3600])
def test_outage_stale_seconds_in_range_pass(settings: Any, seconds: Any) -> None:
    settings.TIERED_CACHE = {"OUTAGE_STALE_SECONDS": seconds}
    assert check_settings() == []


@pytest.mark.parametrize("interval", [0, -0.001, "0.001", True, 1.0])
def test_e015_gil_switch_interval_out_of_range(settings: Any, interval: Any) -> None:
    settings.TIERED_CACHE = {"GIL_SWITCH_INTERVAL": interval}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E015"]
    assert "GIL_SWITCH_INTERVAL" in msgs[0].msg


@pytest.mark.parametrize("interval", [None, 0.0005, 0.005])
def test_gil_switch_interval_none_or_in_range_pass(settings: Any, interval: Any) -> None:
    settings.TIERED_CACHE = {"GIL_SWITCH_INTERVAL": interval}
    assert check_settings() == []


@isolate_apps("tests.testapp")
def test_e017_a_managers_timeouts_are_positive() -> None:
    """A timeout under a millisecond made every fill `SET ... PX 0`, an error reply that
    counts towards the breaker."""

    class Timed(models.Model):
        zero = CachedManager(timeout=0)
        negative = CachedManager(negative_timeout=-1)
        text = CachedManager(l1_timeout="60")
        endless = CachedManager(timeout=float("inf"))
        fine = CachedManager(timeout=0.5, l1_timeout=0, negative_timeout=None)

        class Meta:
            app_label = "testapp"

    for name in ("zero", "negative", "text", "endless"):
        msgs = check_manager(getattr(Timed, name))
        assert ids(msgs) == ["tiered_cache.E017"], name
        assert "finite number of seconds" in msgs[0].msg
    assert check_manager(Timed.fine) == []


@pytest.mark.parametrize(
    ("lookups", "named"),
    [
        # "email" was read as the lookups e, m, a, i, l: one error per letter.
        (
            "code",
            "lookups='code' is a string; declare a list of field names or tuples of them; "
            "did you mean lookups=['code']?",
        ),
        ([1], "1 is not a field name or a tuple of field names"),
        (["code", ()], "() is not a field name"),
        ([("code", 2)], "('code', 2) is not a field name"),
        (5, "lookups=5: declare a list of field names"),
    ],
)
@isolate_apps("tests.testapp")
def test_e005_lookups_of_other_types_name_the_one(lookups: Any, named: str) -> None:
    """lookups=[1] crashed the checks with a TypeError about tuple(); a string was split."""
    with pytest.raises(ImproperlyConfigured, match=re.escape(named)):
        CachedManager(lookups=lookups)

    class Mixed(CachedManagerMixin, models.Manager):  # type: ignore[type-arg]
        cache_lookups = lookups

    class Coded(models.Model):
        code = models.CharField(max_length=10, unique=True)
        objects = Mixed()

        class Meta:
            app_label = "testapp"

    msgs = check_manager(Coded.objects)
    assert ids(msgs) == ["tiered_cache.E005"]
    assert named.replace("lookups=", "cache_lookups=") in msgs[0].msg


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_e003_timeouts_are_finite(settings: Any, value: float) -> None:
    """An infinite TIMEOUT passed the check, then every save() raised OverflowError."""
    settings.TIERED_CACHE = {"TIMEOUT": value, "LEASE_TIMEOUT": value}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E003", "tiered_cache.E003"]
    assert "positive finite number" in msgs[0].msg


@pytest.mark.parametrize(
    ("lookup", "twice"),
    [(("code", "code"), "code"), (("pk", "id"), "pk"), (("group", "group_id"), "group")],
)
@isolate_apps("tests.testapp")
def test_e005_a_lookup_that_names_one_field_twice(lookup: tuple[str, ...], twice: str) -> None:
    """No call can give both keywords of ("pk", "id"): the lookup could never be used."""
    from tiered_cache.registry import model_cache

    class Group(models.Model):
        class Meta:
            app_label = "testapp"

    class Coded(models.Model):
        group = models.ForeignKey(Group, on_delete=models.CASCADE)
        code = models.CharField(max_length=10, unique=True)
        objects = CachedManager(lookups=[lookup])

        class Meta:
            app_label = "testapp"

    msgs = check_manager(Coded.objects)
    assert ids(msgs) == ["tiered_cache.E005"]
    assert f"cache lookup {lookup!r} names field {twice!r} twice" in msgs[0].msg
    with pytest.raises(ImproperlyConfigured, match=f"names field '{twice}' twice"):
        model_cache(Coded.objects)  # where the checks did not run


@isolate_apps("tests.testapp")
def test_e005_a_childs_pk_named_by_its_parents_name_too() -> None:
    """A multi-table child's `id` is its parent's pk, the child's pk too."""
    from tests.testapp.models import Place

    class Stall(Place):
        objects = CachedManager(lookups=[("pk", "id")])

        class Meta:
            app_label = "testapp"

    msgs = check_manager(Stall.objects)
    assert ids(msgs) == ["tiered_cache.E005"]
    assert "names field 'pk' twice" in msgs[0].msg


@pytest.mark.parametrize("name", ["TIMEOUT", "NEGATIVE_TIMEOUT", "L1_TIMEOUT", "LEASE_TIMEOUT"])
def test_e003_expiries_redis_can_store(settings: Any, name: str) -> None:
    """TIMEOUT=1e17 passed as finite, and every fill then failed: no L2 at all, silently."""
    settings.TIERED_CACHE = {name: 1e17}
    msgs = check_settings()
    assert ids(msgs) == ["tiered_cache.E003"]
    assert f"TIERED_CACHE['{name}'] must be under 10**9 seconds" in msgs[0].msg
    settings.TIERED_CACHE = {name: 10**9 - 1}
    assert check_settings() == []
