"""System checks: every TIERED_CACHE setting and every declared lookup, at startup."""

from __future__ import annotations

import numbers
from typing import Any
from urllib.parse import parse_qs, urlparse

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning
from django.core.exceptions import FieldDoesNotExist, ImproperlyConfigured
from django.utils.module_loading import import_string
from django_redis.cache import RedisCache
from django_redis.client.sentinel import SentinelClient, replace_query
from django_redis.pool import SentinelConnectionFactory

from .conf import DEFAULTS, conf
from .derived import cached_functions
from .registry import (
    cached_managers,
    djangos_exact,
    is_column,
    is_composite_pk,
    pk_names,
    repeated,
    uncacheable_reason,
    unique_sets,
)

__all__ = ["check_lookups", "check_manager", "check_settings"]

# Counts and sizes: a fraction of an entry or a byte means nothing, and would pass every
# comparison the code makes with it.
_WHOLE = (
    "L1_MAX_ENTRIES",
    "L1_MAX_BYTES",
    "BREAKER_FAILURE_THRESHOLD",
    "BREAKER_SUCCESS_THRESHOLD",
    "BULK_INVALIDATION_LIMIT",
    "OUTBOX_LIMIT",
)
# Timeouts an entry's expiry is made of (in Redis, or next to it in L1), bounded as a
# manager's are (E017).
_EXPIRIES = ("TIMEOUT", "NEGATIVE_TIMEOUT", "L1_TIMEOUT", "LEASE_TIMEOUT")
_POSITIVE = (
    *_WHOLE,
    "L1_TIMEOUT",
    "TIMEOUT",
    "NEGATIVE_TIMEOUT",
    "SOCKET_TIMEOUT",
    "SOCKET_CONNECT_TIMEOUT",
    "BREAKER_RECOVERY_TIME",
    "LEASE_TIMEOUT",
    "LEASE_WAIT",
    "BUS_HEARTBEAT",
    "BUS_TRUST_WINDOW",
    "STATS_FLUSH_INTERVAL",
    "REPLICA_ACK_TIMEOUT",
)


