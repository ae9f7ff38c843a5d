"""A Redis Sentinel topology the tests start and stop themselves: 1 master, 1 replica,
3 sentinels (quorum 2), every process ours, on spare ports, in a temporary directory, with
persistence off. The shared server on 6379 is never touched.

Layout (every address is 127.0.0.1):

    clients, sentinels, replica ──► relay :P ──► first node (master at start) :H (hidden)
    clients, sentinels          ──────────────► second node (replica at start) :R

The first node is only ever addressed through a relay (tests/relay.py): the sentinels
monitor 127.0.0.1:P, the replica replicates from 127.0.0.1:P, and the node announces P when
it is a replica itself. The relay lets `cut_off_replica()` partition the replication link
alone, silently: it freezes that one connection (recognised by the REPLCONF/PSYNC its client
sends) and keeps both of its sockets open, so the master still lists the replica as
connected (`connected_slaves:1`, WAIT times out) and the replica still reports its link up,
while nothing written from then on reaches the replica. `fail_over()` then kills the master
and the sentinels promote the replica that missed those writes: acknowledged writes lost.

Why the relay is the first node's address of record: a sentinel re-points
("+fix-slave-config") a replica whose master_host:master_port differs from the address it
monitors, so a replica replicating through a relay from a master monitored at another
address would be moved off the relay within seconds. Here nothing differs.

Timings are short so a failover takes seconds (see the constants of SentinelTopology);
repl-timeout is 60 s on both nodes so neither notices a frozen link during a test.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from tests.processes import wait_for
from tests.redis_server import REDIS_SERVER, free_port
from tests.relay import RelayProcess

HOST = "127.0.0.1"
Address = tuple[str, int]

# Every process any topology started and has not killed yet: killed at interpreter exit
# too, so an aborted run (a failed fixture, a KeyboardInterrupt) leaves nothing behind.
_LIVE: set[subprocess.Popen[bytes]] = set()


def _kill_live() -> None:
    for proc in list(_LIVE):
        _kill(proc)


atexit.register(_kill_live)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL and reap (a stopped process dies of SIGKILL too)."""
    if proc.poll() is None:
        try:
            proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        pass
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
    _LIVE.discard(proc)


def _probe(port: int, timeout: float = 1.0, decode: bool = False) -> redis.Redis:
    """A client for polling: no retries of its own (the polling is the retry), so a dead
    server answers with an error at once instead of after redis-py's backoff."""
    return redis.Redis(
        host=HOST,
        port=port,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        decode_responses=decode,
    )


def _holds(predicate: Callable[[], bool]) -> Callable[[], bool]:
    """The predicate, with a Redis error or a missing field counting as 'not yet'."""

    def check() -> bool:
        try:
            return predicate()
        except (redis.RedisError, OSError, LookupError, ValueError, TypeError):
            return False

    return check


def _tail(path: Path, lines: int = 8) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _fields(answer: Any) -> dict[str, str]:
    """A sentinel's field/value answer as a dict of strings, whether redis-py handed it
    over as a flat list or already as a dict."""
    if isinstance(answer, dict):
        return {str(k): str(v) for k, v in answer.items()}
    return {str(k): str(v) for k, v in zip(answer[::2], answer[1::2], strict=True)}


