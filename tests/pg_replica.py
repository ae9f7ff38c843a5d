"""A real PostgreSQL streaming read replica of the local server, lagging on purpose.

`PgReplica.start()` takes a base backup of the local server (pg_basebackup -R -X stream,
with a physical replication slot of its own so the primary keeps the WAL the replica has not
received yet), writes a configuration of its own (spare port on 127.0.0.1, hot_standby,
`recovery_min_apply_delay`) and starts it with pg_ctl. Commits reach the replica after the
apply delay; `wait_replayed()` waits until it has caught up with the primary.

PostgreSQL refuses to run as root: when the tests run as root, the server binaries run as
the `postgres` user, and the server's directory lives in the system temporary directory
(pytest's base temporary directory, /tmp/pytest-of-root, is private to root, and pytest
makes it private again at every session). `workdir` receives a copy of the replica's log
when it stops.

The local server must admit replication connections from 127.0.0.1: `make services` adds
`host replication all 127.0.0.1/32 trust` to its pg_hba.conf (its "all" does not cover
replication).

`stop()` (also run at exit) stops the server, drops its slot and removes its directory.
A run killed before that leaves them behind: the next `start()` removes what dead runs left.

`PgServer` is the same machinery for a server of its own: a new cluster made by initdb (its
own system identifier), not in recovery, which shares nothing with the local server but its
major version and client-visible settings (a shard whose databases may have the local
server's names).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

from tests.redis_server import free_port

SERVER_USER = os.environ.get("PG_REPLICA_USER", "postgres")
_PREFIX = "tc-pg-replica-"  # server directories: <tmp>/tc-pg-replica-<owner pid>-<random>
_SLOT_PREFIX = "tiered_cache_replica_"  # slots: tiered_cache_replica_<owner pid>_<random>

# Settings whose value on a hot standby must be at least the primary's (the standby refuses
# to start otherwise), and client-visible defaults a replica should share with its primary.
_COPIED_SETTINGS = (
    "max_connections",
    "max_worker_processes",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
    "TimeZone",
    "DateStyle",
    "IntervalStyle",
    "default_text_search_config",
    "lc_messages",
    "lc_monetary",
    "lc_numeric",
    "lc_time",
)

_REFUSED = "no pg_hba.conf entry for replication connection"


def _quote(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


class PgReplica:
    """A hot standby of the local PostgreSQL server, applying commits `apply_delay` late."""

    # What start() needs besides pg_ctl, in the bindir of the local server's major version.
    _maker = "pg_basebackup"

    def __init__(
        self,
        workdir: Path,
        apply_delay: str = "2s",
        *,
        primary_host: str = "127.0.0.1",
        primary_port: int = 5432,
        primary_user: str = "postgres",
    ) -> None:
        self.workdir = Path(workdir)
        self.apply_delay = apply_delay
        self.primary = {"host": primary_host, "port": int(primary_port), "user": primary_user}
        self.port = 0
        self.slot = ""
        self.server_dir: Path | None = None
        self.bindir: Path | None = None
        self.running = False
        # Seconds from start(): pg_basebackup (or initdb), start.
        self.timings: dict[str, float] = {}
        self._replica_conn: psycopg.Connection[Any] | None = None
        # Run the binaries as the server user only when root (PostgreSQL refuses root).
        self._switch_user = os.geteuid() == 0 and SERVER_USER != "root"

    # -- paths and commands ------------------------------------------------------------
    @property
    def datadir(self) -> Path:
        assert self.server_dir is not None
        return self.server_dir / "data"

    @property
    def logfile(self) -> Path:
        assert self.server_dir is not None
        return self.server_dir / "server.log"

    def _run(
        self, argv: list[str], timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command as the server user, in the server's directory, without the PG*
        variables of the test environment."""
        cmd = ["runuser", "-u", SERVER_USER, "--", *argv] if self._switch_user else argv
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        try:
            proc = subprocess.run(
                cmd,
                cwd=str(self.server_dir or "/"),
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as exc:
            raise TimeoutError(f"{argv[0]} did not finish within {timeout:g}s: {argv}") from exc
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed (exit {proc.returncode}): {' '.join(argv)}\n"
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )
        return proc

    def _bin(self, name: str) -> str:
        assert self.bindir is not None
        return str(self.bindir / name)

    def _connect_primary(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(**self.primary, dbname=dbname, autocommit=True, connect_timeout=5)

    def _connect_replica(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.primary["user"],
            dbname=dbname,
            autocommit=True,
            connect_timeout=5,
        )

    def _find_bindir(self, server_version_num: int) -> Path:
        """The binaries of the primary's major version (a base backup only runs on those):
        Debian keeps them in /usr/lib/postgresql/<major>/bin, off the PATH."""
        major = server_version_num // 10000
        candidates = [Path(f"/usr/lib/postgresql/{major}/bin")]
        for tool in ("pg_config", "pg_ctl"):
            found = shutil.which(tool)
            if found and tool == "pg_config":
                out = subprocess.run([found, "--bindir"], capture_output=True, text=True)
                if out.returncode == 0 and out.stdout.strip():
                    candidates.append(Path(out.stdout.strip()))
            elif found:
                candidates.append(Path(found).resolve().parent)
        for bindir in candidates:
            pg_ctl = bindir / "pg_ctl"
            if not (pg_ctl.exists() and (bindir / self._maker).exists()):
                continue
            out = subprocess.run([str(pg_ctl), "--version"], capture_output=True, text=True)
            m = re.search(r"\) (\d+)", out.stdout)
            if m and int(m.group(1)) == major:
                return bindir
        raise RuntimeError(
            f"No PostgreSQL {major} server binaries (pg_ctl, {self._maker}) in "
            f"{', '.join(str(c) for c in candidates)}"
        )

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Base backup, configure, start; return once the replica answers in recovery
        (PgServer: initdb, configure, start; return once it answers out of recovery)."""
        if self.running:
            return
        started = time.monotonic()
        names = list(_COPIED_SETTINGS)
        try:
            with self._connect_primary() as conn:
                version = int(conn.execute("SHOW server_version_num").fetchone()[0])
                wal_level = conn.execute("SHOW wal_level").fetchone()[0]
                senders = int(conn.execute("SHOW max_wal_senders").fetchone()[0])
                copied = dict(
                    conn.execute(
                        "SELECT name, current_setting(name) FROM unnest(%s::text[]) AS name",
                        [names],
                    ).fetchall()
                )
        except psycopg.Error as exc:
            raise RuntimeError(
                f"PostgreSQL is not reachable at {self.primary['host']}:{self.primary['port']} "
                f"({exc}); start it with: make services"
            ) from exc
        if wal_level not in ("replica", "logical") or senders < 1:
            raise RuntimeError(
                f"The primary cannot stream to a replica: wal_level={wal_level}, "
                f"max_wal_senders={senders} (wal_level=replica and max_wal_senders>=1 needed)"
            )
        self.bindir = self._find_bindir(version)

        base = Path(tempfile.gettempdir())
        self._sweep(base)
        self.server_dir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base))
        atexit.register(self.stop)
        try:
            if self._switch_user:
                user = pwd.getpwnam(SERVER_USER)
                os.chown(self.server_dir, user.pw_uid, user.pw_gid)
                if self._run(["test", "-w", str(self.server_dir)], 10, check=False).returncode:
                    raise RuntimeError(
                        f"The {SERVER_USER} user cannot reach {self.server_dir}: "
                        f"point TMPDIR at a directory every user can traverse"
                    )
            self._make_datadir()
            self.timings[self._maker] = time.monotonic() - started
            for attempt in range(3):
                self.port = free_port()
                self._configure(copied)
                if self._start_server(last_attempt=attempt == 2):
                    break
            self._wait_ready(timeout=60)
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started
        self.running = True

    def _make_datadir(self) -> None:
        self._base_backup()

    def _base_backup(self) -> None:
        self.slot = f"{_SLOT_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        proc = self._run(
            [
                self._bin("pg_basebackup"),
                "-h",
                self.primary["host"],
                "-p",
                str(self.primary["port"]),
                "-U",
                self.primary["user"],
                "-D",
                str(self.datadir),
                "-X",
                "stream",
                "-R",  # standby.signal, primary_conninfo and primary_slot_name
                "-C",  # create the slot: streamed from during the backup and after it
                "-S",
                self.slot,
                "-c",
                "fast",  # an immediate checkpoint, not the next scheduled one
                "--no-sync",  # a throwaway copy
                "-w",  # never prompt for a password
            ],
            timeout=180,
            check=False,
        )
        if proc.returncode == 0:
            return
        err = proc.stderr.strip()
        if "already exists" not in err:
            self.slot = ""  # not created: nothing to drop
        if _REFUSED in err:
            raise RuntimeError(
                f"The local PostgreSQL refuses replication connections from 127.0.0.1 "
                f"({err}). Run `make services`: it adds "
                f"'host replication all 127.0.0.1/32 trust' to its pg_hba.conf and reloads it."
            )
        raise RuntimeError(f"pg_basebackup failed (exit {proc.returncode}):\n{err}")

    def _configure(self, copied: dict[str, str]) -> None:
        """The replica's own configuration files: the base backup holds none of Debian's
        (they live in /etc/postgresql), and nothing of the primary's ALTER SYSTEM is kept."""
        assert self.server_dir is not None
        settings = {name: _quote(value) for name, value in copied.items()}
        settings.update(
            {
                "port": str(self.port),
                "listen_addresses": "'127.0.0.1'",
                "unix_socket_directories": _quote(self.server_dir),
                **self._role_settings(),
                "shared_buffers": "'32MB'",
                "fsync": "off",  # a throwaway copy, stopped with -m immediate
                "logging_collector": "off",
                "log_line_prefix": "'%m [%p] '",
            }
        )
        files = {
            "postgresql.conf": "".join(f"{k} = {v}\n" for k, v in settings.items()),
            "pg_hba.conf": "local all all trust\nhost all all 127.0.0.1/32 trust\n",
            "pg_ident.conf": "",
        }
        auto = self.datadir / "postgresql.auto.conf"
        files["postgresql.auto.conf"] = "".join(
            line + "\n"
            for line in auto.read_text().splitlines()
            if line.startswith(("#", *self._kept_auto_settings))
        )
        for name, text in files.items():
            (self.datadir / name).write_text(text)
            if self._switch_user:
                user = pwd.getpwnam(SERVER_USER)
                os.chown(self.datadir / name, user.pw_uid, user.pw_gid)

    # What pg_basebackup -R wrote to postgresql.auto.conf that the replica keeps.
    _kept_auto_settings: tuple[str, ...] = ("primary_conninfo", "primary_slot_name")

    def _role_settings(self) -> dict[str, str]:
        """postgresql.conf settings of a lagging hot standby."""
        return {
            "hot_standby": "on",
            "recovery_min_apply_delay": _quote(self.apply_delay),
            "hot_standby_feedback": "off",
            "wal_retrieve_retry_interval": "'200ms'",
            "cluster_name": _quote(f"tc_replica_{self.port}"),
        }

    def _start_server(self, last_attempt: bool) -> bool:
        """pg_ctl start; False when the port was taken meanwhile (and it may be retried)."""
        proc = self._run(
            [self._bin("pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile)]
            + ["-w", "-t", "90", "start"],
            timeout=120,
            check=False,
        )
        if proc.returncode == 0:
            return True
        log = _tail(self.logfile)
        if "could not bind" in log and not last_attempt:
            self.logfile.unlink(missing_ok=True)
            return False
        raise RuntimeError(
            f"The replica did not start on port {self.port} (pg_ctl exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()}\n--- {self.logfile} ---\n{log}"
        )

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    # What pg_is_in_recovery() answers once the server is ready: a standby is in recovery.
    _in_recovery = True

    def _wait_ready(self, timeout: float) -> None:
        """Wait until the server accepts connections, in recovery or not as it should."""
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            pid = self._postmaster_pid()
            if pid is None or not _pid_alive(pid):
                raise RuntimeError(
                    f"The server on port {self.port} exited while starting\n"
                    f"--- {self.logfile} ---\n{_tail(self.logfile)}"
                )
            try:
                with self._connect_replica() as conn:
                    last = conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]
                if last is self._in_recovery:
                    return
            except psycopg.Error as exc:
                last = exc
            time.sleep(0.1)
        state = "in recovery" if self._in_recovery else "out of recovery"
        raise TimeoutError(
            f"The server on port {self.port} did not accept connections {state} within "
            f"{timeout:g}s (last: {last!r})\n--- {self.logfile} ---\n{_tail(self.logfile)}"
        )

    def stop(self) -> None:
        """Stop the server (immediate), drop its slot, remove its directory. Idempotent."""
        atexit.unregister(self.stop)
        self.running = False
        if self._replica_conn is not None:
            with contextlib.suppress(Exception):
                self._replica_conn.close()
            self._replica_conn = None
        if self.server_dir is None:
            return
        problems: list[str] = []
        pid = self._postmaster_pid()
        if pid is not None and _pid_alive(pid):
            proc = self._run(
                [self._bin("pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "-w", "stop"],
                timeout=60,
                check=False,
            )
            if proc.returncode != 0 and _pid_alive(pid):
                problems.append(f"pg_ctl stop failed ({proc.stderr.strip()}): SIGKILL sent")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.slot:
            try:
                self._drop_slot(self.slot, timeout=30)
            except Exception as exc:  # reported once the directory is gone
                problems.append(f"replication slot {self.slot} not dropped: {exc}")
            self.slot = ""
        with contextlib.suppress(OSError):
            self.workdir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.logfile, self.workdir / "replica.log")
        shutil.rmtree(self.server_dir, ignore_errors=True)
        self.server_dir = None
        if problems:
            raise RuntimeError("; ".join(problems))

    def _drop_slot(self, slot: str, timeout: float) -> None:
        """Drop our slot on the primary once its walsender is gone (it lingers a moment
        after the replica's walreceiver died; after 5s it is ended)."""
        started = time.monotonic()
        with self._connect_primary() as conn:
            while True:
                row = conn.execute(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", [slot]
                ).fetchone()
                if row is None:
                    return
                if row[0] is None:
                    with contextlib.suppress(psycopg.errors.ObjectInUse):
                        conn.execute("SELECT pg_drop_replication_slot(%s)", [slot])
                        return
                elapsed = time.monotonic() - started
                if elapsed > timeout:
                    raise TimeoutError(f"still in use by walsender {row[0]} after {timeout:g}s")
                if row[0] is not None and elapsed > 5:
                    conn.execute("SELECT pg_terminate_backend(%s)", [row[0]])
                time.sleep(0.05)

    def _sweep(self, base: Path) -> None:
        """Remove what runs that died without stop() left behind: their server (by its pid
        file, if it still runs in that directory), their directory, and their slots."""
        for path in map(Path, glob.glob(str(base / f"{_PREFIX}*-*"))):
            m = re.fullmatch(rf"{re.escape(_PREFIX)}(\d+)-.*", path.name)
            if not m or _pid_alive(int(m.group(1))):
                continue
            pidfile = path / "data" / "postmaster.pid"
            with contextlib.suppress(OSError, ValueError):
                pid = int(pidfile.read_text().split("\n", 1)[0])
                if Path(f"/proc/{pid}/cwd").resolve() == pidfile.parent.resolve():
                    os.kill(pid, signal.SIGQUIT)  # a postmaster's immediate shutdown
                    for _ in range(200):
                        if not _pid_alive(pid):
                            break
                        time.sleep(0.05)
            shutil.rmtree(path, ignore_errors=True)
        slots: list[tuple[str]] = []
        with contextlib.suppress(psycopg.Error), self._connect_primary() as conn:
            slots = conn.execute(
                "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s",
                [_SLOT_PREFIX + "%"],
            ).fetchall()
        for (slot,) in slots:
            m = re.fullmatch(rf"{_SLOT_PREFIX}(\d+)_\w+", slot)
            if m and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(Exception):
                    self._drop_slot(slot, timeout=10)

    # -- Django ----------------------------------------------------------------------
    def settings(self, primary: dict[str, Any], mirror: str | None = "default") -> dict[str, Any]:
        """A DATABASES entry for the replica: the primary's, on this server's port.

        TEST MIRROR tells Django's test cases the alias is the `mirror` database seen
        through another connection: they never flush it nor load fixtures into it (a hot
        standby refuses every write), yet it can be listed in `databases`. A server of its
        own (PgServer) takes mirror=None: a database of its own, flushed after each test
        like any other.
        """
        entry = dict(primary)
        entry["HOST"] = "127.0.0.1"
        entry["PORT"] = self.port
        entry["OPTIONS"] = dict(primary.get("OPTIONS") or {})
        entry["TEST"] = {**(primary.get("TEST") or {}), "MIRROR": mirror}
        # What ConnectionHandler.configure_settings() fills in for DATABASES entries that
        # exist at startup; an entry added later must carry it itself.
        for key, value in (
            ("ATOMIC_REQUESTS", False),
            ("AUTOCOMMIT", True),
            ("CONN_MAX_AGE", 0),
            ("CONN_HEALTH_CHECKS", False),
            ("TIME_ZONE", None),
            ("USER", ""),
            ("PASSWORD", ""),
        ):
            entry.setdefault(key, value)
        for key, value in (
            ("CHARSET", None),
            ("COLLATION", None),
            ("MIGRATE", True),
            ("NAME", None),
        ):
            entry["TEST"].setdefault(key, value)
        return entry

    def replay_lsn(self) -> str | None:
        """The replica's pg_last_wal_replay_lsn(), as text."""
        return self._replay_state("0/0")[0]

    def _replay_state(self, target: str) -> tuple[str | None, bool]:
        if self._replica_conn is None or self._replica_conn.closed:
            self._replica_conn = self._connect_replica()
        row = self._replica_conn.execute(
            "SELECT pg_last_wal_replay_lsn()::text, "
            "coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, false)",
            [target],
        ).fetchone()
        assert row is not None
        return row[0], row[1]

    def wait_replayed(self, primary_alias: str = "default", timeout: float = 30) -> None:
        """Wait until the replica has replayed all the WAL the primary had written when
        called: every transaction committed by then is visible on the replica (no sooner
        than the apply delay after its commit). The primary is asked through Django's
        connection `primary_alias`, so inside a test with database access."""
        from django.db import connections

        with connections[primary_alias].cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            target = cursor.fetchone()[0]
        deadline = time.monotonic() + timeout
        replayed: object = None
        while True:
            try:
                replayed, done = self._replay_state(target)
                if done:
                    return
            except psycopg.OperationalError as exc:
                replayed = exc
                self._replica_conn = None  # reconnect on the next round
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        raise TimeoutError(
            f"The replica on port {self.port} did not replay the primary's WAL up to {target} "
            f"within {timeout:g}s (replayed: {replayed}; apply delay {self.apply_delay})"
        )


class PgServer(PgReplica):
    """A PostgreSQL server of its own on a spare port: a new cluster (initdb, so its own
    system identifier), never in recovery, with the local server's major version and
    client-visible settings. Nothing of the local server's is in it: create its databases
    and tables yourself (`create_database()`). Started, stopped and swept as PgReplica."""

    _maker = "initdb"
    _kept_auto_settings = ()
    _in_recovery = False

    def __init__(
        self,
        workdir: Path,
        *,
        primary_host: str = "127.0.0.1",
        primary_port: int = 5432,
        primary_user: str = "postgres",
    ) -> None:
        # `primary` is the local server, whose version and settings are copied; the new
        # cluster's superuser is named as its user, and admits everyone from 127.0.0.1.
        super().__init__(
            workdir,
            apply_delay="0",
            primary_host=primary_host,
            primary_port=primary_port,
            primary_user=primary_user,
        )

    def _make_datadir(self) -> None:
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.datadir),
                "-U",
                self.primary["user"],
                "--auth=trust",
                "--no-sync",  # a throwaway cluster
                "--encoding=UTF8",  # not the C locale's SQL_ASCII
                "--no-locale",
            ],
            timeout=180,
        )

    def _role_settings(self) -> dict[str, str]:
        return {"cluster_name": _quote(f"tc_server_{self.port}")}

    def create_database(self, name: str) -> None:
        """An empty database `name` on this server."""
        from psycopg import sql

        with self._connect_replica() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
