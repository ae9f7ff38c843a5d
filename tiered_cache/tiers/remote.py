"""L2: Redis through django-redis's connection settings, every mutation one Lua script."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis
from django_redis import get_redis_connection
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from ..breaker import breaker
from ..conf import conf
from ..counters import Latency
from ..keys import ScriptCall
from ..threads import ProcessThread

logger = logging.getLogger("tiered_cache")
T = TypeVar("T")


class Fillable(Protocol):
    """A fill the filler thread runs (reads.Fill): signed for a row version, which Redis
    may answer with the row's current one."""

    version: bytes

    def call(self, version: bytes) -> ScriptCall: ...


class Unavailable(Exception):
    """Redis was not used for this call: the breaker is open or the call failed."""


_pack: Callable[[tuple[Any, ...]], bytes] | None
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
        # Two processes must never hand out the same token.
        os.register_at_fork(after_in_child=self.renew)

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
        # Each thread keeps one connection for the scripts of the read and write paths:
        # taking one from the pool and giving it back costs a third of a round trip.
        self._local = threading.local()
        self._fills: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._filler = ProcessThread("tiered_cache-filler", self._fill_loop, self._new_queue)
        # The seconds each successful script round trip took (metrics).
        self.latency = Latency()
        os.register_at_fork(after_in_child=self.after_fork)

    # -- connection ----------------------------------------------------------
    def connection_kwargs(self, **overrides: Any) -> tuple[type, dict[str, Any]]:
        """django-redis's connection settings for our alias, with our timeouts and no
        client-side retries: a cache call must fail fast, the breaker decides what next."""
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

    def after_fork(self) -> None:
        """A forked child makes its own connections (the parent's sockets are shared with
        it) and its own lock (the parent may have forked while a thread held it)."""
        self._lock = threading.Lock()
        self._client = None
        self._local = threading.local()
        self.latency.after_fork()

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

    def scripts(self, calls: Sequence[ScriptCall], force: bool = False) -> list[Any]:
        """Run scripts (each atomic on its own) in one round trip on this thread's
        connection, through the breaker. Raises Unavailable on any failure (the connection
        is then dropped). force=True tries even while the breaker is open (the bus listener
        delivering the outbox right after Redis answered its heartbeat); the outcome still
        counts."""
        if not breaker.allow() and not force:  # allow() first: it may start a probe
            raise Unavailable("circuit open")
        t0 = time.perf_counter()
        try:
            out = self._send(calls)
            missing = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
            if missing:
                # Redis restarted or its script cache was flushed: load and run again.
                conn = self._conn()
                for script in {calls[i].script for i in missing}:
                    conn.send_command("SCRIPT", "LOAD", script.source)
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
        self.latency.observe(time.perf_counter() - t0)
        return out

    def _send(self, calls: Sequence[ScriptCall]) -> list[Any]:
        conn = self._conn()
        commands = [("EVALSHA", c.script.sha, len(c.keys), *c.keys, *c.args) for c in calls]
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

    def run_fills(self, fills: Sequence[Fillable]) -> list[Any]:
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

    def fill_later(
        self, fills: Sequence[Fillable], done: Callable[[list[Any]], None] | None = None
    ) -> None:
        """Hand fills (see run_fills) to this process's filler thread: the caller has its
        row already, and a fill is checked against the model's writes in Redis whenever
        it runs."""
        self._filler.start()
        self._fills.put((fills, done))

    def _new_queue(self) -> None:
        self._fills = queue.SimpleQueue()  # a forked child's: the parent's may hold a lock

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
        if not self._filler.running():
            return
        self._fills.put(([], lambda _: event.set()))
        event.wait(timeout)

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


redis_tier = RedisTier()
