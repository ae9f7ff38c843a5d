"""L2: Redis through django-redis's connection settings, every mutation one Lua script."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..breaker import breaker
from ..conf import conf

logger = logging.getLogger("tiered_cache")
T = TypeVar("T")

# Reads a key as a string; a key of another type (someone's junk) is deleted and a miss.
_SGET = """
local function sget(k)
  local v = redis.pcall('GET', k)
  if type(v) == 'table' and v.err then redis.call('DEL', k) return false end
  return v
end
"""

# KEYS: gen, writes, data, lease. ARGV: lease token ('' = none), lease ms, fresh gen,
# row-version key prefix. Returns {1, value} on a valid hit, else {code, gen, writes}
# where code is 0 (no lease asked), 2 (lease granted) or 3 (someone else fills).
# A value is "P|gen|row|rowver|<mac+payload>" or "N|gen|writes||<mac+payload>": a row is
# valid while its row version stands, a "no such row" while the model saw no write.
READ = _SGET + """
local g = sget(KEYS[1])
if not g then g = ARGV[3]; redis.call('SET', KEYS[1], g) end
local w = sget(KEYS[2]) or '0'
local v = sget(KEYS[3])
if v then
  local kind, vg, a, b = string.match(v, '^(%u)|([^|]*)|([^|]*)|([^|]*)|')
  if vg == g then
    if kind == 'N' and a == w then return {1, v} end
    if kind == 'P' and sget(ARGV[4] .. a) == b then return {1, v} end
  end
end
if ARGV[1] == '' then return {0, g, w} end
if redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, g, w} end
return {3, g, w}
"""

# KEYS: gen, writes, data, lease, row-version key (positive fills).
# ARGV: lease token ('' = none), gen seen, writes seen, kind 'P'/'N', row id, body,
# ttl ms, fresh row version, row version ttl ms.
# Refused (0) if the model was flushed or written since the reader's first look: that
# is what keeps a row read before a commit from being stored after its invalidation.
FILL = _SGET + """
if sget(KEYS[1]) ~= ARGV[2] or (sget(KEYS[2]) or '0') ~= ARGV[3] then return 0 end
if ARGV[1] ~= '' and sget(KEYS[4]) ~= ARGV[1] then return 0 end
local hdr
if ARGV[4] == 'N' then
  hdr = 'N|' .. ARGV[2] .. '|' .. ARGV[3] .. '||'
else
  local rv = sget(KEYS[5])
  if rv then redis.call('PEXPIRE', KEYS[5], ARGV[9])
  else rv = ARGV[8]; redis.call('SET', KEYS[5], rv, 'PX', ARGV[9]) end
  hdr = 'P|' .. ARGV[2] .. '|' .. ARGV[5] .. '|' .. rv .. '|'
end
redis.call('SET', KEYS[3], hdr .. ARGV[6], 'PX', ARGV[7])
if ARGV[1] ~= '' then redis.call('DEL', KEYS[4]) end
return 1
"""

# KEYS: gen, writes, row-version keys (ARGV[3] of them), then data keys to delete.
# ARGV: channel, message, number of row keys, fresh token, row version ttl ms,
# flush '1'/'0', fresh gen. New row versions make every entry of those rows invalid,
# under whatever lookup it was stored, without knowing the old lookup values.
INVALIDATE = _SGET + """
local w = redis.pcall('INCR', KEYS[2])
if type(w) == 'table' and w.err then redis.call('DEL', KEYS[2]); redis.call('INCR', KEYS[2]) end
local n = tonumber(ARGV[3])
for i = 3, 2 + n do redis.call('SET', KEYS[i], ARGV[4] .. ':' .. i, 'PX', ARGV[5]) end
for i = 3 + n, #KEYS do redis.call('DEL', KEYS[i]) end
if ARGV[6] == '1' then redis.call('SET', KEYS[1], ARGV[7]) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""


# KEYS: counters to bump (derived functions' mirrors of model write counts).
BUMP = _SGET + """
for i = 1, #KEYS do
  local w = redis.pcall('INCR', KEYS[i])
  if type(w) == 'table' and w.err then redis.call('DEL', KEYS[i]); redis.call('INCR', KEYS[i]) end
end
return 1
"""