def check_settings(**kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    raw = getattr(settings, "TIERED_CACHE", {})
    if not isinstance(raw, dict):
        return [Error("TIERED_CACHE must be a dict.", id="tiered_cache.E004")]
    for name in sorted(set(raw) - set(DEFAULTS)):
        errors.append(
            Warning(
                f"TIERED_CACHE has an unknown key {name!r}.",
                hint="Known keys: " + ", ".join(sorted(DEFAULTS)),
                id="tiered_cache.W002",
            )
        )
    alias = conf.CACHE_ALIAS
    caches = getattr(settings, "CACHES", {})
    if not isinstance(alias, str):
        errors.append(
            Error(
                f"TIERED_CACHE['CACHE_ALIAS'] must be the name of a CACHES entry, not {alias!r}.",
                hint="Name a django-redis cache from CACHES.",
                id="tiered_cache.E001",
            )
        )
    elif alias not in caches:
        errors.append(
            Error(
                f"TIERED_CACHE['CACHE_ALIAS'] is {alias!r}, which is not in CACHES.",
                hint="Name a django-redis cache from CACHES.",
                id="tiered_cache.E001",
            )
        )
    elif not str(caches[alias].get("BACKEND", "")).startswith("django_redis.") and not _subclass(
        caches[alias].get("BACKEND"), RedisCache
    ):  # a project's own subclass of django-redis's cache is django-redis too
        errors.append(
            Error(
                f"CACHES[{alias!r}] uses {caches[alias].get('BACKEND')!r}; tiered_cache needs "
                "django-redis as its L2.",
                hint='Set BACKEND to "django_redis.cache.RedisCache".',
                id="tiered_cache.E002",
            )
        )
    else:
        errors.extend(_pool_sharing(alias, caches))
    for name in _POSITIVE:
        value = raw.get(name, DEFAULTS[name])
        if (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not 0 < float(value) < float("inf")  # NaN fails this too
        ):
            errors.append(
                Error(
                    f"TIERED_CACHE[{name!r}] must be a positive finite number, not {value!r}.",
                    id="tiered_cache.E003",
                )
            )
        elif name in _EXPIRIES and value >= 10**9:
            errors.append(
                Error(
                    f"TIERED_CACHE[{name!r}] must be under 10**9 seconds (31 years), not "
                    f"{value!r}.",
                    hint="Redis refuses an expiry past its 64-bit milliseconds (every fill "
                    "would fail, and reads would all go to the database); L1's is bounded "
                    "alike.",
                    id="tiered_cache.E003",
                )
            )
        elif name in _WHOLE and not (
            isinstance(value, numbers.Integral) or float(value).is_integer()
        ):  # 1e4 is a whole number written as a float
            errors.append(
                Error(
                    f"TIERED_CACHE[{name!r}] must be a positive whole number, not {value!r}.",
                    id="tiered_cache.E003",
                )
            )
    for name, least, most, none_ok, hint, check_id in (
        (
            "OUTAGE_STALE_SECONDS",
            0,
            3600,
            False,
            "It bounds how stale a row L1 serves while Redis is unreachable; 0 is off.",
            "E014",
        ),
        (
            "GIL_SWITCH_INTERVAL",
            0.0001,
            0.1,
            True,
            "None leaves sys.setswitchinterval() alone; 0.001 is the default.",
            "E015",
        ),
    ):
        value = raw.get(name, DEFAULTS[name])
        if (value is not None or not none_ok) and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not least <= value <= most
        ):
            errors.append(
                Error(
                    f"TIERED_CACHE[{name!r}] must be {'None or ' if none_ok else ''}a number "
                    f"of seconds from {least} to {most}, not {value!r}.",
                    hint=hint,
                    id=f"tiered_cache.{check_id}",
                )
            )
    heartbeat = raw.get("BUS_HEARTBEAT", DEFAULTS["BUS_HEARTBEAT"])
    window = raw.get("BUS_TRUST_WINDOW", DEFAULTS["BUS_TRUST_WINDOW"])
    if (
        all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in (heartbeat, window))
        and heartbeat >= window
    ):
        errors.append(
            Error(
                f"TIERED_CACHE['BUS_HEARTBEAT'] ({heartbeat!r}) must be less than "
                f"BUS_TRUST_WINDOW ({window!r}): trust would lapse before a reading process "
                "asks for the next heartbeat.",
                hint="Keep BUS_HEARTBEAT at about half of BUS_TRUST_WINDOW.",
                id="tiered_cache.E010",
            )
        )
    for name, least, most, hint, check_id in (
        ("REPLICA_ACKS", 0, 1000, "None waits for 1 replica on Sentinel or a cluster.", "E011"),
        # One shard per range of slots: past that, ranges too small to find a tag in.
        ("SHARDS", 1, 1024, "None: 12 on a Redis Cluster, else 1.", "E013"),
    ):
        value = raw.get(name, DEFAULTS[name])
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most
        ):
            errors.append(
                Error(
                    f"TIERED_CACHE[{name!r}] must be None or a whole number from {least} to "
                    f"{most}, not {value!r}.",
                    hint=hint,
                    id=f"tiered_cache.{check_id}",
                )
            )
    ack_timeout = raw.get("REPLICA_ACK_TIMEOUT", DEFAULTS["REPLICA_ACK_TIMEOUT"])
    socket_timeout = raw.get("SOCKET_TIMEOUT", DEFAULTS["SOCKET_TIMEOUT"])
    if (
        all(
            isinstance(v, numbers.Real) and not isinstance(v, bool)
            for v in (ack_timeout, socket_timeout)
        )
        and 0 < socket_timeout <= ack_timeout
    ):
        errors.append(
            Error(
                f"TIERED_CACHE['REPLICA_ACK_TIMEOUT'] ({ack_timeout!r}) must be less than "
                f"SOCKET_TIMEOUT ({socket_timeout!r}): the wait for replicas would be cut "
                "off as a failed connection.",
                id="tiered_cache.E012",
            )
        )
    prefix = raw.get("KEY_PREFIX", DEFAULTS["KEY_PREFIX"])
    if not isinstance(prefix, str) or not prefix or any(c in prefix for c in "{}| \t\n"):
        errors.append(
            Error(
                f"TIERED_CACHE['KEY_PREFIX'] must be a non-empty string without braces, "
                f"'|' or spaces, not {prefix!r}.",
                id="tiered_cache.E006",
            )
        )
    return errors


