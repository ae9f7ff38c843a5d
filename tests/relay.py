"""A TCP relay in front of a Redis master that can silently cut its replication links.

Run as `python tests/relay.py LISTEN_PORT UPSTREAM_PORT` (standard library only, no Django):
it forwards every connection made to 127.0.0.1:LISTEN_PORT to 127.0.0.1:UPSTREAM_PORT and
prints `listening` once it accepts connections. tests/sentinel_topology.py starts it and
drives it through its stdin, one command a line, each answered with one line on stdout:

- `cut`: every replication connection (one whose client sent REPLCONF, PSYNC or SYNC), now
  and later, stops forwarding in both directions. Both sockets stay open and whatever
  arrives on them is read and thrown away, so neither Redis sees a closed socket, a full
  buffer or an error: the master keeps listing the replica as connected while its ACKs
  stop (WAIT times out), the replica keeps reporting its link up while it receives nothing.
  This is a network partition of that one link, which no firewall is needed for. Answer:
  `ok cut N`, N the number of replication connections frozen.
- `restore`: ends the cut and closes the frozen connections (a replication stream with a
  hole in it cannot be resumed, the replica reconnects and resyncs). `ok restore N`.
- `status`: `ok status cut=0|1 connections=N replication=N frozen=N`.

Every other connection (sentinels, clients) is forwarded untouched, cut or not. When the
upstream refuses (the master is dead), a new connection is accepted and closed at once, so
the address behaves like a dead server. The relay exits when its stdin closes, so it never
outlives the test process that started it.

Why a relay and not a firewall rule: there is no iptables/nft here, and a SIGSTOP of either
Redis would stop far more than one link.
"""

from __future__ import annotations

import os
import re
import select
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

# The start of a command the replica side of a replication link sends (RESP arrays, as
# every Redis replica sends them). The replica's first command is a PING it waits the answer
# of, then REPLCONF: the link is recognised before any of the replication stream flows.
_REPLICATION = re.compile(rb"\*\d+\r\n\$(?:8\r\nREPLCONF|5\r\nPSYNC|4\r\nSYNC)\r\n", re.IGNORECASE)
_SNIFF_LIMIT = 64 * 1024  # a replica identifies itself in its first few hundred bytes
_HIGH_WATER = 4 * 1024 * 1024  # stop reading a side while this much waits for the other
_CHUNK = 256 * 1024


def _log(message: str) -> None:
    print(
        f"{time.strftime('%H:%M:%S')} relay[{os.getpid()}] {message}", file=sys.stderr, flush=True
    )


class _Pair:
    """One relayed connection: the accepted client socket and ours to the upstream."""

    _ids = 0

    def __init__(self, down: socket.socket, up: socket.socket) -> None:
        _Pair._ids += 1
        self.id = _Pair._ids
        self.down: socket.socket | None = down
        self.up: socket.socket | None = up
        self.to_up = bytearray()
        self.to_down = bytearray()
        self.sniff: bytearray | None = bytearray()
        self.replication = False
        self.frozen = False