# Derived (cached function) entries. KEYS: gen, data, then one write counter per dependency.
# ARGV: fresh gen. A value is "D|gen|w1,w2,...|<mac+payload>", valid while every
# dependency's counter is unchanged; "T|token" is a tombstone left by fn.invalidate().
DREAD = _SGET + """
local g = sget(KEYS[1])
if not g then g = ARGV[1]; redis.call('SET', KEYS[1], g) end
local ws = {}
for i = 3, #KEYS do ws[#ws + 1] = sget(KEYS[i]) or '0' end
local wstr = table.concat(ws, ',')
local v = sget(KEYS[2])
if v then
  local kind, vg, vw = string.match(v, '^(%u)|([^|]*)|([^|]*)|')
  if kind == 'D' and vg == g and vw == wstr then return {1, v} end
  if string.sub(v, 1, 2) == 'T|' then return {0, g, wstr, v} end
end
return {0, g, wstr, ''}
"""

# KEYS as DREAD. ARGV: gen seen, counters seen, tombstone seen ('' = none), body, ttl ms.
DFILL = _SGET + """
if sget(KEYS[1]) ~= ARGV[1] then return 0 end
local ws = {}
for i = 3, #KEYS do ws[#ws + 1] = sget(KEYS[i]) or '0' end
if table.concat(ws, ',') ~= ARGV[2] then return 0 end
local cur = sget(KEYS[2])
if cur and string.sub(cur, 1, 2) == 'T|' and cur ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[2], 'D|' .. ARGV[1] .. '|' .. ARGV[2] .. '|' .. ARGV[4], 'PX', ARGV[5])
return 1
"""

# KEYS: data. ARGV: tombstone, ttl ms, channel, message.
DDROP = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

_SOURCES = {"read": READ, "fill": FILL, "inv": INVALIDATE, "bump": BUMP, "dread": DREAD,
            "dfill": DFILL, "ddrop": DDROP}


class Unavailable(Exception):
    """Redis was not used for this call: the breaker is open or the call failed."""


def fresh_token() -> str:
    return secrets.token_hex(8)


class RedisTier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._pid = 0
        self._scripts: dict[str, Any] = {}

    # -- connection ----------------------------------------------------------
    def connection_kwargs(self, **overrides: Any) -> tuple[type, dict[str, Any]]:
        """django-redis's connection settings for our alias, with our timeouts and no
        client-side retries: a cache call must fail fast, the breaker decides what next."""
        from django_redis import get_redis_connection

        pool = get_redis_connection(conf.CACHE_ALIAS).connection_pool
        kwargs = dict(pool.connection_kwargs)
        for k in ("retry_on_error", "retry_on_timeout", "health_check_interval"):
            kwargs.pop(k, None)
        kwargs.update(
            socket_timeout=conf.SOCKET_TIMEOUT,
            socket_connect_timeout=conf.SOCKET_CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        kwargs.update(overrides)
        return pool.connection_class, kwargs

    @property
    def client(self) -> redis.Redis:
        c = self._client
        if c is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    cls, kwargs = self.connection_kwargs()
                    pool = redis.ConnectionPool(connection_class=cls, **kwargs)
                    self._client = redis.Redis(connection_pool=pool)
                    self._scripts = {
                        name: self._client.register_script(src)
                        for name, src in _SOURCES.items()
                    }
                    self._pid = os.getpid()
            c = self._client
        assert c is not None
        return c

    def reset(self) -> None:
        """Forget the client (after fork, or when settings change in tests)."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                self._client.connection_pool.disconnect()
            self._client = None

    def script(self, name: str) -> Any:
        self.client  # noqa: B018 - builds the scripts
        return self._scripts[name]

    # -- calls through the breaker ---------------------------------------------
    def call(self, fn: Callable[[], T]) -> T:
        if not breaker.allow():
            raise Unavailable("circuit open")
        try:
            result = fn()
        except (redis.RedisError, OSError) as exc:
            breaker.failure()
            logger.warning("tiered_cache: Redis call failed: %r", exc)
            raise Unavailable(str(exc)) from exc
        breaker.success()
        return result

    def read(self, keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        s = self.script("read")
        return self.call(lambda: s(keys=keys, args=args))

    def read_many(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        s = self.script("read")

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                s(keys=keys, args=args, client=pipe)
            return pipe.execute()

        return self.call(run)

    def fill_many(self, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]) -> list[Any]:
        s = self.script("fill")
        if len(calls) == 1:
            keys, args = calls[0]
            return [self.call(lambda: s(keys=keys, args=args))]

        def run() -> list[Any]:
            pipe = self.client.pipeline(transaction=False)
            for keys, args in calls:
                s(keys=keys, args=args, client=pipe)
            return pipe.execute()

        return self.call(run)

    def run_many(self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Several scripts, by name, in one round trip (each script is atomic on its own)."""
        client = self.client
        scripts = self._scripts

        def run() -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for name, keys, args in calls:
                scripts[name](keys=keys, args=args, client=pipe)
            return pipe.execute()

        return self.call(run)


redis_tier = RedisTier()
