"""L2: Redis through django-redis's connection settings, every mutation one Lua script."""

from __future__ import annotations

import itertools
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar, cast

import redis
from django.conf import settings
from django_redis import get_redis_connection
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from ..breaker import breaker
from ..cluster import cluster_settings
from ..conf import conf
from ..counters import Latency
from ..keys import Command, ScriptCall, channel, cluster_mode
from ..threads import ProcessThread

logger = logging.getLogger("tiered_cache")
T = TypeVar("T")


class Fillable(Protocol):
    """A fill the filler thread runs (reads.Fill): signed for a row version, which Redis
    may answer with the row's current one."""

    version: bytes

    def call(self, version: bytes) -> ScriptCall: ...


# What a failed Redis call raises: redis-py's errors, the socket's, and the cluster client's
# own (RedisClusterException is not a RedisError: no node reachable, no slot map).
REDIS_ERRORS = (redis.RedisError, OSError, RedisClusterException)

# Arguments of one node's connection, out of a cluster's settings (tiered_cache.cluster).
_CONNECTION_ARGS = frozenset(
    {
        "username",
        "password",
        "socket_timeout",
        "socket_connect_timeout",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_cert_reqs",
        "client_name",
    }
)

# Replies that say a cluster's slot map changed under us (a failover, a resharding).
_MOVED = (MovedError, AskError, ClusterDownError, TryAgainError, redis.ConnectionError)


class Unavailable(Exception):
    """Redis was not used for this call: the breaker is open or the call failed."""


class TopologyChanged(Unavailable):
    """A cluster's masters changed since the last call: its reply (if any) is not used."""


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


# Connections given back by threads that ended, kept per server for the next threads; past
# that many, closed (a burst of requests in flight leaves no more open than this).
IDLE_MAX = 32


class _Held:
    """The connections one thread holds (RedisTier._conn), by server name ("" on one
    server). When the thread ends, its thread-local storage lets go of this object and the
    connections go back to the tier's idle lists, for the next thread that needs one:
    under ASGI, Django runs each request's synchronous code in a thread of its own (a
    ThreadSensitiveContext per request), and each such thread would otherwise open, set up
    and drop a connection of its own for its first L2 read."""

    __slots__ = ("client", "conns", "owner", "pid", "tier")

    def __init__(self, tier: RedisTier, client: Any) -> None:
        self.tier = tier
        self.client = client
        self.pid = os.getpid()
        self.owner = threading.get_ident()
        self.conns: dict[str, Any] = {}

    def __del__(self) -> None:
        try:
            # Only as the owner thread ends, when no Python frame is below this one. Freed
            # any other way (a forked child's copy; reset() dropping every thread's storage,
            # from another thread or from inside the owner's own _conn()), the owner may
            # still be in an exchange: its connections are left to it, then to the GC.
            if (
                self.pid != os.getpid()
                or threading.get_ident() != self.owner
                or sys._getframe().f_back is not None
            ):
                return
            tier = self.tier
            idle = tier._idle
            current = self.client is tier._client  # not a client reset() forgot
            conns, self.conns = self.conns, {}
            for name, conn in conns.items():
                if getattr(conn, "_sock", None) is None:
                    continue
                kept = idle.setdefault(name, [])
                # Replies sent for and never read (the thread stopped mid-exchange) must
                # not be read by another thread as its own: such a connection is closed.
                if current and not conn._tc_unread and len(kept) < IDLE_MAX:
                    kept.append(conn)
                else:
                    conn.disconnect()
        except Exception:  # at interpreter exit, or a socket error: they close with GC
            pass


