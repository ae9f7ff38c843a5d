"""The invalidation bus: one listener thread per process drops L1 entries other processes
invalidated, and decides whether this process may trust its tiers at all.

Trust comes from heartbeats: a message this process publishes to itself (on a channel of its
own, received on the subscription) proves that every message published before it has
arrived, and that Redis runs PUBLISH, which writers' invalidations need: a Redis that pauses
writes (CLIENT PAUSE WRITE, a FAILOVER) answers a PING but holds both, and trust lapses.
They go out on a connection of their own that Redis sends no replies on (CLIENT REPLY OFF),
so sending one never waits; where Redis refuses that, a PING on the subscription stands in
(the ordering proof alone). Heartbeats are asked for by reads, not by a clock:
a process that reads keeps its trust renewed with at most one heartbeat per BUS_HEARTBEAT, and a
process that does not read sends nothing (its first read after a pause waits one round
trip for a heartbeat, or goes to the database if none comes)."""

from __future__ import annotations

import logging
import os
import random
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis
from django.db import connection

from .conf import conf
from .invalidation import apply_message, drain_outbox, origin
from .keys import Undelivered, channel, heartbeat_channel, parse_message
from .threads import ProcessThread
from .tiers.local import local_tier
from .tiers.remote import Unavailable, redis_tier

__all__ = ["Bus", "bus"]

logger = logging.getLogger("tiered_cache")

# The longest a read waits for a heartbeat it asked for after trust lapsed: a round trip is
# well under a millisecond on a LAN; past this the read goes to the database.
_RENEW_WAIT = 0.05
# How long the listener blocks on its socket when nothing arrives: it only checks then for
# stop and for a heartbeat left unanswered too long (no Redis command, next to no CPU).
_IDLE_POLL = 1.0
# After a writer's Redis call failed, the time it takes to record the outbox row.
_OUTBOX_MARGIN = 0.05
# Reader threads apply bus messages waiting on the socket themselves, at most this often
# (Bus.poll): in a busy process they hold the CPU, and the listener would wait for the OS
# to schedule it (up to tens of milliseconds with two busy threads on two cores).
_POLL_EVERY = 0.001


def _closed(conn: Any) -> bool:
    """Whether a connection that gets no replies was closed by Redis (or never opened):
    anything readable on it is its end."""
    if conn._sock is None:
        return True
    try:
        return bool(conn.can_read(timeout=0))
    except (redis.ConnectionError, OSError):
        return True


