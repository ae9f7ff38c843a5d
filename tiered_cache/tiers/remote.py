"""L2: Redis through django-redis's connection settings, every mutation one Lua script."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from ..breaker import breaker
from ..conf import conf

logger = logging.getLogger("tiered_cache")
T = TypeVar("T")

# Reads a key as a string; a key of another type (someone's junk) is deleted and a miss.
# A generation must be a token ([%w:_-]): junk there (a '|' would make every value of the
# model unparsable, a miss forever) is replaced by a fresh one, i.e. the model is flushed.
# A lease key without an expiry is not a lease (junk, or a lost PX): it is taken over, or
# every reader of that key would wait LEASE_WAIT for a fill that never comes.
_SGET = """
local function sget(k)
  local v = redis.pcall('GET', k)
  if type(v) == 'table' and v.err then redis.call('DEL', k) return false end
  return v
end
"""

# Whether value v is valid for generation g and write count w: a row while its row
# version stands, a "no such row" while the model saw no write since it was stored.
# A value is "kind|gen|row id|version|expiry|" + MAC + body; for "no such row" (N) the row
# id is empty and the version is the write count it was stored under.
_VALID = """
local function valid(v, g, w, rowprefix)
  local kind, vg, rid, ver = string.match(v, '^(%u)|([^|]*)|([^|]*)|([^|]*)|')
  if vg ~= g then return false end
  if kind == 'N' then return ver == w end
  if kind == 'P' then return sget(rowprefix .. rid) == ver end
  return false
end
local function generation(k, fresh)
  local g = sget(k)
  if not g or string.find(g, '[^%w:_-]') then g = fresh; redis.call('SET', k, g) end
  return g
end
"""

# KEYS: gen, writes, data, lease. ARGV: lease token ('' = none), lease ms, fresh gen,
# row-version key prefix. Returns {1, value} on a valid hit, else {code, gen, writes}
# where code is 0 (no lease asked), 2 (lease granted) or 3 (someone else fills).
# A value is "P|gen|row|rowver|<mac+payload>" or "N|gen|writes||<mac+payload>": a row is
# valid while its row version stands, a "no such row" while the model saw no write.
READ = (
    _SGET
    + _VALID
    + """
local g = generation(KEYS[1], ARGV[3])
local w = sget(KEYS[2]) or '0'
local v = sget(KEYS[3])
if v and valid(v, g, w, ARGV[4]) then return {1, v} end
if ARGV[1] == '' then return {0, g, w} end
if redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, g, w} end
if redis.call('PTTL', KEYS[4]) == -1 then
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
  return {2, g, w}
end
return {3, g, w}
"""
)

# KEYS: gen, writes, then data keys. ARGV: lease ms, fresh gen, row-version key prefix,
# then one lease token per data key ('' = none). Returns {gen, writes, r1, r2, ...}: each
# r is the value of a valid hit, or 2 (lease granted) or 3 (no lease) for a miss.
# Lease keys are the data keys plus '|L', in the same hash slot.
READ_MANY = (
    _SGET
    + _VALID
    + """