class Relay:
    def __init__(self, listen_port: int, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.sel = selectors.DefaultSelector()
        self.pairs: set[_Pair] = set()
        self.cut = False
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", listen_port))
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.sel.register(self.listener, selectors.EVENT_READ, ("accept", None))
        os.set_blocking(0, False)
        self.sel.register(0, selectors.EVENT_READ, ("control", None))
        self.control = b""
        self.running = True

    # -- loop ------------------------------------------------------------------------------
    def run(self) -> None:
        print("listening", flush=True)
        while self.running:
            for key, mask in self.sel.select(timeout=1.0):
                kind, pair = key.data
                if kind == "accept":
                    self._accept()
                elif kind == "control":
                    self._control()
                elif pair in self.pairs:  # not closed by an earlier event of this batch
                    self._io(pair, key.fileobj, mask)  # type: ignore[arg-type]

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            try:
                up = socket.create_connection(self.upstream, timeout=2.0)
            except OSError as exc:
                # The master is dead: behave like it (the connection ends at once).
                _log(f"upstream {self.upstream[1]} unreachable ({exc}), connection dropped")
                down.close()
                continue
            pair = _Pair(down, up)
            for s in (down, up):
                s.setblocking(False)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.pairs.add(pair)
            self.sel.register(down, selectors.EVENT_READ, ("down", pair))
            self.sel.register(up, selectors.EVENT_READ, ("up", pair))

    def _io(self, pair: _Pair, sock: socket.socket, mask: int) -> None:
        from_down = sock is pair.down
        if mask & selectors.EVENT_WRITE:
            self._flush(pair)
            if pair not in self.pairs:
                return
        if not mask & selectors.EVENT_READ:
            return
        try:
            data = sock.recv(_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._closed(pair, from_down)
            return
        if pair.frozen:
            return  # read and thrown away: the sender sees a healthy, silent peer
        if from_down:
            if pair.sniff is not None:
                self._sniff(pair, data)
                if pair.frozen:
                    return
            pair.to_up += data
        else:
            pair.to_down += data
        self._flush(pair)

    def _sniff(self, pair: _Pair, data: bytes) -> None:
        assert pair.sniff is not None
        pair.sniff += data
        if _REPLICATION.search(pair.sniff):
            pair.sniff = None
            pair.replication = True
            _log(f"connection {pair.id} is a replication link")
            if self.cut:
                self._freeze(pair)
        elif len(pair.sniff) > _SNIFF_LIMIT:
            pair.sniff = None

    def _flush(self, pair: _Pair) -> None:
        for dest, buf in ((pair.up, pair.to_up), (pair.down, pair.to_down)):
            while buf and dest is not None:
                try:
                    n = dest.send(buf)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    self._close(pair)
                    return
                del buf[:n]
        self._interest(pair)

    def _interest(self, pair: _Pair) -> None:
        """Read each side unless the other side's backlog is too long; watch a side for
        writability while something waits to be written to it."""
        for kind, sock, out, backlog in (
            ("down", pair.down, pair.to_down, pair.to_up),
            ("up", pair.up, pair.to_up, pair.to_down),
        ):
            if sock is None:
                continue
            events = 0
            if len(backlog) < _HIGH_WATER:
                events |= selectors.EVENT_READ
            if out:
                events |= selectors.EVENT_WRITE
            self._watch(sock, events, (kind, pair))

    def _watch(self, sock: socket.socket, events: int, data: object) -> None:
        """Register, modify or (no events: selectors cannot hold that) unregister."""
        try:
            key = self.sel.get_key(sock)
        except KeyError:
            key = None
        if not events:
            if key is not None:
                self.sel.unregister(sock)
        elif key is None:
            self.sel.register(sock, events, data)
        elif key.events != events:
            self.sel.modify(sock, events, data)

    def _closed(self, pair: _Pair, from_down: bool) -> None:
        if pair.frozen and not from_down:
            # The master died or dropped the link while it is cut: the replica must not
            # learn it from us, exactly as behind a real partition.
            if pair.up is not None:
                self._watch(pair.up, 0, None)
                pair.up.close()
                pair.up = None
            return
        if not pair.frozen:
            # Best effort: what the closing side sent last (an answer to QUIT) goes on.
            dest, buf = (pair.up, pair.to_up) if from_down else (pair.down, pair.to_down)
            if dest is not None and buf:
                try:
                    dest.send(buf)
                except OSError:
                    pass
        self._close(pair)

    def _close(self, pair: _Pair) -> None:
        for s in (pair.down, pair.up):
            if s is not None:
                self._watch(s, 0, None)
                s.close()
        pair.down = pair.up = None
        self.pairs.discard(pair)

    def _freeze(self, pair: _Pair) -> None:
        pair.frozen = True
        pair.to_up.clear()
        pair.to_down.clear()
        self._interest(pair)
        _log(f"connection {pair.id} frozen")

    # -- control -------------------------------------------------------------------------
    def _control(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        if not data:
            _log("stdin closed, exiting")
            self.running = False
            return
        self.control += data
        while b"\n" in self.control:
            line, _, self.control = self.control.partition(b"\n")
            self._command(line.decode().strip())

    def _command(self, command: str) -> None:
        if command == "cut":
            self.cut = True
            n = 0
            for pair in list(self.pairs):
                if pair.replication and not pair.frozen:
                    self._freeze(pair)
                    n += 1
            answer = f"ok cut {n}"
        elif command == "restore":
            self.cut = False
            frozen = [p for p in self.pairs if p.frozen]
            for pair in frozen:
                self._close(pair)
            answer = f"ok restore {len(frozen)}"
        elif command == "status":
            answer = (
                f"ok status cut={int(self.cut)} connections={len(self.pairs)} "
                f"replication={sum(p.replication for p in self.pairs)} "
                f"frozen={sum(p.frozen for p in self.pairs)}"
            )
        else:
            answer = f"error unknown command {command!r}"
        _log(f"{command} -> {answer}")
        print(answer, flush=True)


# -- the driver: what a test process uses to run and command a relay --------------------


class RelayProcess:
    """This module run as a process in front of one server, driven over its stdin/stdout
    (tests/sentinel_topology.py and tests/cluster_topology.py adapt it): a command is
    applied before its answer comes back, so a write made after `command("cut")` returned
    is never forwarded to a replica. The relay exits when its stdin closes: it cannot
    outlive the process that started it."""

    def __init__(self, listen_port: int, upstream_port: int, log: Path) -> None:
        self.listen_port = listen_port
        self.upstream_port = upstream_port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""

    def start(self) -> None:
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, str(self.listen_port), str(self.upstream_port)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                bufsize=0,
            )
        self._buf = b""
        try:
            line = self._line(20)
        except (TimeoutError, RuntimeError):
            self.kill()
            raise
        if line != "listening":
            self.kill()
            raise RuntimeError(
                f"relay on {self.listen_port} did not start ({line!r}):\n{self._tail()}"
            )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, command: str, timeout: float = 10) -> list[str]:
        """Send one command; the answer's words after 'ok' (e.g. ['cut', '1'])."""
        if self.proc is None or self.proc.stdin is None:
            raise RuntimeError(f"the relay on {self.listen_port} is not running")
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        words = self._line(timeout).split()
        if not words or words[0] != "ok":
            raise RuntimeError(
                f"relay on {self.listen_port} refused {command!r}: {' '.join(words)}"
            )
        return words[1:]

    def stop(self) -> None:
        """End it the gentle way (stdin closed), and the hard way if that takes long."""
        if self.proc is not None and self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(3)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self.proc = None

    def _line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"relay on {self.listen_port} did not answer in {timeout} s")
            data = os.read(fd, 4096)
            if not data:
                raise RuntimeError(f"relay on {self.listen_port} exited:\n{self._tail()}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode().strip()

    def _tail(self, lines: int = 8) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def main(argv: list[str]) -> None:
    listen_port, upstream_port = int(argv[1]), int(argv[2])
    Relay(listen_port, upstream_port).run()


if __name__ == "__main__":
    main(sys.argv)