def _options(entry: dict[str, Any]) -> dict[str, Any]:
    options = entry.get("OPTIONS")
    return options if isinstance(options, dict) else {}


def _subclass(path: Any, base: type) -> bool:
    try:
        cls = import_string(path) if isinstance(path, str) else path
    except ImportError:
        return False  # django-redis reports it when the cache is first used
    return isinstance(cls, type) and issubclass(cls, base)


def _pool_urls(entry: dict[str, Any]) -> set[str]:
    """The URLs django-redis keys a CACHES entry's connection pools by: LOCATION split on
    commas, or for its SentinelClient a string LOCATION made into the master's URL and the
    replicas' (the client's own rewriting)."""
    location = entry.get("LOCATION") or ""
    if not isinstance(location, str):
        return {str(url).strip() for url in location if str(url).strip()}
    if _subclass(_options(entry).get("CLIENT_CLASS"), SentinelClient):
        url = urlparse(location)
        query = parse_qs(url.query, keep_blank_values=True)
        return {replace_query(url, {**query, "is_master": [flag]}) for flag in (1, 0)}
    return {part.strip() for part in location.split(",") if part.strip()}


def _sentinels(entry: dict[str, Any]) -> Any:
    """The sentinels a Sentinel entry names, None for an entry whose pools reach the URL's
    host itself. In any order, as tuples or lists, the port as a number or a string."""
    options = _options(entry)
    factory = options.get("CONNECTION_FACTORY") or getattr(
        settings, "DJANGO_REDIS_CONNECTION_FACTORY", "django_redis.pool.ConnectionFactory"
    )
    if not _subclass(factory, SentinelConnectionFactory):
        return None
    try:
        return frozenset((str(host), int(port)) for host, port in options.get("SENTINELS") or ())
    except (TypeError, ValueError):
        return repr(options.get("SENTINELS"))


def _pool_sharing(alias: str, caches: dict[str, Any]) -> list[CheckMessage]:
    """django-redis keeps one connection pool per URL for the whole process, whichever
    CACHES entry asked first. When a URL names a Sentinel service ("redis://mymaster/0"),
    the server it reaches depends on the entry's sentinels: two entries that give one URL
    other sentinels (or one of them none) would both reach the first one's server, and our
    invalidations could go to another server than our reads: stale rows."""
    ours = caches[alias]
    urls, sentinels = _pool_urls(ours), _sentinels(ours)
    errors: list[CheckMessage] = []
    for other, entry in caches.items():
        if other == alias or not isinstance(entry, dict):
            continue
        backend = entry.get("BACKEND")
        if not str(backend or "").startswith("django_redis.") and not _subclass(
            backend, RedisCache
        ):
            continue
        shared = sorted(urls & _pool_urls(entry))
        theirs = _sentinels(entry)
        if shared and theirs != sentinels:
            errors.append(
                Error(
                    f"CACHES[{alias!r}] (tiered_cache's) and CACHES[{other!r}] both connect "
                    f"to {shared[0]!r}, through other sentinels (or one of them through "
                    "none); django-redis shares one connection pool per URL in a process, so "
                    "one of them would reach the other's server.",
                    hint="Give each Sentinel setup its own service name (or database "
                    "number) in LOCATION.",
                    id="tiered_cache.E016",
                )
            )
    return errors


