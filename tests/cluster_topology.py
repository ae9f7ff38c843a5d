"""A private Redis Cluster (3 masters, 3 replicas) that the tests start, break and stop.

Nothing here touches the shared server on 6379: every node is a redis-server this module
started on a spare port, in a temporary directory, with persistence off.

Every node sits behind a TCP relay (tests/relay.py) and announces the relay's address as
its own (cluster-announce-port, replica-announce-port), while the cluster bus goes straight
to the node (cluster-announce-bus-port is the real bus port). Clients are therefore given
the relays' addresses, and so is every replica: its replication link to its master runs
through the master's relay. `cut_off_replica_of(A)` tells A's relay to freeze that link in
both directions while keeping both sockets open: A still lists its replica as connected
(INFO replication) but no longer receives its ACKs (WAIT times out), the replica still
believes its link is up but receives nothing more. The bus is untouched, so the cluster
keeps agreeing, and when A is killed its (cut-off) replica is elected in its place
(cluster-replica-validity-factor 0: a replica may fail over whatever the age of its data).
Whatever A accepted after the cut is then really lost. The cut holds for repl-timeout (60
s): after that A drops the silent replica and the replica gives up on A (its reconnection
through the cut relay is frozen too, so the link then shows down on both sides).

Killed nodes keep nothing but their nodes.conf (no persistence, the RDB of a full sync is
deleted), so a restarted one always resynchronises from scratch.

Ports: data ports in 20000-22767, so that the bus port (+10000) is in 30000-32767; relay
ports in 23000-29999. All are below the ephemeral range (32768+), where free_port() and
outgoing connections take theirs.
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.processes import wait_for
from tests.relay import RelayProcess

REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN", "redis-server")
REDIS_CLI = os.environ.get("REDIS_CLI_BIN", "redis-cli")
ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
SLOTS = 16384
NODE_TIMEOUT_MS = 1000

Address = tuple[str, int]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


class _Relay(RelayProcess):
    """tests/relay.py in front of one node, started at once; `cut` is whether its
    replication link is cut now."""

    def __init__(self, listen_port: int, upstream_port: int, log: Path) -> None:
        super().__init__(listen_port, upstream_port, log)
        self.cut = False
        self.start()

    def alive(self) -> bool:
        return self.running()

    def say(self, command: str) -> str:
        """A command, and its whole answer line ("ok cut 1")."""
        return " ".join(["ok", *self.command(command)])


class _Node:
    """One redis-server in cluster mode, its directory, and the relay it announces."""

    def __init__(self, index: int, port: int, relay_port: int, workdir: Path) -> None:
        self.index = index
        self.port = port
        self.bus_port = port + 10000
        self.relay_port = relay_port
        self.dir = workdir / f"node-{index}-{port}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.relay: _Relay | None = None
        self.starts = 0
        self._client: redis.Redis | None = None

    @property
    def address(self) -> Address:
        return (HOST, self.relay_port)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        """Straight to the node (not through its relay), str replies, short timeouts."""
        if self._client is None:
            self._client = redis.Redis(
                host=HOST,
                port=self.port,
                decode_responses=True,
                socket_timeout=2,
                socket_connect_timeout=1,
            )
        return self._client

    def start_relay(self) -> None:
        if self.relay is None or not self.relay.alive():
            self.relay = _Relay(self.relay_port, self.port, self.dir / "relay.log")

    def start(self) -> None:
        for stale in [*self.dir.glob("*.rdb"), *self.dir.glob("temp-*")]:
            stale.unlink()  # killed: nothing survives but nodes.conf
        self.starts += 1
        with open(self.dir / f"redis-{self.starts}.log", "wb") as log:
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    HOST,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--rdb-del-sync-files",
                    "yes",
                    "--dir",
                    str(self.dir),
                    "--protected-mode",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(NODE_TIMEOUT_MS),
                    "--cluster-replica-validity-factor",
                    "0",
                    "--repl-timeout",
                    "60",
                    "--repl-diskless-sync-delay",
                    "0",
                    "--cluster-announce-ip",
                    HOST,
                    "--cluster-announce-port",
                    str(self.relay_port),
                    "--cluster-announce-bus-port",
                    str(self.bus_port),
                    "--replica-announce-ip",
                    HOST,
                    "--replica-announce-port",
                    str(self.relay_port),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def pings(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- what the node says ----------------------------------------------------------
    def cluster_nodes(self) -> list[dict[str, Any]]:
        return _parse_nodes(self.client().execute_command("CLUSTER", "NODES"))

    def cluster_info(self) -> dict[str, str]:
        text = self.client().execute_command("CLUSTER", "INFO")
        return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def replication(self) -> dict[str, Any]:
        return self.client().info("replication")


def _parse_nodes(text: str) -> list[dict[str, Any]]:
    """CLUSTER NODES, one dict a node: id, address (announced), flags, master_id, epoch,
    link, slots as (first, last) ranges."""
    nodes = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, addr, flags, master, _ping, _pong, epoch, link = parts[:8]
        host, _, port = addr.split("@")[0].split(",")[0].rpartition(":")
        slots = []
        for s in parts[8:]:
            if s.startswith("["):
                continue  # a slot being migrated or imported
            first, _, last = s.partition("-")
            slots.append((int(first), int(last or first)))
        nodes.append(
            {
                "id": node_id,
                "address": (host, int(port)),
                "flags": set(flags.split(",")),
                "master_id": None if master == "-" else master,
                "epoch": int(epoch),
                "link": link,
                "slots": sorted(slots),
            }
        )
    return nodes


def _slot_map(nodes: list[dict[str, Any]]) -> frozenset[tuple[str, tuple[tuple[int, int], ...]]]:
    return frozenset(
        (n["id"], tuple(n["slots"]))
        for n in nodes
        if "master" in n["flags"] and n["slots"] and "fail" not in n["flags"]
    )


class ClusterTopology:
    """Six redis-servers in cluster mode behind six relays: 3 masters with a replica each."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.nodes: list[_Node] = []
        taken: set[int] = set()
        rng = random.Random()
        for i in range(6):
            while True:
                port = rng.randrange(20000, 22768)
                if {port, port + 10000} & taken or not (
                    _bindable(port) and _bindable(port + 10000)
                ):
                    continue
                break
            taken |= {port, port + 10000}
            while True:
                relay_port = rng.randrange(23000, 30000)
                if relay_port not in taken and _bindable(relay_port):
                    break
            taken.add(relay_port)
            self.nodes.append(_Node(i, port, relay_port, self.workdir))
        self.startup_nodes: list[Address] = [n.address for n in self.nodes]
        self.timings: dict[str, list[float]] = {}
        self._promoted: dict[int, int] = {}  # killed node index -> the replica elected
        atexit.register(self.stop)

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        for n in self.nodes:
            n.start()
        for n in self.nodes:
            self._wait(n.pings, 10, f"redis-server on {n.port} did not start")
            n.start_relay()
        cli = subprocess.run(
            [
                REDIS_CLI,
                "--cluster",
                "create",
                *(f"{h}:{p}" for h, p in self.startup_nodes),
                "--cluster-replicas",
                "1",
                "--cluster-yes",
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )
        (self.workdir / "cluster-create.log").write_bytes(cli.stdout + cli.stderr)
        if cli.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({cli.returncode}):\n"
                f"{cli.stdout.decode(errors='replace')}{cli.stderr.decode(errors='replace')}"
            )
        self._wait(self._healthy, 30, "the cluster did not come up healthy")
        self._timed("start", t0)

    def stop(self) -> None:
        """Kill every node and relay. Idempotent."""
        for n in self.nodes:
            n.kill()
            if n.relay is not None:
                n.relay.stop()
                n.relay = None

    def heal(self, timeout: float = 30) -> None:
        """Back to 3 masters with an in-sync replica each and no cut link: relays restored,
        dead nodes restarted; if that does not converge, everything starts again from
        nothing on the same ports (the data is lost then)."""
        t0 = time.monotonic()
        try:
            for n in self.nodes:
                n.start_relay()
                if n.relay is not None and n.relay.cut:
                    n.relay.say("restore")
                    n.relay.cut = False
            for n in self.nodes:
                if not n.alive():
                    n.kill()
                    n.start()
            self._wait(self._healthy, timeout, "the cluster did not heal")
        except (TimeoutError, RuntimeError, OSError):
            self.stop()
            for n in self.nodes:
                shutil.rmtree(n.dir, ignore_errors=True)
                n.dir.mkdir(parents=True)
            self.start()
        self._promoted.clear()
        self._timed("heal", t0)

    # -- views -----------------------------------------------------------------------
    def masters(self) -> list[dict[str, Any]]:
        """The masters serving slots, as the first live node sees them: address (the one
        announced, clients use it), node_id, slots [(first, last), ...], replica (address
        of a replica not marked failed, or None), replicas (all of them, addresses)."""
        view = self._view()
        out = []
        for m in view:
            if "master" not in m["flags"] or "fail" in m["flags"] or not m["slots"]:
                continue
            replicas = [
                r["address"] for r in view if r["master_id"] == m["id"] and "fail" not in r["flags"]
            ]
            out.append(
                {
                    "address": m["address"],
                    "node_id": m["id"],
                    "slots": m["slots"],
                    "replica": replicas[0] if replicas else None,
                    "replicas": replicas,
                }
            )
        return sorted(out, key=lambda m: m["slots"])

    def master_of_slot(self, slot: int) -> Address:
        for m in self.masters():
            if any(a <= slot <= b for a, b in m["slots"]):
                return m["address"]
        raise LookupError(f"no master serves slot {slot}")

    def node_client(
        self, address: Address | str, via_relay: bool = False, **kwargs: Any
    ) -> redis.Redis:
        """A plain client to one node, straight to its real port (or through its relay, the
        address clients are given, with via_relay). Bytes replies unless told otherwise."""
        n = self._node(address)
        options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2, **kwargs}
        return redis.Redis(host=HOST, port=n.relay_port if via_relay else n.port, **options)

    def cluster_client(self, **kwargs: Any) -> RedisCluster:
        options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2, **kwargs}
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in self.startup_nodes], **options
        )

    def relay_status(self, address: Address | str) -> str:
        n = self._node(address)
        assert n.relay is not None
        return n.relay.say("status")

    # -- faults ----------------------------------------------------------------------
    def cut_off_replica_of(self, master_address: Address | str) -> None:
        """Freeze the replication link(s) of that master in both directions, sockets kept
        open: the master still counts its replica connected, its ACKs stop (WAIT returns
        0), the replica receives nothing more and does not know."""
        n = self._node(master_address)
        assert n.relay is not None
        answer = n.relay.say("cut")
        n.relay.cut = True
        if int(answer.split()[-1]) < 1:
            raise RuntimeError(f"no replication link went through {n.address}: {answer}")

    def fail_over(self, master_address: Address | str, timeout: float = 30) -> Address:
        """kill -9 that master, wait until its replica has been elected in its place, every
        live node says cluster_state:ok and agrees, and a new RedisCluster client routes
        the slots to the new master. Returns the new master's address."""
        t0 = time.monotonic()
        old = self._node(master_address)
        mine = next((m for m in self.masters() if m["address"] == old.address), None)
        if mine is None or mine["replica"] is None:
            raise RuntimeError(f"{old.address} is not a master with a replica")
        new = self._node(mine["replica"])
        slots = mine["slots"]
        old.kill()

        def promoted() -> bool:
            me = next(x for x in new.cluster_nodes() if "myself" in x["flags"])
            if "master" not in me["flags"] or me["slots"] != slots:
                return False
            if not self._agreed():
                return False
            if any((m["node_id"] == me["id"]) != (m["slots"] == slots) for m in self.masters()):
                return False
            return self._routes(slots, new.address)

        self._wait(promoted, timeout, f"{new.address} was not elected in place of {old.address}")
        self._promoted[old.index] = new.index
        self._timed("fail_over", t0)
        return new.address

    def restart_old_master_as_replica(
        self, old_address: Address | str, timeout: float = 30
    ) -> None:
        """Start the killed node again with its nodes.conf (its data is gone): it learns
        its slots moved and becomes a replica of the node elected in its place. Waits until
        it is a connected, in-sync replica that every node agrees on."""
        t0 = time.monotonic()
        old = self._node(old_address)
        if old.alive():
            raise RuntimeError(f"{old.address} is running")
        assert old.relay is not None
        if old.relay.cut:
            old.relay.command("restore")
            old.relay.cut = False
        new_index = self._promoted.get(old.index)
        old.kill()
        old.start()

        def rejoined() -> bool:
            me = next(x for x in old.cluster_nodes() if "myself" in x["flags"])
            if "slave" not in me["flags"]:
                return False
            master = next(
                (n for n in self.nodes if n.alive() and self._id(n) == me["master_id"]), None
            )
            if master is None or (new_index is not None and master.index != new_index):
                return False
            info = old.replication()
            if info.get("master_link_status") != "up" or info.get("master_sync_in_progress"):
                return False
            if not self._agreed():
                return False
            for n in self._live():
                seen = next(x for x in n.cluster_nodes() if x["address"] == old.address)
                if "fail" in seen["flags"] or "slave" not in seen["flags"]:
                    return False
            return master.client().wait(1, 200) >= 1

        self._wait(rejoined, timeout, f"{old.address} did not rejoin as a replica")
        self._promoted.pop(old.index, None)
        self._timed("restart", t0)

    # -- internals -------------------------------------------------------------------
    def _node(self, address: Address | str) -> _Node:
        if isinstance(address, str):
            host, _, port = address.rpartition(":")
            address = (host, int(port))
        port = int(address[1])
        for n in self.nodes:
            if port in (n.relay_port, n.port):
                return n
        raise LookupError(f"no node at {address}")

    def _live(self) -> list[_Node]:
        return [n for n in self.nodes if n.alive()]

    def _id(self, node: _Node) -> str:
        return str(node.client().execute_command("CLUSTER", "MYID"))

    def _view(self) -> list[dict[str, Any]]:
        errors = []
        for n in self._live():
            try:
                return n.cluster_nodes()
            except redis.RedisError as exc:
                errors.append(f"{n.address}: {exc}")
        raise RuntimeError(f"no live node answers CLUSTER NODES: {errors}")

    def _agreed(self) -> bool:
        """cluster_state:ok on every live node, and all see the same slot owners covering
        every slot."""
        maps = set()
        for n in self._live():
            if n.cluster_info().get("cluster_state") != "ok":
                return False
            maps.add(_slot_map(n.cluster_nodes()))
        if len(maps) != 1:
            return False
        (owners,) = maps
        return sum(b - a + 1 for _, ranges in owners for a, b in ranges) == SLOTS

    def _healthy(self) -> bool:
        """All six nodes up, the cluster agreed, 3 masters with one connected, in-sync
        replica each, and no cut link."""
        if len(self._live()) != len(self.nodes) or not self._agreed():
            return False
        if any(n.relay is None or n.relay.cut or not n.relay.alive() for n in self.nodes):
            return False
        masters = self.masters()
        if len(masters) != 3 or any(len(m["replicas"]) != 1 for m in masters):
            return False
        for m in masters:
            master, replica = self._node(m["address"]), self._node(m["replica"])
            info = replica.replication()
            if info.get("role") != "slave" or info.get("master_link_status") != "up":
                return False
            if info.get("master_sync_in_progress"):
                return False
            minfo = master.replication()
            if minfo.get("connected_slaves") != 1 or minfo["slave0"].get("state") != "online":
                return False
            if master.client().wait(1, 200) < 1:
                return False
        return True

    def _routes(self, slots: list[tuple[int, int]], address: Address) -> bool:
        """A new RedisCluster client sends every slot range's first and last slot to
        `address`."""
        rc = self.cluster_client(socket_timeout=2, socket_connect_timeout=1)
        try:
            for a, b in slots:
                for slot in (a, b):
                    node = rc.nodes_manager.get_node_from_slot(slot)
                    if (node.host, node.port) != address:
                        return False
            return True
        finally:
            rc.close()

    def _wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        def safe() -> bool:
            try:
                return bool(predicate())
            except (redis.RedisError, OSError, StopIteration, KeyError, LookupError):
                return False

        if not wait_for(safe, timeout, step=0.05):
            raise TimeoutError(f"{what} within {timeout}s\n{self.describe()}")

    def _timed(self, what: str, t0: float) -> None:
        self.timings.setdefault(what, []).append(time.monotonic() - t0)

    def describe(self) -> str:
        """Each node's own view, for failure messages."""
        lines = []
        for n in self.nodes:
            head = f"node {n.index} data={n.port} relay={n.relay_port} alive={n.alive()}"
            if n.relay is not None:
                head += f" relay_cut={n.relay.cut}"
            lines.append(head)
            if not n.alive():
                continue
            try:
                lines.append(f"  cluster_state={n.cluster_info().get('cluster_state')}")
                nodes = n.client().execute_command("CLUSTER", "NODES")
                lines += [f"  {line}" for line in nodes.splitlines()]
            except redis.RedisError as exc:
                lines.append(f"  error: {exc}")
        return "\n".join(lines)