class _Process:
    """One process we start, log to a file of its own, kill with SIGKILL, and poll through
    one cached client (a fresh connection per poll would leave thousands in TIME_WAIT)."""

    def __init__(self, directory: Path, port: int, decode: bool) -> None:
        self.dir = directory
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._decode = decode
        self._probe: redis.Redis | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log(self) -> Path:
        return self.dir / f"{self.dir.name}-{self.starts}.log"

    def probe(self) -> redis.Redis:
        if self._probe is None:
            self._probe = _probe(self.port, decode=self._decode)
        return self._probe

    def spawn(self, args: list[str], what: str) -> None:
        """Start the process and return once it answers PING; fail at once if it exits
        (a port taken since it was chosen, a bad config), with its log."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        _LIVE.add(self.proc)

        def pings() -> bool:
            if not self.alive:
                raise RuntimeError(f"{what} on port {self.port} exited:\n{_tail(self.log)}")
            return _holds(lambda: bool(self.probe().ping()))()

        if not wait_for(pings, 20, step=0.02):
            raise TimeoutError(f"{what} on port {self.port} did not start:\n{_tail(self.log)}")

    def kill(self) -> None:
        if self.proc is not None:
            _kill(self.proc)
            self.proc = None
        if self._probe is not None:
            self._probe.close()
            self._probe = None


class _Node(_Process):
    """One redis-server data node. `port` is where it listens, `public_port` the address
    everyone else uses for it (the relay's, for the first node)."""

    def __init__(self, name: str, workdir: Path, port: int, public_port: int) -> None:
        super().__init__(workdir / name, port, decode=False)
        self.name = name
        self.public_port = public_port

    @property
    def address(self) -> Address:
        return (HOST, self.public_port)

    def start(self, replicaof: Address | None) -> None:
        """Start empty (no dump file can be loaded), with a config file of its own: the
        sentinels rewrite it (CONFIG REWRITE) when they reconfigure the node."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for leftover in self.dir.glob("*.rdb"):
            leftover.unlink()
        lines = [
            f"port {self.port}",
            f"bind {HOST}",
            "protected-mode no",
            'save ""',
            "appendonly no",
            f'dir "{self.dir}"',
            # A replica's full sync leaves an RDB behind otherwise, which a restart loads.
            "rdb-del-sync-files yes",
            # A full sync starts at once (the default waits 5 s for more replicas).
            "repl-diskless-sync-delay 0",
            # Long enough that neither side of a frozen link gives up during a test.
            "repl-timeout 60",
            # As a replica, the node is known by its public address (the relay's).
            f"replica-announce-ip {HOST}",
            f"replica-announce-port {self.public_port}",
        ]
        if replicaof is not None:
            lines.append(f"replicaof {replicaof[0]} {replicaof[1]}")
        conf = self.dir / "redis.conf"
        conf.write_text("\n".join(lines) + "\n")
        self.spawn([REDIS_SERVER, str(conf)], f"redis-server {self.name}")

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A plain client straight to the process (never through the relay)."""
        return redis.Redis(
            host=HOST, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def replication(self) -> dict[str, Any]:
        info: dict[str, Any] = self.probe().info("replication")
        return info


class _SentinelProc(_Process):
    def __init__(self, workdir: Path, index: int, port: int) -> None:
        super().__init__(workdir / f"sentinel-{index}", port, decode=True)

    def start(self, lines: list[str], tuning: dict[str, int]) -> None:
        """A fresh config file each start (a sentinel writes its id, its peers and the
        topology it learnt into it: an old one would bring an old topology back), then
        its timers shortened with SENTINEL DEBUG (not settable in the config file)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "sentinel.conf"
        header = [f"port {self.port}", f"bind {HOST}", f'dir "{self.dir}"']
        conf.write_text("\n".join(header + lines) + "\n")
        self.spawn([REDIS_SERVER, str(conf), "--sentinel"], "sentinel")
        args: list[str | int] = []
        for name, value in tuning.items():
            args += [name, value]
        self.sentinel("DEBUG", *args)

    def sentinel(self, *args: str | int) -> Any:
        """A raw SENTINEL command, not redis-py's sentinel_* helpers: their answers change
        shape between redis-py versions."""
        return self.probe().execute_command("SENTINEL", *args)  # type: ignore[no-untyped-call]

    def master_state(self, service: str) -> dict[str, str]:
        """SENTINEL MASTER: field name to value, as the sentinel sends them."""
        return _fields(self.sentinel("MASTER", service))

    def replicas(self, service: str) -> list[dict[str, str]]:
        return [_fields(row) for row in self.sentinel("REPLICAS", service)]

    def master_address(self, service: str) -> Address | None:
        answer = self.sentinel("GET-MASTER-ADDR-BY-NAME", service)
        return None if not answer else (str(answer[0]), int(answer[1]))


class _Relay(RelayProcess):
    """The relay (tests/relay.py) in front of the first node, with the liveness and kill of
    the other processes here."""

    def __init__(self, workdir: Path, port: int, upstream: int) -> None:
        super().__init__(port, upstream, workdir / "relay.log")
        self.port = port

    @property
    def alive(self) -> bool:
        return self.running()

    def start(self) -> None:
        super().start()
        assert self.proc is not None
        _LIVE.add(self.proc)


class SentinelTopology:
    """1 master, 1 replica and 3 sentinels (quorum 2) on spare ports under `workdir`.

    The ports are chosen once, here, and kept across stop()/start()/heal(), so settings
    built from `sentinels` (cache_settings()) stay valid for the topology's whole life.
    """

    SERVICE = "tcmaster"  # each instance's service name starts so (__init__)
    # Not 500: a promoting sentinel ends with CLIENT KILL TYPE normal/pubsub on the new
    # master, which cuts the other sentinels' links to it, and a sentinel reconnects only
    # once per ping-period. With down-after 500 and the default ping-period of 1000 two
    # sentinels marked the new master SDOWN together and failed over again, back and forth
    # (to an old master just restarted empty, losing everything).
    DOWN_AFTER_MS = 1000
    # Also the delay before a failover that went wrong is tried again (twice this).
    FAILOVER_TIMEOUT_MS = 3000
    # The sentinels' internal periods (ms), set with SENTINEL DEBUG after each start:
    # - ping-period 400: PINGs, and reconnections of a dropped link, 2.5 times a second.
    #   Not less: while the master is down a replica is a candidate only if its last INFO
    #   is younger than 5 ping-periods, and replicas of a down master are sent INFO once a
    #   second whatever info-period says; at 200 that is no margin at all, and on a loaded
    #   machine the first try failed (-failover-abort-no-good-slave, 6 s lost);
    # - info-period 1000: INFO every second, not 10 (replicas and role changes seen soon);
    # - publish-period 500: hellos twice a second (peers found quickly; an old master that
    #   comes back as a master is converted to a replica after 4 of these);
    # - ask-period 500: sentinels ask each other about a down master twice a second;
    # - tilt-period 5000: a sentinel stalled > 2 s (a loaded machine) refuses to act for
    #   this long, 30 s by default.
    SENTINEL_TUNING = {
        "ping-period": 400,
        "info-period": 1000,
        "publish-period": 500,
        "ask-period": 500,
        "tilt-period": 5000,
    }
    # How long the sentinels must agree, without a break, before a failover counts as
    # over: longer than down-after plus a reconnection, so a relapse shows up inside it.
    SETTLE_S = 2.0
    # Written by nobody: DEL of a key that does not exist is a write command (refused
    # with READONLY by a replica) that leaves nothing behind and propagates nothing.
    PROBE_KEY = "__sentinel_topology_probe__"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        ports: list[int] = []
        while len(ports) < 6:  # bind(0) can hand out a port twice
            port = free_port()
            if port not in ports:
                ports.append(port)
        relay_port, hidden_port, replica_port, *sentinel_ports = ports
        self.first = _Node("first", workdir, hidden_port, relay_port)
        self.second = _Node("second", workdir, replica_port, replica_port)
        self.nodes = (self.first, self.second)
        self.relay = _Relay(workdir, relay_port, hidden_port)
        self._sentinels = [_SentinelProc(workdir, i, p) for i, p in enumerate(sentinel_ports)]
        self.sentinels: list[tuple[str, int]] = [(HOST, p) for p in sentinel_ports]
        # A service name of its own: django-redis keeps its connection pools for the life of
        # the process by URL (redis://<service>/0), so two topologies under one name (the
        # run's, and test_failover's) would share the first one's pool and sentinels.
        self.SERVICE = f"{type(self).SERVICE}{relay_port}"
        self._cut = False
        self._killed: _Node | None = None
        self.started = False

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """(Re)start everything, empty, and return once the topology is healthy: the
        replica in sync and receiving the stream, every sentinel agreeing on the master,
        knowing the replica and both other sentinels (without which no failover leader
        could be elected)."""
        self.stop()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.started = True
        self.relay.start()
        self.first.start(replicaof=None)
        self.second.start(replicaof=self.first.address)
        self._wait(lambda: self._in_sync(self.first, self.second), 30, "the replica did not sync")
        self._catch_up(self.first, 15, "after its first sync")
        # Only now: a sentinel learns replicas from the master's INFO, and the first one
        # comes at once, the next a second later.
        monitor = [
            "protected-mode no",
            "sentinel resolve-hostnames no",
            "sentinel announce-hostnames no",
            f"sentinel monitor {self.SERVICE} {HOST} {self.relay.port} 2",
            f"sentinel down-after-milliseconds {self.SERVICE} {self.DOWN_AFTER_MS}",
            f"sentinel failover-timeout {self.SERVICE} {self.FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {self.SERVICE} 1",
        ]
        for s in self._sentinels:
            s.start(monitor, self.SENTINEL_TUNING)
        self._wait(
            lambda: self._sentinels_agree(self.first, self.second),
            30,
            "the sentinels did not agree on the master, the replica and each other",
        )

    def stop(self) -> None:
        """Kill every process this topology started (sentinels first, so they do not react
        to the rest going away). Idempotent."""
        for s in self._sentinels:
            s.kill()
        for node in self.nodes:
            node.kill()
        self.relay.kill()
        self._cut = False
        self._killed = None
        if self.started:
            self._forget_django_redis_pools()
        self.started = False

    def heal(self) -> None:
        """Back to the state start() leaves (the first node master behind the relay, the
        second its in-sync replica, three agreeing sentinels, no cut), whatever happened.
        Nothing is restarted, and no data lost, when that is already the state; otherwise
        everything is started again, empty."""
        if self.started and self._healthy():
            return
        self.start()

    # -- looking inside ------------------------------------------------------------------
    def master_address(self) -> tuple[str, int]:
        """The master's address as the sentinels give it (SENTINEL get-master-addr-by-name):
        the most common answer among the sentinels that answer (they can disagree for a
        moment during a failover)."""
        answers: list[Address] = []
        for s in self._sentinels:
            try:
                address = s.master_address(self.SERVICE)
            except redis.RedisError:
                continue
            if address is not None:
                answers.append(address)
        if not answers:
            raise redis.ConnectionError(f"no sentinel knows the master of {self.SERVICE}")
        return Counter(answers).most_common(1)[0][0]

    def master_client(self) -> redis.Redis:
        """A plain client to the current master, straight to its process (not through the
        relay, so it works whatever the relay was told)."""
        return self._master_node().client()

    def replica_client(self) -> redis.Redis:
        """A plain client to the node that is not the current master, straight to its
        process; LookupError if that node is not running (fail_over() killed it and
        restart_old_master_as_replica() was not called)."""
        replica = self._other(self._master_node())
        if not replica.alive:
            raise LookupError(f"no replica is running: {replica.name} was killed")
        return replica.client()

    def cache_settings(self, base: dict[str, Any]) -> dict[str, Any]:
        """A django-redis CACHES entry reaching this topology through its sentinels.

        django-redis 7 needs four things for Sentinel: CLIENT_CLASS SentinelClient (it turns
        LOCATION into a master URL and a replica URL: reads go to a replica), the
        CONNECTION_FACTORY SentinelConnectionFactory (the one that reads SENTINELS: the
        default factory builds the pool without its service name and fails), a
        SentinelConnectionPool, and the service name as the URL's host. SENTINEL_KWARGS
        are the options of the connections to the sentinels: without them redis-py reuses
        the data connections' socket timeouts (0.25 s in the test settings), short enough
        for a busy sentinel to look absent. `base`'s own OPTIONS win over that default.
        """
        return {
            **base,
            "LOCATION": f"redis://{self.SERVICE}/0",
            "OPTIONS": {
                "SENTINEL_KWARGS": {"socket_timeout": 2.0, "socket_connect_timeout": 2.0},
                **base.get("OPTIONS", {}),
                "CLIENT_CLASS": "django_redis.client.SentinelClient",
                "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
                "SENTINELS": self.sentinels,
                "CONNECTION_POOL_CLASS": "redis.sentinel.SentinelConnectionPool",
            },
        }

    def diagnostics(self) -> str:
        """What every process says about the topology, for failure messages."""
        out: list[str] = []
        for node in self.nodes:
            try:
                info = node.replication()
                summary = {k: v for k, v in info.items() if not k.startswith("master_repl")}
                out.append(f"{node.name} :{node.port} (public {node.public_port}): {summary}")
            except redis.RedisError as exc:
                out.append(f"{node.name} :{node.port}: {exc!r}")
        try:
            out.append(f"relay :{self.relay.port}: {' '.join(self.relay.command('status', 2))}")
        except (OSError, RuntimeError) as exc:
            out.append(f"relay :{self.relay.port}: {exc!r}")
        keys = ("ip", "port", "flags", "num-slaves", "num-other-sentinels", "config-epoch")
        for s in self._sentinels:
            try:
                state = s.master_state(self.SERVICE)
                replicas = [(r["ip"], r["port"], r["flags"]) for r in s.replicas(self.SERVICE)]
                view = f"{[state.get(k) for k in keys]} replicas={replicas}"
            except redis.RedisError as exc:
                view = repr(exc)
            out.append(f"sentinel :{s.port}: {view}\n{_tail(s.log)}")
        return "\n".join(out)

    # -- faults --------------------------------------------------------------------------
    def cut_off_replica(self) -> None:
        """Partition the replication link, silently. Everything written before the call has
        reached the replica when it returns; nothing written after ever will. The master
        keeps believing the replica connected (`connected_slaves:1`) while WAIT 1 <ms>
        times out and returns 0 (the replica's ACKs are dropped too); the replica keeps
        reporting its link up. Needs the first node as master (its replication link is the
        one through the relay): heal() first if needed."""
        if self._master_node() is not self.first or not self.second.alive:
            raise RuntimeError("cut_off_replica() needs the initial layout: call heal() first")
        if self._cut:
            return
        self._catch_up(self.first, 15, "before the cut")
        frozen = int(self.relay.command("cut")[-1])
        self._cut = True
        if frozen < 1:
            raise RuntimeError("no replication connection went through the relay to freeze")

    def fail_over(self, timeout: float = 30) -> tuple[str, int]:
        """kill -9 the current master and wait until the sentinels have promoted the other
        node and settled (every sentinel names it and sees it healthy, for SETTLE_S without
        a break), it reports role master, and a client asking the sentinels (redis-py
        Sentinel.master_for) reaches it and may write. Returns its address."""
        old = self._master_node()
        new = self._other(old)
        if not new.alive:
            raise RuntimeError(f"no replica to promote: {new.name} is not running")
        old.kill()
        self._killed = old
        deadline = time.monotonic() + timeout
        self._wait(
            lambda: self._settled(new),
            timeout,
            f"the sentinels did not all promote {new.name} at {new.address} and settle",
            hold=self.SETTLE_S,
        )
        self._wait(
            lambda: new.replication()["role"] == "master",
            deadline - time.monotonic(),
            f"{new.name} did not become master",
        )
        sentinel: Any = Sentinel(  # type: ignore[no-untyped-call]
            self.sentinels, sentinel_kwargs={"socket_timeout": 2.0}
        )

        def reachable() -> bool:
            client = sentinel.master_for(self.SERVICE, socket_timeout=2.0)
            try:
                client.delete(self.PROBE_KEY)  # a write: READONLY on anything but a master
                pool: Any = client.connection_pool
                return tuple(pool.get_master_address()) == new.address
            finally:
                client.close()

        try:
            self._wait(
                reachable,
                deadline - time.monotonic(),
                f"a client asking the sentinels did not reach {new.name} as master",
            )
        finally:
            for s in sentinel.sentinels:
                s.close()
        if self._cut:
            # The frozen link went with the old master (the promoted replica dropped its
            # end): replication through the relay, if ever again, must flow.
            self.relay.command("restore")
            self._cut = False
        return new.address

    def restart_old_master_as_replica(self, timeout: float = 30) -> None:
        """Start the node fail_over() killed again, empty, on the same port, as a master
        (as a crashed master comes back with its old config), and wait until the
        sentinels have turned it into a replica of the new master ("+convert-to-slave"),
        it is connected, in sync and receiving the stream, and every sentinel sees it as
        a healthy replica."""
        node = self._killed
        if node is None:
            raise RuntimeError("no node was killed by fail_over()")
        master = self._other(node)
        deadline = time.monotonic() + timeout
        # Not while a sentinel could still think the master down: it would promote the
        # empty node. (fail_over() waited for a settled state already; this catches
        # whatever happened since.)
        self._wait(
            lambda: self._settled(master),
            timeout,
            f"the sentinels did not settle on {master.name} before the restart",
        )
        node.start(replicaof=None)
        self._killed = None
        self._wait(
            lambda: self._in_sync(master, node),
            deadline - time.monotonic(),
            f"{node.name} did not become an in-sync replica of {master.name}",
        )
        self._catch_up(master, max(deadline - time.monotonic(), 1.0), "after its sync")
        self._wait(
            lambda: self._sentinels_agree(master, node),
            deadline - time.monotonic(),
            f"the sentinels did not see {node.name} as a healthy replica of {master.name}",
            hold=0.5,
        )

    # -- internals -------------------------------------------------------------------------
    def _node_at(self, address: Address) -> _Node:
        for node in self.nodes:
            if node.address == address:
                return node
        raise LookupError(f"the sentinels name {address}, not a node of this topology")

    def _master_node(self) -> _Node:
        return self._node_at(self.master_address())

    def _other(self, node: _Node) -> _Node:
        return self.second if node is self.first else self.first

    def _in_sync(self, master: _Node, replica: _Node) -> bool:
        """The master lists exactly this replica, online; the replica's link is up, synced."""
        m = master.replication()
        r = replica.replication()
        slave = m.get("slave0", {})
        return bool(
            m["role"] == "master"
            and int(m["connected_slaves"]) == 1
            and slave.get("state") == "online"
            and int(slave.get("port", 0)) == replica.public_port
            and r["role"] == "slave"
            and r["master_link_status"] == "up"
            and int(r["master_sync_in_progress"]) == 0
            and int(r["master_port"]) == master.public_port
        )

    def _catch_up(self, master: _Node, timeout: float, when: str) -> None:
        """Return once the replica has acknowledged everything written to the master so
        far: a PUBLISH (propagated to replicas, leaves no data) moves this client's
        replication offset past every earlier write, and WAIT makes the master ask the
        replica for its ACK at once.

        Also the only proof that a fresh replica receives the stream at all: after a
        diskless full sync the master lists the replica as online but holds the stream
        back until the replica's first ACK, and ignores an ACK that arrives before it has
        reaped its RDB child (up to 100 ms later); the replica's next ACK is a second
        later, and writes made in that second reach the replica only then (seen: a read
        from the replica right after start() missed a write)."""
        probe = _probe(master.port, timeout=timeout + 5)
        try:
            probe.publish("__sentinel_topology__", "sync")
            acked = probe.wait(1, int(timeout * 1000))
        finally:
            probe.close()
        if acked != 1:
            raise TimeoutError(
                f"the replica of {master.name} did not catch up {when} within {timeout:.1f} s"
                f"\n{self.diagnostics()}"
            )

    def _settled(self, master: _Node) -> bool:
        """Every sentinel names this master, sees it healthy (flags exactly 'master': no
        s_down, no failover in progress) and knows both other sentinels."""
        for s in self._sentinels:
            state = s.master_state(self.SERVICE)
            if (state["ip"], int(state["port"])) != master.address or state["flags"] != "master":
                return False
            if int(state["num-other-sentinels"]) != 2:
                return False
        return True

    def _sentinels_agree(self, master: _Node, replica: _Node) -> bool:
        """Settled on this master, and every sentinel knows this replica, reachable, with
        its link up."""
        if not self._settled(master):
            return False
        for s in self._sentinels:
            healthy = [
                r
                for r in s.replicas(self.SERVICE)
                if (r["ip"], int(r["port"])) == replica.address
                and r["flags"] == "slave"
                and r["master-link-status"] == "ok"
            ]
            if not healthy:
                return False
        return True

    def _healthy(self) -> bool:
        if self._cut or self._killed is not None:
            return False
        processes: list[Any] = [self.relay, *self.nodes, *self._sentinels]
        if not all(p.alive for p in processes):
            return False
        return _holds(
            lambda: (
                self._in_sync(self.first, self.second)
                and int(self.first.replication()["slave0"]["lag"]) <= 3
                and self._sentinels_agree(self.first, self.second)
            )
        )()

    def _wait(
        self, predicate: Callable[[], bool], timeout: float, what: str, hold: float = 0.0
    ) -> None:
        """Poll until the predicate holds, and has held without a break for `hold` seconds
        (a failover can relapse); otherwise TimeoutError naming what did not happen, with
        what every process says."""
        check = _holds(predicate)
        deadline = time.monotonic() + max(timeout, 0.1)
        since: float | None = None
        while True:
            now = time.monotonic()
            if check():
                since = now if since is None else since
                if now - since >= hold:
                    return
            else:
                since = None
            if now > deadline:
                raise TimeoutError(f"{what} within {timeout:.1f} s\n{self.diagnostics()}")
            time.sleep(0.05)

    def _forget_django_redis_pools(self) -> None:
        """django-redis keeps its connection pools process-wide, keyed by LOCATION alone
        (redis://tcmaster/0 for every topology): a later topology would be handed a pool
        still asking these, dead, sentinels. Drop the pools that ask ours."""
        module = sys.modules.get("django_redis.pool")
        if module is None:
            return
        pools: dict[str, Any] = module.ConnectionFactory._pools
        ours = set(self.sentinels)
        for url, pool in list(pools.items()):
            manager = getattr(pool, "sentinel_manager", None)
            if manager is None:
                continue
            asked = set()
            for client in manager.sentinels:
                kwargs = client.connection_pool.connection_kwargs
                asked.add((kwargs.get("host"), kwargs.get("port")))
            if asked & ours:
                pool.disconnect()
                del pools[url]