class RedisTier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._client: Any = None
        self._pid = 0
        # Each thread keeps one connection for the scripts of the read and write paths:
        # taking one from the pool and giving it back costs a third of a round trip. The
        # connections of threads that ended wait in _idle, by server name (see _Held).
        self._local = threading.local()
        self._idle: dict[str, list[Any]] = {}
        self._fills: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._filler = ProcessThread("tiered_cache-filler", self._fill_loop, self._new_queue)
        # The seconds each successful script round trip took (metrics).
        self.latency = Latency()
        # On a cluster: the masters our slot map names. When they change (a failover),
        # the new master may lack invalidations its old one took: these hooks (the bus)
        # stop trusting L2 until the outbox is delivered again.
        self._primaries: frozenset[str] | None = None
        # Whether our Redis replicates (Sentinel or a cluster), known with the client: every
        # write asks (replica_acks()), and finding out goes through Django's cache handler.
        self._replicated: bool | None = None
        self.topology_hooks: list[Callable[[], None]] = []
        os.register_at_fork(after_in_child=self.after_fork)

    # -- connection ----------------------------------------------------------
    def connection_kwargs(self, **overrides: Any) -> tuple[type, dict[str, Any]]:
        """django-redis's connection settings for our alias, with our timeouts and no
        client-side retries: a cache call must fail fast, the breaker decides what next."""
        cls: type
        if cluster_mode():
            # From the settings: django-redis's cluster client connects when it is made,
            # with the user's timeouts (none by default), and may not be made yet.
            entry = settings.CACHES[conf.CACHE_ALIAS]
            _, found = cluster_settings(entry["LOCATION"], entry.get("OPTIONS", {}))
            # What a node's connection takes (CLUSTER_KWARGS may hold the cluster's own).
            kwargs = {k: v for k, v in found.items() if k in _CONNECTION_ARGS}
            cls = redis.SSLConnection if found.get("ssl") else redis.Connection
        else:
            base = get_redis_connection(conf.CACHE_ALIAS)
            kwargs = dict(base.connection_pool.connection_kwargs)
            cls = base.connection_pool.connection_class
        # A Sentinel pool puts itself there; ours is made anew (make_pool).
        for k in ("retry_on_error", "retry_on_timeout", "health_check_interval", "connection_pool"):
            kwargs.pop(k, None)
        kwargs.update(
            socket_timeout=conf.SOCKET_TIMEOUT,
            socket_connect_timeout=conf.SOCKET_CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        kwargs.update(overrides)
        return cls, kwargs

    @property
    def cluster(self) -> bool:
        """Whether our alias is a Redis Cluster (tiered_cache.cluster.ClusterClient): read
        from the settings, since asking the client would connect (and may fail)."""
        return cluster_mode()

    def _make_cluster(self, **overrides: Any) -> RedisCluster:
        """A cluster client of our own: the nodes django-redis's knows, our timeouts, no
        retries (a failed call is the breaker's to count; a moved slot refreshes the map)."""
        entry = settings.CACHES[conf.CACHE_ALIAS]
        nodes, kwargs = cluster_settings(entry["LOCATION"], entry.get("OPTIONS", {}))
        kwargs.update(
            socket_timeout=conf.SOCKET_TIMEOUT,
            socket_connect_timeout=conf.SOCKET_CONNECT_TIMEOUT,
        )
        kwargs.update(overrides)
        kwargs.pop("retry", None)  # ours: none
        # Made (and its slot map read) with our timeouts: at most one connect timeout per
        # startup node when none answers.
        return RedisCluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 0), **kwargs)

    def bus_pool(self, **overrides: Any) -> redis.ConnectionPool:
        """A pool for the bus's subscription: the server (or Sentinel master) of make_pool,
        or on a cluster the node that owns the bus channel's slot (sharded pub/sub)."""
        if not self.cluster:
            return self.make_pool(**overrides)
        client: Any = self.client
        client.nodes_manager.initialize()  # a failover or a resharding may have moved it
        node = client.get_node_from_key(channel())
        cls, kwargs = self.connection_kwargs(**overrides)
        kwargs.update(host=node.host, port=node.port)
        return redis.ConnectionPool(connection_class=cls, **kwargs)

    def make_pool(self, **overrides: Any) -> redis.ConnectionPool:
        """A pool of our own to the server django-redis's client of our alias talks to:
        the same address, or the master the same Sentinels name (asked with our timeouts,
        and again on every connect, so a failover is followed), with connection_kwargs()."""
        base = get_redis_connection(conf.CACHE_ALIAS).connection_pool
        cls, kwargs = self.connection_kwargs(**overrides)
        if isinstance(base, SentinelConnectionPool):
            manager = base.sentinel_manager
            sentinel_kwargs = dict(manager.sentinel_kwargs)
            # Asking the sentinels is part of a connect: our timeouts, and no retries (redis-py
            # 8 retries a client 3 times with backoff by default: seconds with them paused).
            sentinel_kwargs.update(
                socket_timeout=conf.SOCKET_TIMEOUT,
                socket_connect_timeout=conf.SOCKET_CONNECT_TIMEOUT,
                retry=Retry(NoBackoff(), 0),
            )
            ours = Sentinel(  # type: ignore[no-untyped-call]
                [
                    (
                        c.connection_pool.connection_kwargs["host"],
                        c.connection_pool.connection_kwargs["port"],
                    )
                    for c in manager.sentinels
                ],
                min_other_sentinels=manager.min_other_sentinels,
                sentinel_kwargs=sentinel_kwargs,
            )
            # redis-py leaves these unannotated.
            return SentinelConnectionPool(  # type: ignore[no-untyped-call]
                base.service_name, ours, is_master=True, connection_class=cls, **kwargs
            )
        return redis.ConnectionPool(connection_class=cls, **kwargs)

    def replica_acks(self) -> int:
        """How many replicas must acknowledge an invalidation before it counts as delivered
        (REPLICA_ACKS; None: 1 on Sentinel or a cluster, else 0). Replication is asynchronous: a
        failover to a replica that never got an invalidation would serve the row it
        replaced, so an unacknowledged one goes to the outbox like an undelivered one."""
        acks = conf.REPLICA_ACKS
        if acks is None:
            replicated = self._replicated
            if replicated is None:
                # A Sentinel client is made without connecting; a cluster's is not asked.
                replicated = self._replicated = cluster_mode() or isinstance(
                    get_redis_connection(conf.CACHE_ALIAS).connection_pool,
                    SentinelConnectionPool,
                )
            acks = 1 if replicated else 0
        return acks

    @property
    def client(self) -> redis.Redis:
        """redis.Redis, or on a cluster a RedisCluster: typed as the first, whose commands
        the second answers the same way (split by slot where they take several keys)."""
        c: Any = self._client
        if c is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    # Each thread holds a connection made by make_connection() that never
                    # goes back to the pool, and a failed one is replaced: redis-py 8's
                    # default cap of 100 would make every call fail for good after 100
                    # threads or failures in the life of the process.
                    if self.cluster:
                        self._client = self._make_cluster(max_connections=2**31)
                        # The masters it was made with: a later map naming others is a
                        # failover (_check_primaries).
                        self._primaries = frozenset(n.name for n in self._client.get_primaries())
                    else:
                        pool = self.make_pool(max_connections=2**31)
                        self._client = redis.Redis(connection_pool=pool)
                    self._pid = os.getpid()
            c = self._client
        assert c is not None
        return cast(redis.Redis, c)

    def reset(self) -> None:
        """Forget the client (after fork, or when settings change in tests)."""
        with self._lock:
            if self._client is not None and self._pid == os.getpid():
                if isinstance(self._client, RedisCluster):
                    self._client.close()
                else:
                    self._client.connection_pool.disconnect()
            self._client = None
            self._primaries = None
            self._replicated = None
            idle, self._idle = self._idle, {}
        self._local = threading.local()
        for conns in list(idle.values()):
            for conn in list(conns):
                try:
                    conn.disconnect()
                except Exception:
                    pass

    def settings_changed(self) -> None:
        """CACHES changed (override_settings in tests): find out again whether Redis
        replicates. The client itself is kept until reset()."""
        self._replicated = None

    def after_fork(self) -> None:
        """A forked child makes its own connections (the parent's sockets are shared with
        it) and its own lock (the parent may have forked while a thread held it)."""
        self._lock = threading.Lock()
        self._client = None
        self._primaries = None
        self._local = threading.local()
        self._idle = {}
        self.latency.after_fork()

    def _conn(self, node: Any = None) -> Any:
        """This thread's connection to the server, or on a cluster to one node: the one it
        holds, else one a thread that ended gave back, else a new one."""
        local = self._local
        held: _Held | None = getattr(local, "held", None)
        if held is None or held.pid != os.getpid() or held.client is not self._client:
            held = local.held = _Held(self, self.client)
        conns = held.conns
        name = "" if node is None else node.name
        conn = conns.get(name)
        if conn is None:
            try:
                conn = self._idle[name].pop()
            except (KeyError, IndexError):
                pool = (held.client if node is None else node.redis_connection).connection_pool
                conn = pool.make_connection()
            conns[name] = conn
        if getattr(conn, "_sock", None) is not None:
            # A held connection the server closed (restart, CLIENT KILL, idle timeout)
            # would fail the next call and count against the breaker: check, as redis-py's
            # pool does on every checkout, and reconnect on the next send instead. So is
            # one with replies nobody read (an exchange that stopped half way).
            try:
                dead = conn._tc_unread or conn.can_read()
            except (redis.RedisError, OSError):
                dead = True
            if dead:
                conn.disconnect()
        if getattr(conn, "_sock", None) is None:
            # Connect here, not on the first send: redis-py 8 connects a sending connection
            # through the base class's _connect(), which a Sentinel-managed connection does
            # not override (it would dial the service name as a host).
            conn.connect()
            conn._tc_unread = False  # set by _send_packed() until _read() has every reply
        return conn

    def _drop_conn_after(self, exc: BaseException) -> None:
        """After a failed exchange: drop this thread's connections, unless the server they
        reach answered with an error of its own state (out of memory, NOREPLICAS...).
        _read() reads such a reply whole and every reply after it, so the stream is in
        step, and a Redis refusing writes is spared a new connection per write. They are
        dropped when they may reach the wrong server: a replica that was the master
        (READONLY: reconnecting follows Sentinel or the DNS name), a cluster's redirects.
        (A connection left with replies unread is never used again: _conn() checks.)"""
        if not isinstance(exc, ResponseError) or isinstance(exc, (ReadOnlyError, *_MOVED)):
            self._drop_conn()

    def _drop_conn(self) -> None:
        held: _Held | None = getattr(self._local, "held", None)
        if held is None:
            return
        conns, held.conns = held.conns, {}
        for conn in conns.values():
            try:
                conn.disconnect()
            except Exception:
                pass

    def scripts(
        self,
        calls: Sequence[ScriptCall | Command],
        force: bool = False,
        acks: int = 0,
        publish: Sequence[str] = (),
    ) -> list[Any]:
        """Run scripts (each atomic on its own; a Command is one plain command) through the
        breaker, in one round trip on this thread's connection (on a cluster, one per node,
        all sent before any reply is read). Raises Unavailable on any failure (the
        connections are then dropped).
        force=True tries even while the breaker is open (the bus listener delivering the
        outbox right after Redis answered its heartbeat); the outcome still counts.
        publish: bus messages sent once every script has run. acks: the replicas that must
        hold every effect of the calls (WAIT, at most REPLICA_ACK_TIMEOUT, on each server
        written); fewer raise Unavailable too, after the messages went out."""
        if not breaker.allow() and not force:  # allow() first: it may start a probe
            raise Unavailable("circuit open")
        t0 = time.perf_counter()
        try:
            out, acked = self._run(calls, acks, publish)
        except TopologyChanged:
            breaker.success()  # Redis answered: its map changed, it did not fail
            raise
        except REDIS_ERRORS as exc:
            self._drop_conn_after(exc)
            if isinstance(exc, _MOVED) and self.cluster:
                self._refresh()
            breaker.failure(exc)
            raise Unavailable(str(exc)) from exc
        except BaseException:
            breaker.abandon()  # cut short by the caller's side, not by Redis
            raise
        breaker.success()
        if acked < acks:  # Redis answered: not a failure for the breaker to count
            raise Unavailable(f"{acked} of {acks} replicas acknowledged the invalidation")
        self.latency.observe(time.perf_counter() - t0)
        return out

    def publish(self, messages: Sequence[str]) -> None:
        """Send bus messages alone, outside the breaker (a writer whose scripts Redis
        refused tells the other processes so): Unavailable if Redis did not take them."""
        try:
            self._publish(messages)
        except REDIS_ERRORS as exc:
            self._drop_conn_after(exc)
            raise Unavailable(str(exc)) from exc

    def _publish(self, messages: Sequence[str]) -> None:
        """The messages on the bus channel: SPUBLISH on the channel's node of a cluster."""
        client: Any = self.client
        node, verb = (
            (client.get_node_from_key(channel()), "SPUBLISH") if self.cluster else (None, "PUBLISH")
        )
        self._exchange(
            self._conn(node), [(verb, channel(), m) for m in messages], raise_errors=True
        )

    def _refresh(self) -> None:
        """The slot map changed under us (a failover, a resharding): read it again, or let
        the next call find out."""
        client = self._client
        if client is not None:
            try:
                client.nodes_manager.initialize()
            except REDIS_ERRORS:
                pass

    def _run(
        self, calls: Sequence[ScriptCall | Command], acks: int, publish: Sequence[str]
    ) -> tuple[list[Any], int]:
        cluster = self.cluster
        if not cluster and len(calls) == 1 and not acks and not publish:
            return [self._one(calls[0])], 0
        if cluster:
            self._check_primaries()
        # On one server the messages follow the scripts on the same connection: Redis runs
        # them in that order, in the same round trip.
        inline = [("PUBLISH", channel(), m) for m in publish] if not cluster else []
        out: list[Any] = [None] * len(calls)
        acked: dict[str, int] = {}
        failure: BaseException | None = None
        try:
            todo = list(range(len(calls)))
            for attempt in range(2):
                for node, idx, replies, node_acked in self._round(calls, todo, acks, inline):
                    for i, r in zip(idx, replies, strict=True):
                        out[i] = r
                    acked[node] = node_acked  # a later WAIT covers the earlier writes too
                todo = [i for i, r in enumerate(out) if isinstance(r, NoScriptError)]
                if not todo or attempt:
                    break
                # Redis restarted or its script cache was flushed: load and run again (the
                # messages go out again after them: a second drop of an entry is harmless).
                for i in todo:
                    call = calls[i]
                    self._load_script(self._conn(self._node_of(call)), call)
            for r in out:
                if isinstance(r, ResponseError):
                    raise r
        except REDIS_ERRORS as exc:
            failure = exc
        if publish and cluster:
            # Even when a node failed: the other processes drop the rows from L1 now, not
            # when this process's outbox is delivered (its scripts on the nodes that
            # answered have run).
            try:
                if failure is not None:
                    self._drop_conn_after(failure)  # replies may still be unread
                self._publish(publish)
            except REDIS_ERRORS as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        if cluster:
            # Again after the replies: another thread may have read the slot map anew while
            # these calls ran, and a reply from a promoted replica must not be used.
            self._check_primaries()
        return out, min(acked.values(), default=acks) if acks else 0

    def _one(self, call: ScriptCall | Command) -> Any:
        """_run() of one call on one server with nothing sent after it, which every read
        of a row is: its round trip without the grouping by server and the lists of
        _round(), for a read's Python work costs several times its warm cost after the
        wait for Redis (caches cold again)."""
        conn = self._conn()
        (reply,) = self._exchange(conn, [call.command()], raise_errors=False)
        if isinstance(reply, NoScriptError):  # as in _run()
            self._load_script(conn, call)
            (reply,) = self._exchange(conn, [call.command()], raise_errors=False)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def _load_script(self, conn: Any, call: ScriptCall | Command) -> None:
        """Redis restarted or its script cache was flushed (NOSCRIPT): load the script
        again on this connection's server."""
        assert isinstance(call, ScriptCall)  # only a script answers NOSCRIPT
        self._exchange(conn, [("SCRIPT", "LOAD", call.script.source)], raise_errors=True)

    def _check_primaries(self) -> None:
        """Before a call on a cluster: if the slot map names other masters than it did (it
        is read again after a MOVED or a dead node), a replica was promoted, and may have
        missed invalidations its master acknowledged. This call fails, and the hooks make
        every reader here go to the database until the outbox was delivered to the new
        masters (the bus's regain)."""
        client: Any = self.client
        primaries = frozenset(n.name for n in client.get_primaries())
        seen, self._primaries = self._primaries, primaries
        if seen is not None and primaries != seen:
            for hook in self.topology_hooks:
                hook()
            # Not a failure of Redis (no breaker count, no new refresh of the map).
            raise TopologyChanged("the cluster's masters changed (a failover)")

    def _node_of(self, call: ScriptCall | Command) -> Any:
        client: Any = self.client
        return client.get_node_from_key(call.keys[0]) if self.cluster else None

    def _round(
        self,
        calls: Sequence[ScriptCall | Command],
        todo: list[int],
        acks: int,
        extra: list[tuple[Any, ...]],
    ) -> list[tuple[str, list[int], list[Any], int]]:
        """Send the calls `todo` names, grouped by server, then read every reply: (server,
        indexes, replies, replicas that acknowledged) per server."""
        groups: dict[str, tuple[Any, list[int]]] = {}
        for i in todo:
            node = self._node_of(calls[i])
            groups.setdefault("" if node is None else node.name, (node, []))[1].append(i)
        sent = []
        for name, (node, idx) in groups.items():
            commands: list[tuple[Any, ...]] = [calls[i].command() for i in idx]
            commands.extend(extra)
            if acks:
                # WAIT covers every write this connection made before it: the scripts above.
                commands.append(("WAIT", acks, max(1, int(conf.REPLICA_ACK_TIMEOUT * 1000))))
            conn = self._conn(node)
            self._send_packed(conn, commands)
            sent.append((name, idx, conn, len(commands)))
        results = []
        for name, idx, conn, n in sent:
            replies = self._read(conn, n)
            node_acked = replies[-1] if acks else 0
            if acks and not isinstance(node_acked, int):
                node_acked = 0
            results.append((name, idx, replies[: len(idx)], node_acked))
        return results

    @staticmethod
    def _send_packed(conn: Any, commands: list[tuple[Any, ...]]) -> None:
        conn._tc_unread = True  # until _read() has every reply (see _conn, _Held)
        if _pack is not None:  # hiredis packs in C; redis-py's own packer is Python
            conn.send_packed_command([b"".join([_pack(c) for c in commands])], check_health=False)
        elif len(commands) == 1:
            conn.send_command(*commands[0])
        else:
            conn.send_packed_command(conn.pack_commands(commands))

    @staticmethod
    def _read(conn: Any, n: int) -> list[Any]:
        out: list[Any] = []
        for _ in range(n):
            try:
                out.append(conn.read_response())
            except ResponseError as exc:  # the reply was read whole: the stream stays in step
                out.append(exc)
        conn._tc_unread = False
        return out

    def _exchange(
        self, conn: Any, commands: list[tuple[Any, ...]], raise_errors: bool
    ) -> list[Any]:
        self._send_packed(conn, commands)
        out = self._read(conn, len(commands))
        if raise_errors:
            for r in out:
                if isinstance(r, ResponseError):
                    raise r
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
        except REDIS_ERRORS as exc:
            breaker.failure(exc)
            raise Unavailable(str(exc)) from exc
        except BaseException:
            breaker.abandon()
            raise
        breaker.success()
        return result


redis_tier = RedisTier()
