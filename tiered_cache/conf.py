"""The TIERED_CACHE setting, read live so that override_settings works in tests."""

from __future__ import annotations

from typing import Any

from django.conf import settings

DEFAULTS: dict[str, Any] = {
    "CACHE_ALIAS": "default",
    "L1_MAX_ENTRIES": 10_000,
    # L1's bytes too (each entry weighed as stored, tiers/local.weigh): large rows cannot
    # make it hold entries x row size.
    "L1_MAX_BYTES": 32 * 1024 * 1024,
    "L1_TIMEOUT": 300,
    "TIMEOUT": 3600,
    "NEGATIVE_TIMEOUT": 60,
    "KEY_PREFIX": "tc",
    # Redis is never allowed to hold a request for longer than these (seconds).
    "SOCKET_TIMEOUT": 0.1,
    "SOCKET_CONNECT_TIMEOUT": 0.1,
    # Circuit breaker around every L2 and bus operation.
    "BREAKER_FAILURE_THRESHOLD": 3,
    "BREAKER_RECOVERY_TIME": 2.0,
    "BREAKER_SUCCESS_THRESHOLD": 1,
    # How long a filler may hold a key's lease, and how long others wait for its fill.
    "LEASE_TIMEOUT": 2.0,
    "LEASE_WAIT": 0.1,
    # L1 (and L2) are trusted only while a heartbeat (a PING on the bus) sent less than
    # BUS_TRUST_WINDOW ago has been answered. A process that reads asks for one at most
    # every BUS_HEARTBEAT; one that does not read sends none.
    "BUS_HEARTBEAT": 0.2,
    "BUS_TRUST_WINDOW": 0.3,
    # Python's GIL switch interval (sys.setswitchinterval), lowered to this when the bus
    # listener starts if it is higher: a thread waiting for the GIL, the listener with a
    # bus message, gets it after at most this long while request threads run. Python's
    # default, 5 ms, held a drop up to 15 ms behind two busy threads. None: left alone.
    "GIL_SWITCH_INTERVAL": 0.001,
    # Opt-in outage mode: while Redis is unreachable, L1 keeps serving what it holds for at
    # most this many seconds after the bus was lost (bounded staleness), and a miss reaches
    # the database once per key per process. 0: L1 is distrusted the moment the bus is.
    "OUTAGE_STALE_SECONDS": 0,
    # Replicas that must acknowledge an invalidation (WAIT) before it counts as delivered;
    # None: 1 on Sentinel or a cluster, 0 for a single server. Unacknowledged ones go to
    # the outbox (and this process reads the database until they are delivered).
    "REPLICA_ACKS": None,
    "REPLICA_ACK_TIMEOUT": 0.05,
    # Parts each model's keys are spread over (hash slots); None: 1, or 12 on a cluster.
    "SHARDS": None,
    # A queryset write touching more rows than this flushes the model instead.
    "BULK_INVALIDATION_LIMIT": 1000,
    # Rows a process may put in the outbox during one outage; past it, whole models.
    "OUTBOX_LIMIT": 10_000,
    # Seconds between pushes of this process's counters to Redis.
    "STATS_FLUSH_INTERVAL": 5.0,
}


class Settings:
    """Typed view of settings.TIERED_CACHE with the defaults above. Values are read once and
    again after Django's setting_changed (override_settings in tests): the read path asks
    for several on every call, so each is a plain attribute of this object once read (a
    property cost the read path three Python calls a value)."""

    # The system checks (checks.py) hold each value to its type.
    CACHE_ALIAS: str
    L1_MAX_ENTRIES: int
    L1_MAX_BYTES: int
    L1_TIMEOUT: float
    TIMEOUT: float
    NEGATIVE_TIMEOUT: float
    KEY_PREFIX: str
    SOCKET_TIMEOUT: float
    SOCKET_CONNECT_TIMEOUT: float
    BREAKER_FAILURE_THRESHOLD: int
    BREAKER_RECOVERY_TIME: float
    BREAKER_SUCCESS_THRESHOLD: int
    LEASE_TIMEOUT: float
    LEASE_WAIT: float
    BUS_HEARTBEAT: float
    BUS_TRUST_WINDOW: float
    GIL_SWITCH_INTERVAL: float | None
    OUTAGE_STALE_SECONDS: float
    REPLICA_ACKS: int | None
    REPLICA_ACK_TIMEOUT: float
    SHARDS: int | None
    BULK_INVALIDATION_LIMIT: int
    OUTBOX_LIMIT: int
    STATS_FLUSH_INTERVAL: float

    def __getattr__(self, name: str) -> Any:
        # Only for a value not read since the last forget(): every value is set at once.
        if name not in DEFAULTS:
            raise AttributeError(name)
        values = self.raw
        self.__dict__.update((k, values[k]) for k in DEFAULTS)
        return values[name]

    @property
    def raw(self) -> dict[str, Any]:
        given = getattr(settings, "TIERED_CACHE", {})
        return {**DEFAULTS, **(given if isinstance(given, dict) else {})}

    def forget(self, setting: str = "TIERED_CACHE", **kwargs: Any) -> None:
        if setting == "TIERED_CACHE":
            self.__dict__.clear()


conf = Settings()