def check_lookups(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    errors: list[CheckMessage] = []
    for mgr in cached_managers():
        if app_configs is None or mgr.model._meta.app_config in app_configs:
            errors.extend(check_manager(mgr))
    for fn in cached_functions():
        try:
            missing = fn.unwatched()
        except LookupError as exc:
            errors.append(
                Error(
                    f"@cached function {fn.qualname}: depends_on names a model that is not "
                    f"installed ({exc})",
                    hint="Name installed, concrete models, as app_label.ModelName.",
                    id="tiered_cache.E009",
                )
            )
            continue
        if missing:
            errors.append(
                Error(
                    f"@cached function {fn.qualname} depends on {', '.join(missing)}, which "
                    "has no cached manager: writes to it in processes that never imported "
                    "the function would not drop its results.",
                    hint="Give the model a CachedManager (a second manager is enough).",
                    id="tiered_cache.E009",
                )
            )
    return errors


def check_manager(mgr: Any) -> list[CheckMessage]:
    """The lookups of one cached manager: known concrete fields, and unique ones."""
    errors: list[CheckMessage] = []
    model = mgr.model
    label = model._meta.label
    if is_composite_pk(model):
        return [
            Error(
                f"{label}.{mgr.name}: tiered_cache does not cache models with a composite "
                "primary key (CompositePrimaryKey).",
                hint="Use a plain models.Manager for this model.",
                obj=model,
                id="tiered_cache.E008",
            )
        ]
    # L1's may be 0 (no L1 for it); the others reach Redis, which refuses an entry that
    # expires in under a millisecond, and an infinite one.
    for attr, least in (
        ("cache_timeout", 0.001),
        ("cache_l1_timeout", 0),
        ("cache_negative_timeout", 0.001),
    ):
        value = getattr(mgr, attr, None)
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not least <= value < 10**9
        ):
            errors.append(
                Error(
                    f"{label}.{mgr.name}: {attr.removeprefix('cache_')}={value!r} must be a "
                    f"finite number of seconds from {least} up, or None for the setting's.",
                    hint="Redis refuses an entry that expires in under 1 ms or never: every "
                    "fill would fail.",
                    obj=model,
                    id="tiered_cache.E017",
                )
            )
    reason = uncacheable_reason(mgr)
    if reason is not None:
        errors.append(
            Warning(
                f"{label}.{mgr.name}: {reason}, so get_cached() on it always reads the database.",
                hint="Cache through a manager whose queryset filters only this model's "
                "own columns, and whose get() is Django's.",
                obj=model,
                id="tiered_cache.W003",
            )
        )
    uniques = unique_sets(model)
    try:
        specs = mgr.get_cache_lookups()
    except ImproperlyConfigured as exc:
        return [*errors, Error(f"{label}.{mgr.name}: {exc}", obj=model, id="tiered_cache.E005")]
    for spec in specs:
        names = (spec,) if isinstance(spec, str) else tuple(spec)
        fields = []
        for name in names:
            if name == "pk":
                fields.append(model._meta.pk)
                continue
            try:
                fields.append(model._meta.get_field(name))
            except FieldDoesNotExist:
                errors.append(
                    Error(
                        f"{label}.{mgr.name}: cache lookup {names!r} names unknown field {name!r}.",
                        obj=model,
                        id="tiered_cache.E005",
                    )
                )
        if len(fields) != len(names):
            continue
        pks = pk_names(model)
        twice = repeated(
            [
                "pk" if f is model._meta.pk or n in pks else f.name
                for n, f in zip(names, fields, strict=True)
            ]
        )
        if twice is not None:
            errors.append(
                Error(
                    f"{label}.{mgr.name}: cache lookup {names!r} names field {twice!r} twice.",
                    hint="Name each field of a lookup once (a foreign key by its name or "
                    "its attname, the primary key as pk or by its name).",
                    obj=model,
                    id="tiered_cache.E005",
                )
            )
            continue
        if not all(is_column(f) for f in fields):
            errors.append(
                Error(
                    f"{label}.{mgr.name}: cache lookup {names!r} must name concrete fields.",
                    obj=model,
                    id="tiered_cache.E007",
                )
            )
            continue
        given = {f.name for f in fields}
        if not any(u <= given for u in uniques):
            errors.append(
                Warning(
                    f"{label}.{mgr.name}: cache lookup {names!r} is not unique, so get_cached() "
                    "reads the database for it (a cached row would hide a second match, "
                    "where .get() raises MultipleObjectsReturned).",
                    hint="Add unique=True or a UniqueConstraint over these fields.",
                    obj=model,
                    id="tiered_cache.W001",
                )
            )
        elif not all(djangos_exact(f) for f in fields):
            errors.append(
                Warning(
                    f"{label}.{mgr.name}: cache lookup {names!r} compares with an exact "
                    "lookup registered by the project, which may match several rows of a "
                    "unique column, so get_cached() reads the database for it.",
                    obj=model,
                    id="tiered_cache.W001",
                )
            )
    return errors