class Bus:
    def __init__(self) -> None:
        self._listener = ProcessThread("tiered_cache-bus", self._run, prepare=self._prepare)
        self._stop = threading.Event()
        self._first = threading.Event()
        # Cuts a reconnect backoff short (an undelivered write wants the outbox drained).
        self._wake = threading.Event()
        # Both tiers are trusted only until this monotonic time: it moves forward with
        # every answered heartbeat, so a paused or silent Redis lapses trust on its own.
        self.trusted_until = 0.0
        # The send time of the last answered heartbeat: every invalidation published before
        # it has been applied here (OUTAGE_STALE_SECONDS counts from it).
        self.vouched_at = 0.0
        # A read past this monotonic time asks for the next heartbeat (ping()).
        self.renew_at = 0.0
        # An L1 hit past this monotonic time applies waiting messages itself (poll()).
        self.poll_at = 0.0
        self._new_reader_state()
        self.connected = False
        self.reconnects = 0
        self.messages = 0
        self.last_latency: float | None = None
        self._client: Any = None
        self._pubsub: Any = None
        # The connection heartbeats are published on (CLIENT REPLY OFF), with the command
        # that sends one and the channel they come back on; None: PINGs on the subscription.
        self._beat: Any = None
        self._beat_verb = "PUBLISH"
        self._beat_channel = b""
        self._beat_lock = threading.Lock()
        # Set when the subscription's connection was made anew behind the listener's back
        # (redis-py reconnects and resubscribes inside a failed call, a reader's PING
        # included): messages of the gap may be lost, so the listener starts over.
        self._broken = False
        # Heartbeats sent and not yet answered: tag -> monotonic send time.
        self._sent: dict[bytes, float] = {}
        self._sent_lock = threading.Lock()
        self._last_sent = 0.0
        # Pongs before this time grant no trust (see _listen).
        self._quarantine = 0.0
        # Notified whenever trust is granted: readers waiting for a heartbeat wake up.
        self._granted = threading.Condition()
        self._warned = False
        # Set when this process put invalidations in the outbox: the listener delivers
        # them before this process trusts its tiers again.
        self._drain_due = False
        # After a failed delivery of the outbox: no new attempt before this monotonic time.
        self._retry_at = 0.0
        self._backoff = 0.0
        # Called in the caller's thread whenever a listener starts (AppConfig.ready() wires
        # the statistics publisher here: one thread per process, started with the bus).
        self.on_start: list[Callable[[], None]] = []
        os.register_at_fork(after_in_child=self.after_fork)
        redis_tier.topology_hooks.append(self.topology_changed)

    def topology_changed(self) -> None:
        """A cluster's masters changed: the promoted replica may lack invalidations its
        master took. Trust ends now; the listener starts over, and grants trust again only
        after delivering the outbox (which holds what no replica acknowledged)."""
        self._drain_due = True
        self._connection_lost()

    def trusted(self) -> bool:
        """Whether this process may use its tiers now. A caller that finds the next
        heartbeat due asks for it: trust stays renewed while the process reads."""
        now = time.monotonic()
        if now >= self.renew_at:
            self.ping()
        return now < self.trusted_until

    def state(self) -> str:
        if time.monotonic() < self.trusted_until:
            return "live"
        if not self.connected:
            return "down"
        return "connected, heartbeat late" if self._sent else "connected, idle"

    def current_state(self) -> str:
        """The state a page shows. Trust lapses BUS_TRUST_WINDOW after the last read, so a
        listening process that served nothing for a moment asks for a heartbeat first and
        waits for it up to SOCKET_TIMEOUT: a working bus reads "live", as it would on the
        process's next read."""
        if self.listening() and time.monotonic() >= self.trusted_until:
            self.ping()
            self._await_heartbeat(conf.SOCKET_TIMEOUT)
        return self.state()

    def ensure_started(self, wait: float | None = None) -> None:
        """Start the listener on first use (the first caller waits briefly for it); later,
        when trust has lapsed, ask for a heartbeat and wait a round trip for it."""
        if self._listener.start():
            interval = conf.GIL_SWITCH_INTERVAL
            if interval and sys.getswitchinterval() > interval:
                sys.setswitchinterval(interval)
            for hook in self.on_start:
                hook()
            if wait is None:
                wait = conf.SOCKET_CONNECT_TIMEOUT + conf.SOCKET_TIMEOUT
            self._first.wait(wait)
            return
        if wait == 0 or time.monotonic() < self.trusted_until:
            return
        self.ping()
        self._await_heartbeat()

    def ping(self) -> None:
        """Ask Redis for a heartbeat on the subscription, from any thread: at most one per
        BUS_HEARTBEAT, and none while the listener is not connected."""
        pubsub = self._pubsub
        now = time.monotonic()
        if pubsub is None or not self.connected or self._broken or now < self.renew_at:
            return
        with self._sent_lock:
            # The listener may have reconnected since pubsub was read: never a tag of the
            # new connection's heartbeats sent on the old one.
            if now < self.renew_at or pubsub is not self._pubsub:
                return
            self.renew_at = now + conf.BUS_HEARTBEAT
            tag = repr(now).encode()
            self._sent[tag] = now
            self._last_sent = now
        beat = self._beat
        try:
            if beat is None:
                pubsub.ping(tag)  # redis-py sends under the PubSub's own lock
            else:
                with self._beat_lock:
                    if beat is not self._beat:  # the listener started over meanwhile
                        return
                    if _closed(beat):
                        # Redis closed it (its `timeout` for idle clients, which spares
                        # subscribers): a new one, replies off before anything is sent.
                        beat.disconnect()
                        beat.connect()
                        beat.send_command("CLIENT", "REPLY", "OFF")
                    beat.send_command(self._beat_verb, self._beat_channel, tag)
        except Exception:  # the listener sees the broken connection and starts over
            self._connection_lost()

    def _new_reader_state(self) -> None:
        # Whoever reads the subscription's socket holds this: the listener, or a reader
        # thread in poll(). The listener waits for the socket without it.
        self._read_lock = threading.Lock()
        # What a reader thread read and left to the listener (heartbeats, subscription
        # changes), in the order read; a byte on the wake-up socket tells the listener.
        self._handed: deque[dict[str, Any]] = deque()
        # A socket pair, not a pipe: select() takes sockets only on Windows.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def poll(self, now: float) -> None:
        """From a reader thread (an L1 hit, at most once per _POLL_EVERY): apply the bus
        messages that wait on the socket now, without waiting for the listener thread,
        which a busy process's readers keep off the CPU. Messages are applied here, and
        heartbeat answers that renew live trust; the rest (a heartbeat that must deliver
        the outbox first, subscription changes) goes to the listener, with any heartbeat
        after it, in order. Never blocks: if the listener or another reader is reading, this one
        returns at once."""
        self.poll_at = now + _POLL_EVERY
        pubsub = self._pubsub
        if pubsub is None or self._broken or not self._read_lock.acquire(blocking=False):
            return
        handed = False
        try:
            if pubsub is not self._pubsub:
                return
            # Anything still waiting for the listener came off the socket first: the
            # heartbeat answers and subscription changes after it wait too, in order
            # (messages are applied at once: a drop made early is harmless).
            handed = bool(self._handed)
            own = origin.id
            # timeout=0: nothing but what the socket holds already (redis-py checks it
            # without blocking); one reply per call, so until it returns None.
            while (msg := pubsub.get_message(timeout=0)) is not None:
                kind = self._kind(msg)
                if kind in ("message", "smessage"):
                    self.messages += 1
                    self._handle(msg["data"], own)
                elif (
                    handed
                    or kind != "pong"
                    or not self._pong(msg["data"], time.monotonic(), inline=True)
                ):
                    self._handed.append(msg)
                    handed = True
        except Exception:
            if pubsub is self._pubsub:  # not a connection the listener already left
                self._connection_lost()
        finally:
            self._read_lock.release()
            if handed:
                self._wake_listener()

    def _wake_listener(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:  # full (the listener has wake-ups waiting), or closed at exit
            pass

    def _next(self, pubsub: Any, wait: float) -> dict[str, Any] | None:
        """The listener's next message, handled (unless the listener stops or starts over),
        or None after `wait` seconds without one (or for a partial one). It waits for the
        socket, or for what a reader thread handed over, without the read lock, so that
        reader threads can poll() meanwhile."""
        msg = self._take(pubsub)
        if msg is not None:
            return msg
        # Nothing complete is buffered now (get_message drains the parser first), so the
        # socket turns readable for anything new. poll(), not select(): a busy server's
        # process may hold descriptors past select()'s limit of 1024.
        sock = pubsub.connection._sock
        if hasattr(select, "poll"):
            waiting = select.poll()
            waiting.register(sock, select.POLLIN)
            waiting.register(self._wake_r, select.POLLIN)
            waiting.poll(wait * 1000)
        else:  # Windows
            select.select([sock, self._wake_r], [], [], wait)
        try:
            self._wake_r.recv(4096)
        except BlockingIOError:
            pass
        return self._take(pubsub)

    def _take(self, pubsub: Any) -> dict[str, Any] | None:
        """Take the next message and handle it, both under the read lock: a reader thread's
        poll() must not apply a later message before it, nor a heartbeat answer that vouches
        for it (trust, and OUTAGE_STALE_SECONDS's vouched_at, would then cover a drop not
        yet made). What a reader handed over came off the socket before anything there."""
        with self._read_lock:
            msg: dict[str, Any] | None
            msg = self._handed.popleft() if self._handed else pubsub.get_message(timeout=0)
            if msg is None or self._broken or self._stop.is_set():
                return msg  # the listener stops or starts over: nothing to apply
            kind = self._kind(msg)
            if kind == "sunsubscribe":
                # The channel's slot moved to another node (a resharding, a failover).
                raise ConnectionError("the bus channel moved to another node")
            if kind in ("message", "smessage"):
                self.messages += 1
                self._handle(msg["data"], origin.id)
            elif kind == "pong":
                self._pong(msg["data"], time.monotonic(), inline=False)
        return msg

    def _kind(self, msg: dict[str, Any]) -> str:
        """A message's type, "pong" for a heartbeat of ours (on our heartbeat channel)."""
        kind: str = msg["type"]
        if kind in ("message", "smessage") and msg["channel"] == self._beat_channel:
            return "pong"
        return kind

    def _connection_lost(self, conn: Any = None) -> None:
        """The subscription failed, or was reconnected outside the listener: trust ends
        now, and the listener starts over (clearing L1) at its next wake-up."""
        self._broken = True
        self.trusted_until = 0.0

    def _await_heartbeat(self, limit: float = _RENEW_WAIT) -> None:
        """Wait for the heartbeat just asked for, a bounded time: never while the listener
        is down or quarantined, nor for a heartbeat Redis has left unanswered that long."""
        limit = min(limit, conf.SOCKET_TIMEOUT)
        now = time.monotonic()
        if not self.connected or now < self._quarantine or now - self._last_sent > limit:
            return
        if self._drain_due and now < self._retry_at:
            return  # the outbox cannot be delivered before then: no trust to wait for
        deadline = self._last_sent + limit
        with self._granted:
            self._granted.wait_for(
                lambda: time.monotonic() < self.trusted_until, max(0.0, deadline - now)
            )

    def wait_trusted(self, timeout: float = 10.0) -> bool:
        """Start the listener if needed and wait until this process may use its tiers (a
        warmup script, a benchmark or a test that wants the cache live, not bypassed)."""
        deadline = time.monotonic() + timeout
        self.ensure_started()
        while time.monotonic() < deadline:
            if self.trusted():
                return True
            time.sleep(0.005)
        return self.trusted()

    def listening(self) -> bool:
        """Whether this process's listener thread runs."""
        return self._listener.running()

    def local_address(self) -> tuple[str, int] | None:
        """The local address of the listener's connection, as Redis's CLIENT LIST shows
        it (operations and tests use it to find, or kill, that connection)."""
        client = self._client
        if client is None:
            return None
        for conn in list(getattr(client.connection_pool, "_in_use_connections", ())):
            sock = getattr(conn, "_sock", None)
            if sock is not None:
                host, port = sock.getsockname()[:2]
                return host, port
        return None

    def stop(self) -> None:
        """Stop the listener (tests); trust ends at once."""
        self._stop.set()
        self._wake.set()
        self.trusted_until = 0.0
        self.renew_at = 0.0
        self.ping()  # its answer wakes the listener, which then sees the stop
        self._wake_listener()  # or this, while no heartbeat can be sent
        self._listener.join(2)

    def undelivered(self) -> None:
        """A write of this process could not reach Redis; its invalidation is in the outbox.
        L2 still holds the old row, and other processes' L1 too, and they may not lose
        trust at all (only this process's breaker may be open): stop trusting the tiers
        here until the listener has delivered the outbox, and make sure a listener runs.
        Also when another process says so on the bus (keys.Undelivered: Redis refused
        its write but still answers, so nothing else would end our trust)."""
        self._drain_due = True
        self.trusted_until = 0.0
        self._wake.set()
        self.ensure_started(wait=0)
        self.ping()  # the drain runs at the next answered heartbeat

    def after_fork(self) -> None:
        """A forked child starts its own listener on its first read."""
        self.trusted_until = 0.0
        self.vouched_at = 0.0
        self.renew_at = 0.0
        self.connected = False
        self._drain_due = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self._broken = False
        self._pubsub = None
        self._beat = None
        self._beat_lock = threading.Lock()
        self._sent = {}
        self._sent_lock = threading.Lock()
        self._granted = threading.Condition()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._wake = threading.Event()
        self.poll_at = 0.0
        self._wake_r.close()  # the parent's pair: the child makes one of its own
        self._wake_w.close()
        self._new_reader_state()

    # -- the listener ----------------------------------------------------------
    def _prepare(self) -> None:
        self._stop.clear()
        self._first.clear()

    def _run(self) -> None:
        backoff = 0.05
        lost = False
        while not self._stop.is_set():
            try:
                self._listen(reconnect=lost)
                backoff = 0.05
            except Exception as exc:  # any failure: drop trust, clear L1, retry
                lost = True
                if not self._warned:
                    # One warning per outage, however long it lasts.
                    self._warned = True
                    logger.warning(
                        "tiered_cache: cannot use Redis for the invalidation bus (%r); both "
                        "cache tiers are bypassed and reads go to the database until it answers",
                        exc,
                    )
                self._lost()
                self._first.set()
                if self._wake.wait(backoff):
                    self._wake.clear()
                    backoff = 0.05
                else:
                    backoff = min(backoff * 2, 1.0)
        self._lost()
        connection.close()  # this thread's own, opened by the outbox drain

    def _lost(self) -> None:
        self.trusted_until = 0.0
        self.connected = False
        self._pubsub = None
        with self._beat_lock:  # not under a reader's send (ping())
            beat, self._beat = self._beat, None
            if beat is not None:
                try:
                    beat.disconnect()
                except Exception:
                    pass
        with self._sent_lock:
            self._sent = {}
        # Messages may have been missed: nothing in L1 can be vouched for. Under
        # OUTAGE_STALE_SECONDS it is kept, served for that long at most (reads.stale_local),
        # and cleared when a subscription starts again (_listen).
        if not conf.OUTAGE_STALE_SECONDS:
            local_tier.clear()
        if self._client is not None:
            try:
                self._client.connection_pool.disconnect()
            except Exception:
                pass
            self._client = None

    def _listen(self, reconnect: bool = False) -> None:
        window = conf.BUS_TRUST_WINDOW
        # Behind Sentinel, the master is asked for at each connect: a failover ends the
        # subscription (the old master goes away or turns replica) and the next one
        # follows it.
        # On a cluster: the node that owns the channel's slot, by sharded pub/sub (a plain
        # PUBLISH there goes to every node of the cluster).
        pool = redis_tier.bus_pool(socket_timeout=max(1.0, window * 4))
        self._client = client = redis.Redis(connection_pool=pool)
        pubsub = client.pubsub()  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        beats = heartbeat_channel(origin.id)
        if redis_tier.cluster:
            pubsub.ssubscribe(channel(), beats)
        else:
            pubsub.subscribe(channel(), beats)
        self._broken = False
        # Any later (re)connect of this connection is one the listener did not make.
        pubsub.connection.register_connect_callback(self._connection_lost)
        self._beat_verb = "SPUBLISH" if redis_tier.cluster else "PUBLISH"
        self._beat_channel = beats.encode()
        self._beat = self._beat_connection(pool)
        # After a lost connection, a writer may still be failing against the Redis that
        # went away (up to a connect and a read timeout) before it records its
        # invalidation in the outbox: trust, and the drain that grants it, wait that out.
        self._quarantine = 0.0
        if reconnect:
            self._quarantine = time.monotonic() + (
                conf.SOCKET_CONNECT_TIMEOUT + conf.SOCKET_TIMEOUT + _OUTBOX_MARGIN
            )
        self.reconnects += 1
        # Anything cached before this subscription may have missed a message.
        local_tier.clear()
        with self._sent_lock:
            self._sent = {}
        self.renew_at = 0.0
        with self._read_lock:  # a reader may still be polling the last subscription
            self._handed.clear()
        self._pubsub = pubsub
        self.connected = True
        self.ping()  # whoever started the listener wants trust now
        while not self._stop.is_set():
            wait = _IDLE_POLL
            if self._drain_due:  # wake up for the next delivery of the outbox
                wait = min(wait, max(0.01, self._retry_at - time.monotonic()))
            msg = self._next(pubsub, wait)
            now = time.monotonic()
            if msg is not None and self._drain_due and now >= self._retry_at:
                # A busy bus never goes quiet: the retry's heartbeat is asked for here too.
                self.ping()
            if self._broken or self._stop.is_set():
                if self._stop.is_set():
                    return
                raise ConnectionError("the subscription was reconnected under the listener")
            if msg is None:
                with self._sent_lock:
                    oldest = min(self._sent.values(), default=now)
                if now - oldest > max(1.0, window * 2):
                    raise TimeoutError("no heartbeat answer")
                if self._drain_due:
                    self.ping()

    def _beat_connection(self, pool: Any) -> Any:
        """A connection of the subscription's pool that Redis sends no replies on (CLIENT
        REPLY OFF): heartbeats are sent on it from any thread without a wait. None where
        Redis refuses CLIENT REPLY (a managed service may): PINGs on the subscription then.
        OFF answers nothing and ON answers OK: an OFF taken leaves ON's OK the one reply."""
        conn = pool.make_connection()
        # A reader thread may connect it again (ping()): never longer than a read may wait.
        conn.socket_timeout = conf.SOCKET_TIMEOUT
        try:
            conn.connect()
            conn.send_command("CLIENT", "REPLY", "OFF")
            conn.send_command("CLIENT", "REPLY", "ON")
            if conn.read_response() not in (b"OK", "OK"):
                raise redis.ResponseError("CLIENT REPLY OFF refused")
            conn.send_command("CLIENT", "REPLY", "OFF")
        except redis.ResponseError as exc:
            conn.disconnect()
            logger.warning(
                "tiered_cache: Redis refuses CLIENT REPLY (%s); bus heartbeats are PINGs, "
                "which a Redis pausing writes still answers",
                exc,
            )
            return None
        except Exception:
            conn.disconnect()
            raise
        return conn

    def _pong(self, data: bytes, now: float, inline: bool) -> bool:
        """A heartbeat answered: every message published before it has been applied, so
        trust runs to its send time plus BUS_TRUST_WINDOW. inline: from a reader thread
        (poll()), which leaves it untouched to the listener (False) when trust lapsed or the
        outbox is due: delivering the outbox is the listener's job."""
        if inline and (self._drain_due or now >= self.trusted_until):
            return False
        with self._sent_lock:
            at = self._sent.pop(bytes(data), None)
            if at is None:
                return True
            for old in [k for k, v in self._sent.items() if v < at]:
                del self._sent[old]
        self.last_latency = now - at
        if at < self._quarantine:
            return True
        if self._drain_due or now >= self.trusted_until:
            if inline or now < self._retry_at:
                # inline: the outbox fell due since the check above; the next heartbeat
                # goes to the listener. Otherwise the last delivery failed: back off.
                return True
            self._drain_due = False
            if not self._regain():
                # Redis refused the outbox (or no replica acknowledged it): try again
                # later, each time twice as late up to 5 s, at a random point, or
                # every process would re-send the whole outbox (and its bus
                # messages) at every heartbeat while a replica is missing.
                self._drain_due = True
                self._backoff = min(5.0, max(0.1, self._backoff * 2))
                self._retry_at = now + self._backoff * random.uniform(0.5, 1.0)
                return True
            self._backoff = 0.0
        self.trusted_until = at + conf.BUS_TRUST_WINDOW
        if self._drain_due:  # an outbox write landed while we drained
            self.trusted_until = 0.0
            return True
        self.vouched_at = at
        with self._granted:
            self._granted.notify_all()
        if self._warned:
            self._warned = False
            logger.warning("tiered_cache: the invalidation bus is back; caching resumed")
        self._first.set()
        return True

    def _regain(self) -> bool:
        """Trust had lapsed (or never began): first apply what writers could not deliver
        while Redis was away (one query when the outbox is empty). False if Redis still
        refuses them: stay untrusted."""
        try:
            # Redis has just answered our heartbeat: deliver even if this process's
            # breaker is still open, or the other processes wait out its recovery time.
            drain_outbox(force=True)
            return True
        except Unavailable:
            return False
        except Exception as exc:  # the database: the outbox may hold what L2 lacks
            logger.warning("tiered_cache: could not read the outbox: %r", exc)
            connection.close()
            return False
        finally:
            # Kept open between heartbeats (a lapse after every idle spell would otherwise
            # connect anew), unless it broke or outlived CONN_MAX_AGE.
            connection.close_if_unusable_or_obsolete()

    def _handle(self, data: bytes, own: str) -> None:
        message = parse_message(data)
        if message is None:
            logger.warning(
                "tiered_cache: ignoring a bus message that is not ours: %r", bytes(data)[:200]
            )
        elif message.origin != own:
            if isinstance(message, Undelivered):
                self.undelivered()
            else:
                apply_message(message)


bus = Bus()