local g = generation(KEYS[1], ARGV[2])
local w = sget(KEYS[2]) or '0'
local out = {g, w}
for i = 3, #KEYS do
  local v = sget(KEYS[i])
  if v and valid(v, g, w, ARGV[3]) then
    out[#out + 1] = v
  else
    local tok = ARGV[i + 1]
    if tok ~= '' and (redis.call('SET', KEYS[i] .. '|L', tok, 'NX', 'PX', ARGV[1])
        or (redis.call('PTTL', KEYS[i] .. '|L') == -1
            and redis.call('SET', KEYS[i] .. '|L', tok, 'PX', ARGV[1]))) then
      out[#out + 1] = 2
    else
      out[#out + 1] = 3
    end
  end
end
return out
"""
)

# KEYS: gen, writes, data, lease, row-version key (positive fills).
# ARGV: lease token ('' = none), gen seen, writes seen, kind 'P'/'N', value (header, MAC
# and body, signed by the filler), ttl ms, row version in the value's header, row version
# ttl ms. Returns 1 (stored), 0 (refused) or {2, current row version}: the row already has
# a version other than the one signed, and the filler signs again with it.
# Refused if the model was flushed or written since the reader's first look: that is what
# keeps a row read before a commit from being stored after its invalidation. A refused
# filler still gives its lease back, or every other reader of the key would wait
# LEASE_WAIT for a fill that never comes, until the lease expires.
FILL = (
    _SGET
    + """
if sget(KEYS[1]) ~= ARGV[2] or (sget(KEYS[2]) or '0') ~= ARGV[3] then
  if ARGV[1] ~= '' and sget(KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
  return 0
end
if ARGV[1] ~= '' and sget(KEYS[4]) ~= ARGV[1] then return 0 end
if ARGV[4] == 'P' then
  local rv = sget(KEYS[5])
  -- A row version is a token too: junk there (a '|') would make the row unservable.
  if rv and not string.find(rv, '[^%w:_-]') then
    if rv ~= ARGV[7] then return {2, rv} end
    redis.call('PEXPIRE', KEYS[5], ARGV[8])
  else
    redis.call('SET', KEYS[5], ARGV[7], 'PX', ARGV[8])
  end
end
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
if ARGV[1] ~= '' then redis.call('DEL', KEYS[4]) end
return 1
"""
)

# KEYS: gen, writes, then row-version keys (ARGV[3] of them).
# ARGV: channel, message, number of row keys, fresh token, row version ttl ms,
# flush '1'/'0', fresh gen. New row versions make every entry of those rows invalid,
# under whatever lookup it was stored, without knowing the old lookup values.
# A write counter that cannot be incremented (junk in it, or INCR refused when Redis is
# out of memory) is replaced by a fresh token, never reset to a value it held before: a
# fill that saw the old value would then pass although the model was written (ABA).
INVALIDATE = (
    _SGET
    + """
local w = redis.pcall('INCR', KEYS[2])
if type(w) == 'table' and w.err then
  redis.call('DEL', KEYS[2]); redis.call('SET', KEYS[2], ARGV[4] .. ':w')
end
local n = tonumber(ARGV[3])
for i = 3, 2 + n do redis.call('SET', KEYS[i], ARGV[4] .. ':' .. i, 'PX', ARGV[5]) end
if ARGV[6] == '1' then redis.call('SET', KEYS[1], ARGV[7]) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""
)


# KEYS: counters to bump (derived functions' mirrors of model write counts).
# ARGV: a fresh token, for a counter that cannot be incremented (as in INVALIDATE).
BUMP = (
    _SGET
    + """
for i = 1, #KEYS do
  local w = redis.pcall('INCR', KEYS[i])
  if type(w) == 'table' and w.err then
    redis.call('DEL', KEYS[i])
    if ARGV[1] then redis.call('SET', KEYS[i], ARGV[1] .. ':' .. i)
    else redis.call('INCR', KEYS[i]) end
  end
end
return 1
"""
)

# Derived (cached function) entries. KEYS: gen, data, then one write counter per dependency.
# ARGV: fresh gen. A value is "D|gen|w1,w2,...|<mac+payload>", valid while every
# dependency's counter is unchanged; "T|token" is a tombstone left by fn.invalidate().
DREAD = (
    _SGET
    + """
local g = sget(KEYS[1])
if not g or string.find(g, '[^%w:_-]') then g = ARGV[1]; redis.call('SET', KEYS[1], g) end
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
)

# KEYS as DREAD. ARGV: gen seen, counters seen, tombstone seen ('' = none), value (the
# "D|gen|counters|expiry|" header, MAC and body, signed by the caller), ttl ms.
DFILL = (
    _SGET
    + """
if sget(KEYS[1]) ~= ARGV[1] then return 0 end
local ws = {}
for i = 3, #KEYS do ws[#ws + 1] = sget(KEYS[i]) or '0' end
if table.concat(ws, ',') ~= ARGV[2] then return 0 end
local cur = sget(KEYS[2])
if cur and string.sub(cur, 1, 2) == 'T|' and cur ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
return 1
"""
)

# KEYS: data. ARGV: tombstone, ttl ms, channel, message.
DDROP = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""

_SOURCES = {
    "read": READ,
    "read_many": READ_MANY,
    "fill": FILL,
    "inv": INVALIDATE,
    "bump": BUMP,
    "dread": DREAD,
    "dfill": DFILL,
    "ddrop": DDROP,
}


class Unavailable(Exception):
    """Redis was not used for this call: the breaker is open or the call failed."""


try:
    from hiredis import pack_command as _pack
except ImportError:  # pragma: no cover - hiredis is a dependency, but stay usable without
    _pack = None


class _Tokens:
    """Unique tokens for leases, generations and row versions: a random prefix per process
    (new after fork) and a counter. They need to be unique, not secret, and os.urandom
    costs tens of microseconds on some machines."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.prefix = secrets.token_hex(6)
        self.counter = itertools.count()

    def __call__(self) -> str:
        return f"{self.prefix}{next(self.counter):x}"


fresh_token = _Tokens()


class RedisTier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: redis.Redis | None = None
        self._pid = 0
        self._scripts: dict[str, Any] = {}
        # Each thread keeps one connection for the scripts of the read and write paths:
        # taking one from the pool and giving it back costs a third of a round trip.
        self._local = threading.local()
        self._shas = {
            name: hashlib.sha1(src.encode()).hexdigest() for name, src in _SOURCES.items()
        }
        self._fills: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._filler: threading.Thread | None = None
        self._filler_pid = 0
        # Called with the seconds each successful script round trip took (metrics).
        self.latency_hook: Callable[[float], None] | None = None

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
                    # Each thread holds a connection made by make_connection() that never
                    # goes back to the pool, and a failed one is replaced: redis-py 8's
                    # default cap of 100 would make every call fail for good after 100
                    # threads or failures in the life of the process.
                    pool = redis.ConnectionPool(
                        connection_class=cls, max_connections=2**31, **kwargs
                    )
                    self._client = redis.Redis(connection_pool=pool)
                    self._scripts = {
                        name: self._client.register_script(src) for name, src in _SOURCES.items()
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
        self._local = threading.local()

    def _conn(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid() or local.client is not self._client:
            client = self.client
            conn = client.connection_pool.make_connection()
            local.conn, local.pid, local.client = conn, os.getpid(), client
        elif getattr(conn, "_sock", None) is not None:
            # A held connection the server closed (restart, CLIENT KILL, idle timeout)
            # would fail the next call and count against the breaker: check, as redis-py's
            # pool does on every checkout, and reconnect on the next send instead.
            try:
                dead = conn.can_read()
            except (redis.RedisError, OSError):
                dead = True
            if dead:
                conn.disconnect()
        return conn

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            try:
                conn.disconnect()
            except Exception:
                pass
        self._local.conn = None

    def scripts(
        self, calls: Sequence[tuple[str, Sequence[Any], Sequence[Any]]], force: bool = False
    ) -> list[Any]:
        """Run scripts by name in one round trip on this thread's connection, through the
        breaker. Raises Unavailable on any failure (the connection is then dropped).
        force=True tries even while the breaker is open (the bus listener delivering the
        outbox right after Redis answered its heartbeat); the outcome still counts."""
        if not breaker.allow() and not force:  # allow() first: it may start a probe
            raise Unavailable("circuit open")
        t0 = time.perf_counter()
        try:
            out = self._send(calls)
            missing = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
            if missing:
                # Redis restarted or its script cache was flushed: load and run again.
                conn = self._conn()
                for name in {calls[i][0] for i in missing}:
                    conn.send_command("SCRIPT", "LOAD", _SOURCES[name])
                    conn.read_response()
                again = self._send([calls[i] for i in missing])
                for i, r in zip(missing, again, strict=False):
                    out[i] = r
            for r in out:
                if isinstance(r, ResponseError):
                    raise r
        except (redis.RedisError, OSError) as exc:
            self._drop_conn()
            breaker.failure(exc)
            raise Unavailable(str(exc)) from exc
        breaker.success()
        if self.latency_hook is not None:
            self.latency_hook(time.perf_counter() - t0)
        return out

    def _send(self, calls: Sequence[tuple[str, Sequence[Any], Sequence[Any]]]) -> list[Any]:
        conn = self._conn()
        shas = self._shas
        commands = [("EVALSHA", shas[name], len(keys), *keys, *args) for name, keys, args in calls]
        if _pack is not None:  # hiredis packs in C; redis-py's own packer is Python
            conn.send_packed_command([b"".join([_pack(c) for c in commands])], check_health=False)
        elif len(commands) == 1:
            conn.send_command(*commands[0])
        else:
            conn.send_packed_command(conn.pack_commands(commands))
        out: list[Any] = []
        for _ in commands:
            try:
                out.append(conn.read_response())
            except ResponseError as exc:  # the reply was read whole: the stream stays in step
                out.append(exc)
        return out

    def run_fills(self, fills: Sequence[Any]) -> list[Any]:
        """Run FILL scripts for objects with .version and .call(version): one round trip,
        and a second for the fills whose row already had another version (signed again
        with it; the write counter check still guards them). 1 stored, 0 refused."""
        out = self.scripts([f.call(f.version) for f in fills])
        retry = [i for i, r in enumerate(out) if isinstance(r, list)]
        if retry:
            for i in retry:
                v = out[i][1]
                fills[i].version = v if isinstance(v, bytes) else str(v).encode()
            again = self.scripts([fills[i].call(fills[i].version) for i in retry])
            for i, r in zip(retry, again, strict=False):
                out[i] = 0 if isinstance(r, list) else r
        return out

    def fill_later(self, fills: list[Any], done: Callable[[list[Any]], None] | None = None) -> None:
        """Hand fills (see run_fills) to this process's filler thread: the caller has its
        row already, and a fill is checked against the model's writes in Redis whenever
        it runs."""
        if self._filler is None or self._filler_pid != os.getpid():
            with self._lock:
                if self._filler is None or self._filler_pid != os.getpid():
                    self._fills = queue.SimpleQueue()
                    self._filler = threading.Thread(
                        target=self._fill_loop, name="tiered_cache-filler", daemon=True
                    )
                    self._filler_pid = os.getpid()
                    self._filler.start()
        self._fills.put((fills, done))

    def _fill_loop(self) -> None:
        fills = self._fills
        while True:
            batch = [fills.get()]
            while len(batch) < 64:
                try:
                    batch.append(fills.get_nowait())
                except queue.Empty:
                    break
            calls = [c for cs, _ in batch for c in cs]
            try:
                results: list[Any] = self.run_fills(calls) if calls else []
            except Unavailable:
                results = [None] * len(calls)
            except Exception:  # never let the filler die
                logger.exception("tiered_cache: filler failed")
                results = [None] * len(calls)
            i = 0
            for cs, done in batch:
                if done is not None:
                    try:
                        done(results[i : i + len(cs)])
                    except Exception:
                        logger.exception("tiered_cache: fill callback failed")
                i += len(cs)

    def wait_for_fills(self, timeout: float = 5.0) -> None:
        """Block until the fills queued so far ran (tests, warmup)."""
        event = threading.Event()
        if self._filler is None or self._filler_pid != os.getpid():
            return
        self._fills.put(([], lambda _: event.set()))
        event.wait(timeout)

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
            breaker.failure(exc)
            raise Unavailable(str(exc)) from exc
        breaker.success()
        return result

    def run_many(
        self, calls: Sequence[tuple[str, Sequence[str], Sequence[Any]]], force: bool = False
    ) -> list[Any]:
        """Several scripts, by name, in one round trip (each script is atomic on its own)."""
        return self.scripts(calls, force=force)


redis_tier = RedisTier()
