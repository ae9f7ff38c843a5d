"""A private redis-server per test module, and the faults the resilience tests inject into it.

Nothing here touches the shared server on 6379: every fault is applied to a redis-server
this module started on a spare port, in a temporary directory, with persistence off.

Faults:
- kill / restart empty: SIGKILL, then (optionally) a new empty server on the same port;
- pause / resume: SIGSTOP / SIGCONT (connections hang, new TCP connects still succeed);
- hide / unhide: the server moves to a hidden port and drops every client, so the address
  refuses connections while the data is kept (a partition that heals with old data in it);
- a black hole or an error-answering server on the address while Redis hides;
- requirepass: every new connection is refused with NOAUTH, data kept;
- junk: our keys overwritten with garbage of every type and size;
- full: maxmemory reached with noeviction, so every write command fails with OOM.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import redis

from tests.processes import wait_for

REDIS_SERVER = os.environ.get("REDIS_SERVER_BIN", "redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate: Any, timeout: float, what: str) -> None:
    if not wait_for(predicate, timeout, step=0.02):
        raise TimeoutError(what)


class RedisServer:
    """One redis-server process we own. `port` is the address the cache is pointed at."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.hidden_port: int | None = None
        self.password = ""
        self.fault: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        self.starts += 1
        log = open(self.workdir / f"redis-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--protected-mode",
                "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.paused = False
        self.hidden_port = None
        self.password = ""
        _wait(self._pings, 10, f"redis-server on port {self.port} did not start")

    def _pings(self, port: int | None = None) -> bool:
        try:
            return bool(self.client(port).ping())
        except redis.RedisError:
            return False

    def client(self, port: int | None = None, timeout: float = 2.0) -> redis.Redis:
        """A plain client straight to the server (not through the cache)."""
        return redis.Redis(
            host="127.0.0.1",
            port=port or self.hidden_port or self.port,
            password=self.password or None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        )

    def kill(self) -> None:
        """SIGKILL: every connection drops, every key is lost."""
        if self.proc is not None:
            if self.paused:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        self.paused = False
        self.hidden_port = None

    def restart_empty(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        self.end_fault_server()
        self.kill()

    # -- faults --------------------------------------------------------------------
    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def hide(self) -> None:
        """Move the server to a hidden port and drop every client: the cache's address
        refuses connections, the data stays."""
        hidden = free_port()
        c = self.client()
        c.config_set("port", hidden)
        self.hidden_port = hidden
        c = self.client()
        for kind in ("normal", "pubsub"):
            c.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")
        c.close()

    def unhide(self) -> None:
        assert self.hidden_port is not None
        c = self.client()
        c.config_set("port", self.port)
        self.hidden_port = None
        _wait(self._pings, 10, "redis-server did not come back on its port")

    def require_password(self, password: str = "fault-injection") -> None:
        c = self.client()
        c.config_set("requirepass", password)
        self.password = password
        c = self.client()
        for kind in ("normal", "pubsub"):
            c.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes")

    def drop_password(self) -> None:
        self.client().config_set("requirepass", "")
        self.password = ""

    def start_fault_server(self, kind: str) -> None:
        """Hide Redis and put a fake server on its address: 'blackhole' accepts connections
        and never answers, 'errors' answers every command with -ERR."""
        self.hide()
        self.fault = subprocess.Popen(
            [sys.executable, "-m", "tests.redis_server", kind, str(self.port)],
            cwd=str(Path(__file__).resolve().parent.parent),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.fault.stdout is not None
        line = self.fault.stdout.readline()
        assert line.strip() == b"listening", line

    def end_fault_server(self) -> None:
        if self.fault is not None:
            self.fault.kill()
            self.fault.wait(10)
            self.fault = None

    def heal(self) -> None:
        """Whatever was done, make the server answer on its address again (data kept
        unless it was killed)."""
        self.end_fault_server()
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            self.start()
            return
        if self.paused:
            self.resume()
        if self.password:
            self.drop_password()
        if self.hidden_port is not None:
            self.unhide()
        _wait(self._pings, 10, "redis-server did not heal")
        if self.client().config_get("maxmemory").get("maxmemory") not in ("0", None):
            self.free_memory()
        self.accept_writes()

    def fill_with_junk(self, prefix: str, extra_keys: int = 2000) -> int:
        return fill_with_junk(self.client(), prefix, extra_keys)

    def fill_memory(self) -> int:
        """maxmemory just above what is used, noeviction, then junk until writes are
        refused with OOM: every command that could grow memory fails, reads still work."""
        c = self.client()
        used = int(c.info("memory")["used_memory"])
        c.config_set("maxmemory-policy", "noeviction")
        c.config_set("maxmemory", used + 4 * 1024 * 1024)
        n = 0
        try:
            while n < 100_000:
                c.set(f"junk:oom:{n}", b"x" * 16_384)
                n += 1
        except redis.ResponseError as exc:
            assert "OOM" in str(exc) or "maxmemory" in str(exc), exc
        return n

    def refuse_writes(self) -> None:
        """Every command that writes fails with NOREPLICAS (min-replicas-to-write 1, and no
        replica), while reads, PING and PUBLISH are answered: a Redis that answers but
        cannot take an invalidation, as at maxmemory with noeviction."""
        self.client().config_set("min-replicas-to-write", 1)

    def accept_writes(self) -> None:
        self.client().config_set("min-replicas-to-write", 0)

    def free_memory(self) -> None:
        c = self.client()
        c.config_set("maxmemory", 0)
        for k in c.scan_iter(match="junk:oom:*", count=1000):
            c.unlink(k)


# -- fake servers, run as `python -m tests.redis_server {blackhole,errors} PORT` ----------


def _serve_fault(kind: str, port: int) -> None:
    import threading

    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(128)
    print("listening", flush=True)
    held: list[socket.socket] = []

    def errors(conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                buf += data
                while True:
                    n, buf = _take_command(buf)
                    if n is None:
                        break
                    conn.sendall(b"-ERR fault injection: this server answers only errors\r\n")
        except OSError:
            return

    while True:
        conn, _ = srv.accept()
        if kind == "blackhole":
            held.append(conn)  # accepted, never read, never answered
        else:
            threading.Thread(target=errors, args=(conn,), daemon=True).start()


def _take_command(buf: bytes) -> tuple[int | None, bytes]:
    """Split one RESP command off buf: (1, rest) or (None, buf) if incomplete."""
    if not buf:
        return None, buf
    if not buf.startswith(b"*"):
        i = buf.find(b"\r\n")
        return (None, buf) if i < 0 else (1, buf[i + 2 :])
    i = buf.find(b"\r\n")
    if i < 0:
        return None, buf
    count, pos = int(buf[1:i]), i + 2
    for _ in range(count):
        j = buf.find(b"\r\n", pos)
        if j < 0:
            return None, buf
        size = int(buf[pos + 1 : j])
        pos = j + 2 + size + 2
        if pos > len(buf):
            return None, buf
    return 1, buf[pos:]


def fill_with_junk(c: Any, prefix: str, extra_keys: int = 2000) -> int:
    """Overwrite every key under our prefix with garbage (wrong types, truncated and
    oversized strings, values shaped like ours with a bad MAC), and add junk keys. Through
    any client: one server's, or a cluster's (one key per command)."""
    n = 0
    keys = list(c.scan_iter(match=f"*{prefix}*", count=1000))
    pipe = c.pipeline(transaction=False)
    for i, k in enumerate(keys):
        kind = i % 6
        pipe.delete(k)
        if kind == 0:
            pipe.rpush(k, "junk", "list")
        elif kind == 1:
            pipe.hset(k, "junk", "hash")
        elif kind == 2:
            pipe.set(k, b"P|")  # truncated header
        elif kind == 3:
            pipe.set(k, os.urandom(64))
        elif kind == 4:
            pipe.set(k, b"P|x|y|z|" + b"\x00" * (512 * 1024))  # oversized, wrong gen
        else:
            pipe.sadd(k, "junk")
        n += 1
    for i in range(extra_keys):
        pipe.set(f"junk:{i}", os.urandom(256))
    pipe.execute()
    return n + extra_keys


if __name__ == "__main__":
    _serve_fault(sys.argv[1], int(sys.argv[2]))
