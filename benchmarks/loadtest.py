"""`python -m benchmarks.loadtest` (or `make loadtest`): the demo under real servers and wrk.

The micro-benchmark (benchmarks/bench.py) prices one read; this prices a request, which is
what a user of the cache buys it for: the demo project served by gunicorn (4 workers x 4
threads) and uvicorn (4 workers), driven by wrk over loopback. Everything it uses is its
own: a PostgreSQL database (tiered_cache_load, recreated at the start and dropped at the
end) and a private redis-server on a spare port (the shared one on 6379 is never touched).

Each run starts its server afresh, on an emptied Redis, and sends it a warm-up that is not
counted. For the cached views L2 is filled first as a long-running deployment has it:
tiered_cache's warmup stores every row's pk entry (as the demo's beat schedule does), and a
read of every row by each of the mix's other lookups stores theirs. L1 starts cold. The
runs:

1. WSGI: the floor (floor/..., every request of the mix answered without a read: what
   gunicorn and Django cost alone), the plain ORM views (plain/...), then the same
   endpoints through get_cached: req/s, its share of the floor, p50/p99 latency, the
   ratio, and how the cached run's reads were served (per tier, from the counters every
   worker pushes to Redis each second).
2. ASGI: the floor again (async-floor/...) and the cached endpoints as async views
   (async/..., aget_cached) under uvicorn.
   Then Django's own floor under ASGI, taken apart: the ASGI floor without Django's thread
   per request (benchmarks/loadtest_asgi.py), and with the demo run without middleware
   (benchmarks/loadtest_settings.py) the floor under both servers and the cached views
   under both, so that get_cached and aget_cached are compared with nothing of Django's
   synchronous middleware between them.
3. Redis killed at peak, three times (OUTAGE_STALE_SECONDS 0, the default; 5; and 3600,
   the largest allowed, which stands for the floor of any design that serves from L1
   during an outage: everything a process read since it started): the cached
   WSGI views in three phases, each its own wrk run: Redis up, SIGKILLed (restarted empty
   on the same port when the phase ends), back. Per phase: req/s, p99, failed requests
   and the load database's transactions per second (pg_stat_database, sampled at the
   phase boundaries; PostgreSQL publishes a busy backend's counts about once a second, so
   a boundary may be off by that much).

The request mix (the Lua script written by make_script): 50 % GET a user by pk, 15 % GET a
user by email, 20 % GET a flow by (tenant, session), 5 % GET a provider's model by
(provider, global model), 5 % GET a global model by name, and 5 % POST that sets one
user's last_login_at with save(). Rows are skewed: 80 % of the picks go to a hot tenth of
each model's rows (a random tenth), the rest uniformly to all of them. wrk keeps 32
connections busy from 2 threads; a request slower than 2 s counts as a timeout.

    python -m benchmarks.loadtest                 # full run: 30 s per run, 10 s per phase
    python -m benchmarks.loadtest --quick         # a smoke run: 3 s everywhere, fewer rows
    python -m benchmarks.loadtest --duration 60 --json out.json

A missed target is reported, never an error: the exit status is 1 only when something
failed (a service down, a server that did not start, an exception).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DB = "tiered_cache_load"
DEFAULT_PG = "postgres://postgres@127.0.0.1:5432"

# wrk: the settings. Two threads: the machine has two cores and wrk shares them.
CONNECTIONS = 32
WRK_THREADS = 2
WRK_TIMEOUT = "2s"
# The request mix, in percent (make_script); the rest of 100 is the write.
MIX = {"user": 50, "email": 15, "flow": 20, "model": 5, "global": 5}
WRITES = 100 - sum(MIX.values())
HOT_FRACTION, HOT_SHARE = 0.1, 0.8
# The URL prefixes of the views that read through the cache (the others: plain/, floor/).
CACHED_PREFIXES = ("", "async/")
# Targets of the issue.
CACHED_VS_PLAIN = 3.0
OUTAGE_KEEP_RPS = 0.8
OUTAGE_MAX_XACTS = 1.5
OUTAGE_STALE = (0.0, 5.0, 3600.0)


@dataclass
class Plan:
    duration: float  # seconds of each measured run
    phase: float  # seconds of each outage phase
    warmup: float  # seconds of load before each measurement, not counted
    users: int
    flows: int


FULL = Plan(duration=30, phase=10, warmup=5, users=5000, flows=2000)
QUICK = Plan(duration=3, phase=3, warmup=1, users=1000, flows=500)


def log(msg: str) -> None:
    print(f"[{time.monotonic() - _STARTED:6.1f}s] {msg}", file=sys.stderr, flush=True)


_STARTED = time.monotonic()


# -- PostgreSQL ---------------------------------------------------------------------------


class Database:
    """The load test's own database, made from scratch and dropped at the end; its
    transaction counters are read through a connection to another database, so that
    reading them adds none."""

    def __init__(self, base_url: str, name: str) -> None:
        if "load" not in name:
            raise SystemExit(
                f"refusing to use database {name!r}: its name must contain 'load' "
                "(the load test drops and recreates it)"
            )
        self.base_url = base_url.rstrip("/")
        self.name = name
        self.url = f"{self.base_url}/{name}"
        self._stats: Any = None

    def _maintenance(self) -> Any:
        import psycopg

        return psycopg.connect(f"{self.base_url}/postgres", autocommit=True, connect_timeout=5)

    def recreate(self, create: bool = True) -> None:
        from psycopg import sql

        if self._stats is not None:
            self._stats.close()
            self._stats = None
        with self._maintenance() as conn:
            ident = sql.Identifier(self.name)
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            if create:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))

    def xacts(self) -> int:
        """Transactions committed and rolled back in the load database so far."""
        if self._stats is None:
            self._stats = self._maintenance()
        row = self._stats.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = %s",
            (self.name,),
        ).fetchone()
        return int(row[0]) if row else 0

    def backends(self) -> list[int]:
        """Process ids of the connections to the load database."""
        if self._stats is None:
            self._stats = self._maintenance()
        rows = self._stats.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s", (self.name,)
        ).fetchall()
        return [int(r[0]) for r in rows]


def configure_django(db: Database, redis_url: str) -> dict[str, str]:
    """Set this process up with the demo's settings on the load database and the private
    Redis, and return the servers' environment: that, DEBUG off, a connection pool."""
    env = {
        "DJANGO_SETTINGS_MODULE": "demo_project.settings",
        "DJANGO_DEBUG": "0",
        "DATABASE_URL": db.url,
        "REDIS_URL": redis_url,
        # Counters pushed every second, so a run's tier split can be read right after it.
        "TIERED_CACHE_STATS_FLUSH_INTERVAL": "1",
    }
    os.environ.update(env)
    import django

    django.setup()
    # This process only loads the data and reads counters; its bus complaining while the
    # outage runs kill Redis would only clutter the output.
    logging.getLogger("tiered_cache").setLevel(logging.ERROR)
    # Connections reused, as production reuses them (a pool: under ASGI, per-thread
    # persistent connections would pile up), so the plain views are not charged a connect
    # per request. Up to 8 per worker: one per thread under gunicorn, one per request in
    # flight under uvicorn (32 connections over 4 workers). 4 workers x 8 fit PostgreSQL's
    # default of 100 beside other users of the server.
    return {**env, "DJANGO_DB_POOL": "8"}


# -- demo data ----------------------------------------------------------------------------


@dataclass
class Rows:
    """What the Lua script picks from, each list in a random order (its head is hot)."""

    users: list[int]
    emails: list[str]
    flows: list[str]  # "tenant/session"
    models: list[str]  # "provider_id/global_model_id"
    globals: list[str]  # global model names


def load_data(plan: Plan) -> Rows:
    from django.core.management import call_command
    from django.db import connection

    from demo_project.demo.models import FlowInstance, GlobalModel, Model, User

    call_command("migrate", verbosity=0, interactive=False)
    call_command("load_demo_data", users=plan.users, flows=plan.flows, stdout=io.StringIO())
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    rng = random.Random(7)

    def shuffled(xs: list[Any]) -> list[Any]:
        rng.shuffle(xs)
        return xs

    users = shuffled(list(User.objects.values_list("pk", "email")))
    return Rows(
        users=[pk for pk, _ in users],
        emails=[email for _, email in users],
        flows=shuffled(
            [f"{t}/{s}" for t, s in FlowInstance.objects.values_list("tenant_id", "session_id")]
        ),
        models=shuffled(
            [f"{p}/{g}" for p, g in Model.objects.values_list("provider_id", "global_model_id")]
        ),
        globals=shuffled(list(GlobalModel.objects.values_list("name", flat=True))),
    )


def _lua_list(xs: list[Any]) -> str:
    return "{" + ",".join(json.dumps(x) if isinstance(x, str) else str(x) for x in xs) + "}"


def make_script(rows: Rows, path: Path) -> None:
    """The wrk script: the mix above over the loaded rows; the URL prefix of the views to
    drive ("", "plain/", "async/", "floor/", "async-floor/") is its argument. done() prints
    the run's figures as one JSON line."""
    from urllib.parse import quote

    cut = 0.0
    bounds = []
    for name, share in [("write", WRITES), *MIX.items()]:
        cut += share
        bounds.append(f"  {name} = {cut / 100:.4f},")
    path.write_text(
        f"""-- Written by benchmarks/loadtest.py: the request mix of its docstring.
local users = {_lua_list(rows.users)}
local emails = {_lua_list([quote(e, safe="") for e in rows.emails])}
local flows = {_lua_list(rows.flows)}
local models = {_lua_list(rows.models)}
local globals = {_lua_list(rows.globals)}
local cut = {{
{chr(10).join(bounds)}
}}
local HOT_FRACTION, HOT_SHARE = {HOT_FRACTION}, {HOT_SHARE}
local form = {{["Content-Type"] = "application/x-www-form-urlencoded"}}
local prefix = "/"

local counter = 0
function setup(thread)
  counter = counter + 1
  thread:set("thread_id", counter)
end

function init(args)
  prefix = "/" .. (args[1] or "")
  math.randomseed(os.time() * 100 + thread_id)
end

-- A row of the list: the hot tenth (its head) HOT_SHARE of the time, else any row.
local function pick(list)
  local n = #list
  if math.random() < HOT_SHARE then
    return list[math.random(math.max(1, math.floor(n * HOT_FRACTION)))]
  end
  return list[math.random(n)]
end

function request()
  local r = math.random()
  if r < cut.write then
    return wrk.format("POST", prefix .. "users/" .. pick(users) .. "/touch/", form, "by=wrk")
  elseif r < cut.user then
    return wrk.format("GET", prefix .. "users/" .. pick(users) .. "/")
  elseif r < cut.email then
    return wrk.format("GET", prefix .. "users/by-email/?email=" .. pick(emails))
  elseif r < cut.flow then
    return wrk.format("GET", prefix .. "flows/" .. pick(flows) .. "/")
  elseif r < cut.model then
    return wrk.format("GET", prefix .. "models/" .. pick(models) .. "/")
  end
  return wrk.format("GET", prefix .. "global-models/by-name/" .. pick(globals) .. "/")
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'LOADTEST {{"requests": %d, "duration_us": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "max_us": %d}}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""
    )


# -- processes ----------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and of its children it has reaped (workers that ended)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU time the whole machine has spent busy (every core, every process)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _processes() -> Iterator[tuple[int, int]]:
    """(pid, parent pid) of every process."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        yield int(entry.name), int(raw.rsplit(")", 1)[1].split()[1])


def _tree(root: int) -> list[int]:
    """root and its descendants (a server's master and workers)."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _processes():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class Server:
    """One gunicorn or uvicorn serving the demo, in a process group of its own: stopped
    with SIGTERM (workers finish, push their counters) and, failing that, SIGKILL."""

    def __init__(
        self, kind: str, port: int, env: dict[str, str], workdir: Path, app: str | None = None
    ) -> None:
        self.kind = kind
        self.port = port
        self.app = app or (
            "demo_project.wsgi" if kind == "gunicorn" else "demo_project.asgi:application"
        )
        self.env = {**os.environ, **env}
        self.log_path = workdir / f"{kind}-{port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        addr = ["--bind", f"127.0.0.1:{self.port}"]
        if self.kind == "gunicorn":
            return [
                *(sys.executable, "-m", "gunicorn", *addr),
                *("--workers", "4", "--threads", "4", "--graceful-timeout", "5"),
                *("--log-level", "warning", self.app),
            ]
        return [
            *(sys.executable, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(self.port)),
            *("--workers", "4", "--loop", "uvloop", "--http", "httptools", "--lifespan", "off"),
            *("--no-access-log", "--log-level", "warning", "--timeout-graceful-shutdown", "5"),
            self.app,
        ]

    def start(self, probe: str, timeout: float = 60.0) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{probe}"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited at start:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} did not answer {url} within {timeout:g} s")

    def pids(self) -> list[int]:
        return _tree(self.proc.pid) if self.proc else []

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        # Whatever is left of the group (a worker that outlived its master).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


@contextmanager
def serving(
    kind: str, port: int, env: dict[str, str], workdir: Path, probe: str, app: str | None = None
) -> Iterator[Server]:
    server = Server(kind, port, env, workdir, app)
    _live.append(server)
    try:
        server.start(probe)
        yield server
    finally:
        server.stop()
        _live.remove(server)


_live: list[Server] = []


# -- wrk ----------------------------------------------------------------------------------


@dataclass
class Run:
    """One wrk run and what the machine did meanwhile."""

    label: str
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    xacts_per_s: float
    cpu: dict[str, float] = field(default_factory=dict)  # cores used, by process kind

    @property
    def failed(self) -> int:
        return sum(self.errors.values())


def cpu_sample(server: Server, db: Database, redis_pid: int | None) -> dict[str, Any]:
    """CPU seconds so far per pid, by kind: the server's processes, the load database's
    backends, the private redis-server; and the machine's busy time."""
    return {
        "server": {pid: _cpu_seconds(pid) for pid in server.pids()},
        "postgres": {pid: _cpu_seconds(pid) for pid in db.backends()},
        "redis": {redis_pid: _cpu_seconds(redis_pid)} if redis_pid else {},
        "busy": _busy_seconds(),
    }


def cpu_used(
    start: dict[str, Any], end: dict[str, Any], wrk: float, wall: float
) -> dict[str, float]:
    """Cores used between two samples by each kind, wrk, and everything else (other
    sessions' work on a shared machine: the figures are only as clean as this is small)."""
    out = {
        kind: sum(t - start[kind].get(pid, 0.0) for pid, t in end[kind].items()) / wall
        for kind in ("server", "postgres", "redis")
    }
    out["wrk"] = wrk / wall
    out["other"] = max(0.0, (end["busy"] - start["busy"]) / wall - sum(out.values()))
    return out


def wrk(
    label: str,
    port: int,
    prefix: str,
    seconds: float,
    script: Path,
    db: Database,
    server: Server,
    redis_pid: int | None,
) -> Run:
    """One wrk run of `seconds` against the server, with its database transactions and
    the CPU that the server, PostgreSQL, Redis and wrk itself used meanwhile."""
    x0, c0 = db.xacts(), cpu_sample(server, db, redis_pid)
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    proc = subprocess.run(
        [
            *("wrk", "-t", str(WRK_THREADS), "-c", str(CONNECTIONS)),
            *("-d", f"{max(1, round(seconds))}s", "--timeout", WRK_TIMEOUT, "-s", str(script)),
            f"http://127.0.0.1:{port}",
            *("--", prefix),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    wall = time.monotonic() - t0
    x1, c1 = db.xacts(), cpu_sample(server, db, redis_pid)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("LOADTEST ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    d = json.loads(line.removeprefix("LOADTEST "))
    secs = d["duration_us"] / 1e6
    wrk_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    return Run(
        label=label,
        requests=d["requests"],
        seconds=round(secs, 2),
        rps=d["requests"] / secs,
        p50_ms=d["p50_us"] / 1000,
        p90_ms=d["p90_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        max_ms=d["max_us"] / 1000,
        errors={k: int(d[k]) for k in ("connect", "read", "write", "timeout", "status")},
        xacts_per_s=(x1 - x0) / wall,
        cpu=cpu_used(c0, c1, wrk_cpu, wall),
    )


# -- the runs -----------------------------------------------------------------------------


class LoadTest:
    def __init__(
        self, plan: Plan, db: Database, redis: Any, env: dict[str, str], workdir: Path
    ) -> None:
        from tests.redis_server import free_port

        self.plan = plan
        self.db = db
        self.redis = redis
        self.env = env
        self.workdir = workdir
        self.script = workdir / "mix.lua"
        self.port = free_port()
        self.probe = ""
        self.rows = Rows([], [], [], [], [])

    def prepare(self) -> Rows:
        self.rows = rows = load_data(self.plan)
        make_script(rows, self.script)
        self.probe = f"/users/{rows.users[0]}/"
        return rows

    def _fresh_redis(self, warm: bool) -> None:
        """Every run starts on an emptied Redis (no run inherits the previous one's L2 or
        counters) which, for the cached views, tiered_cache's warmup fills as production's
        would be (the demo's beat runs it): every row's pk entry in L2, L1 cold."""
        from tiered_cache.bus import bus
        from tiered_cache.maintenance import warmup
        from tiered_cache.registry import cached_models

        self.redis.client().flushall()
        if not warm:
            return
        if not bus.wait_trusted(10):
            raise RuntimeError("this process's bus was not trusted within 10 s")
        stored = refused = 0
        for model in cached_models():
            counts = warmup(model, limit=1_000_000)
            stored, refused = stored + counts["stored"], refused + counts["refused"]
        lookups = self._warm_lookups()
        log(f"  L2 warmed: {stored:,} rows by pk ({refused:,} refused), {lookups:,} by lookup")

    def _warm_lookups(self) -> int:
        """The entries of the mix's other lookups (email, tenant and session, ...): read
        once each through get_cached here, as a long-running deployment's traffic has left
        them in L2. Without them a 30 s run measures the first reads of a cold cache."""
        from demo_project.demo.models import FlowInstance, GlobalModel, Model, User
        from tiered_cache.tiers.remote import redis_tier

        rows = self.rows
        n = 0
        for email in rows.emails:
            User.objects.get_cached(email=email)
            n += 1
        for flow in rows.flows:
            tenant, session = flow.split("/")
            FlowInstance.objects.get_cached(tenant_id=tenant, session_id=session)
            n += 1
        for pair in rows.models:
            provider, global_model = pair.split("/")
            Model.objects.get_cached(provider=int(provider), global_model=int(global_model))
            n += 1
        for name in rows.globals:
            GlobalModel.objects.get_cached(name=name)
            n += 1
        redis_tier.wait_for_fills()
        return n

    def _serve(self, kind: str, app: str | None = None, **extra: str) -> Any:
        return serving(kind, self.port, {**self.env, **extra}, self.workdir, self.probe, app)

    def measured(
        self, label: str, kind: str, prefix: str, app: str | None = None, bare: bool = False
    ) -> tuple[Run, dict[str, Any]]:
        """A warmed-up server under wrk for plan.duration; for cached views also how the
        run's reads were served, from the counters the workers push each second. app: the
        server's application instead of the demo's; bare: the demo without middleware."""
        cached = prefix in CACHED_PREFIXES
        self._fresh_redis(warm=cached)
        extra = {"DJANGO_SETTINGS_MODULE": "benchmarks.loadtest_settings"} if bare else {}
        with self._serve(kind, app, **extra) as server:
            self._wrk(f"{label} warm-up", prefix, self.plan.warmup, server)
            before = self._counters() if cached else {}
            run = self._wrk(label, prefix, self.plan.duration, server)
            after = self._counters() if cached else {}
        return run, _subtract(after, before)

    def outage(self, stale: float) -> tuple[list[Run], int]:
        """Up, killed, back: three wrk runs of plan.phase on the cached WSGI views, Redis
        SIGKILLed between the first two and restarted (empty, same port) after the second.
        Also the L1 hits served stale while Redis was down (OUTAGE_STALE_SECONDS): the
        workers keep what they could not push and push it to the restarted server."""
        self._fresh_redis(warm=True)
        mode = f"{stale:g}"
        with self._serve("gunicorn", TIERED_CACHE_OUTAGE_STALE_SECONDS=mode) as server:
            self._wrk(f"outage {mode} s warm-up", "", self.plan.warmup, server)
            up = self._wrk("up", "", self.plan.phase, server)
            self.redis.kill()
            try:
                killed = self._wrk("killed", "", self.plan.phase, server)
            finally:
                self.redis.start()
            back = self._wrk("back", "", self.plan.phase, server)
            stale_hits = sum(row.get("stale_hits", 0) for row in self._counters().values())
        return [up, killed, back], stale_hits

    def _wrk(self, label: str, prefix: str, seconds: float, server: Server) -> Run:
        pid = self.redis.proc.pid if self.redis.proc else None
        run = wrk(label, self.port, prefix, seconds, self.script, self.db, server, pid)
        log(
            f"  {label}: {run.rps:,.0f} req/s, p99 {run.p99_ms:.1f} ms, "
            f"{run.failed} failed, {run.xacts_per_s:,.0f} db xact/s"
        )
        return run

    def _counters(self) -> dict[str, dict[str, int]]:
        """Every process's counters per model, once the last push is in (1 s interval)."""
        from tiered_cache.reporting import cluster_stats

        time.sleep(1.5)
        return {
            label: {k: v for k, v in row.items() if isinstance(v, int)}
            for label, row in cluster_stats().items()
        }


def _subtract(
    after: dict[str, dict[str, int]], before: dict[str, dict[str, int]]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, row in after.items():
        old = before.get(label, {})
        d = {k: v - old.get(k, 0) for k, v in row.items() if k != "processes"}
        if d.get("l1_hits", 0) + d.get("l2_hits", 0) + d.get("misses", 0):
            out[label] = d
    return out


def tier_rows(split: dict[str, Any]) -> list[dict[str, Any]]:
    """Per model and in all: reads, and the share each tier served."""
    rows = []
    total: dict[str, int] = {}
    for label, d in sorted(split.items()):
        rows.append(_tier_row(label, d))
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    if rows:
        rows.append(_tier_row("all", total))
    return rows


def _tier_row(label: str, d: dict[str, int]) -> dict[str, Any]:
    parts = {
        "L1": d.get("l1_hits", 0),
        "L2": d.get("l2_hits", 0),
        "negative": d.get("negative_hits", 0),
        "database": d.get("misses", 0),
        "bypassed": d.get("bypassed", 0),
    }
    reads = sum(parts.values())
    fills = d.get("fills", 0) + d.get("fills_refused", 0)
    return {
        "model": label,
        "reads": reads,
        **{k: v / reads if reads else 0.0 for k, v in parts.items()},
        # Fills L2 refused (the model written since the read began, mostly): the row stays
        # out of L2, and its next reader goes to the database again.
        "fills_refused": d.get("fills_refused", 0) / fills if fills else 0.0,
    }


# -- output -------------------------------------------------------------------------------


def table(head: list[str], body: list[list[str]], right: set[int]) -> str:
    """A Markdown table, as benchmarks/bench.py prints its own."""
    from benchmarks.bench import markdown_table

    return markdown_table(head, body, right)


def _cpu(run: Run) -> str:
    return " / ".join(f"{run.cpu[k]:.2f}" for k in ("server", "postgres", "redis", "wrk", "other"))


def _failed(run: Run) -> str:
    if not run.failed:
        return "0"
    return f"{run.failed:,} (" + ", ".join(f"{k} {v:,}" for k, v in run.errors.items() if v) + ")"


def _result(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# The runs of the first table: key, label, server, URL prefix (make_script), its floor.
RUNS = [
    ("floor", "WSGI floor: no read (gunicorn 4x4)", "gunicorn", "floor/", None),
    ("plain", "WSGI plain ORM (gunicorn 4x4)", "gunicorn", "plain/", "floor"),
    ("cached", "WSGI get_cached (gunicorn 4x4)", "gunicorn", "", "floor"),
    ("asgi_floor", "ASGI floor: no read (uvicorn 4)", "uvicorn", "async-floor/", None),
    ("asgi", "ASGI aget_cached (uvicorn 4)", "uvicorn", "async/", "asgi_floor"),
]

# Django's own floor under ASGI, taken apart (after the first table): key, label, server,
# URL prefix, application (None: the demo's), and whether the demo runs without middleware
# (benchmarks/loadtest_settings.py). Compared with the first table's WSGI floor.
ONE_THREAD_APP = "benchmarks.loadtest_asgi:application"
DJANGO_RUNS = [
    (
        "asgi_floor_one_thread",
        "ASGI floor, no thread per request",
        "uvicorn",
        "async-floor/",
        ONE_THREAD_APP,
        False,
    ),
    ("floor_bare", "WSGI floor, no middleware", "gunicorn", "floor/", None, True),
    ("asgi_floor_bare", "ASGI floor, no middleware", "uvicorn", "async-floor/", None, True),
    ("cached_bare", "WSGI get_cached, no middleware", "gunicorn", "", None, True),
    ("asgi_bare", "ASGI aget_cached, no middleware", "uvicorn", "async/", None, True),
]


def render_runs(
    runs: dict[str, Run], rows: Sequence[tuple[str, str, str | None]], of: str = "of floor"
) -> str:
    """rows: (key, label, the key of the run it is a share of, or None)."""
    head = [
        "run",
        "req/s",
        of,
        "p50 ms",
        "p99 ms",
        "failed",
        "db xact/s",
        "cores: srv/pg/redis/wrk/other",
    ]
    body = []
    for key, label, floor in rows:
        r = runs[key]
        body.append(
            [
                label,
                f"{r.rps:,.0f}",
                f"{r.rps / runs[floor].rps:.0%}" if floor else "—",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                _failed(r),
                f"{r.xacts_per_s:,.0f}",
                _cpu(r),
            ]
        )
    return table(head, body, {1, 2, 3, 4, 6})


def render_tiers(rows: list[dict[str, Any]]) -> str:
    head = ["model", "reads", "L1", "L2", "negative", "database", "bypassed", "fills refused"]
    shares = ("L1", "L2", "negative", "database", "bypassed", "fills_refused")
    body = [[r["model"], f"{r['reads']:,}", *(f"{100 * r[k]:.1f} %" for k in shares)] for r in rows]
    return table(head, body, {1, 2, 3, 4, 5, 6, 7})


def render_outage(outages: dict[str, list[Run]]) -> str:
    head = ["OUTAGE_STALE_SECONDS", "phase", "req/s", "p99 ms", "failed", "db xact/s", "vs up"]
    body = []
    for mode, phases in outages.items():
        up = phases[0]
        for r in phases:
            vs = (
                "—"
                if r is up
                else f"{r.rps / up.rps:.2f}x req/s, {_ratio(r.xacts_per_s, up.xacts_per_s)} xact/s"
            )
            body.append(
                [
                    mode if r is up else "",
                    r.label,
                    f"{r.rps:,.0f}",
                    f"{r.p99_ms:.1f}",
                    _failed(r),
                    f"{r.xacts_per_s:,.0f}",
                    vs,
                ]
            )
    return table(head, body, {2, 3, 5})


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else ("1.00x" if a == 0 else "∞")


def machine(redis: Any) -> dict[str, Any]:
    """bench.machine() for the private Redis, with wrk's, gunicorn's and uvicorn's versions."""
    from importlib.metadata import version

    from benchmarks.bench import machine as bench_machine

    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    versions = {}
    for name in ("gunicorn", "uvicorn"):
        try:
            versions[name] = version(name)
        except Exception:
            versions[name] = "?"
    return {
        **bench_machine(redis.client()),
        "wrk": (wrk_version.stdout or wrk_version.stderr).split()[1],
        **versions,
    }


def report(
    meta: dict[str, Any],
    plan: Plan,
    runs: dict[str, Run],
    tiers: dict[str, list[dict[str, Any]]],
    outages: dict[str, list[Run]],
    stale_hits: dict[str, int],
) -> list[dict[str, Any]]:
    """Print the tables and the targets; return the targets."""
    print(
        f"tiered_cache load test, {meta['date']}: {meta['host']}, {meta['cores']} cores "
        f"({meta['cpu']}), load {meta['load'][0]:.2f}; Python {meta['python']}, "
        f"Django {meta['django']}, gunicorn {meta['gunicorn']}, uvicorn {meta['uvicorn']}, "
        f"PostgreSQL {meta['postgresql']} and Redis {meta['redis']} on loopback; "
        f"wrk {meta['wrk']}, {CONNECTIONS} connections, {meta['mode']} run: "
        f"{plan.duration:g} s per run, {plan.phase:g} s per outage phase, "
        f"{plan.users:,} users and {plan.flows:,} flows."
    )
    plain, cached, asgi = runs["plain"], runs["cached"], runs["asgi"]
    print(render_runs(runs, [(key, label, floor) for key, label, _, _, floor in RUNS]))
    print(
        f"Mix: {MIX['user']} % user by pk, {MIX['email']} % user by email, {MIX['flow']} % "
        f"flow, {MIX['model']} % provider model, {MIX['global']} % global model by name, "
        f"{WRITES} % POST save() of a user; {HOT_SHARE:.0%} of picks on a hot "
        f"{HOT_FRACTION:.0%} of the rows. Cores: CPU used by the server's processes, the "
        "load database's backends, the private Redis, wrk, and the rest of the machine."
    )
    for name in ("cached", "asgi"):
        if tiers.get(name):
            print(
                f"Reads of the {name} run, by the tier that served them (every worker's "
                "counters); fills refused: of the rows read from the database, those L2 "
                "refused (the model written or flushed since the read began, or the lease "
                "lost):"
            )
            print(render_tiers(tiers[name]))
    print(
        f"get_cached serves {cached.rps / runs['floor'].rps:.0%} of the floor's req/s under "
        f"WSGI, aget_cached {asgi.rps / runs['asgi_floor'].rps:.0%} under ASGI; the ASGI "
        f"floor is {runs['asgi_floor'].rps / runs['floor'].rps:.0%} of the WSGI floor."
    )
    print(
        "Django's own floor under ASGI, taken apart (gunicorn 4x4 and uvicorn 4 as above): "
        "without its thread per request (benchmarks/loadtest_asgi.py), and the demo without "
        "middleware (benchmarks/loadtest_settings.py) under both servers:"
    )
    rows = [(key, label, "floor") for key, label, *_ in DJANGO_RUNS]
    print(render_runs(runs, rows, of="of WSGI floor"))
    print(
        f"Without middleware, aget_cached serves "
        f"{runs['asgi_bare'].rps / runs['cached_bare'].rps:.2f}x the req/s of get_cached, "
        f"and the ASGI floor is {runs['asgi_floor_bare'].rps / runs['floor_bare'].rps:.0%} "
        "of the WSGI floor."
    )
    print(
        "Redis SIGKILLed at peak (WSGI get_cached; Redis restarted empty on its port after "
        "the killed phase):"
    )
    print(render_outage(outages))
    print(
        "L1 hits served stale while Redis was down (the stale_hits counter): "
        + ", ".join(f"{n:,} with OUTAGE_STALE_SECONDS {m}" for m, n in stale_hits.items())
        + "."
    )

    targets: list[dict[str, Any]] = []

    def target(name: str, goal: str, measured: str, ok: bool) -> None:
        targets.append({"target": name, "goal": goal, "measured": measured, "result": _result(ok)})

    target(
        "cached vs plain req/s",
        f">= {CACHED_VS_PLAIN:g}x",
        f"{cached.rps / plain.rps:.2f}x",
        cached.rps >= CACHED_VS_PLAIN * plain.rps,
    )
    target(
        "cached p99 below plain p99",
        "lower",
        f"{cached.p99_ms:.1f} vs {plain.p99_ms:.1f} ms",
        cached.p99_ms < plain.p99_ms,
    )
    target(
        "ASGI vs WSGI cached req/s",
        ">= 1x",
        f"{asgi.rps / cached.rps:.2f}x",
        asgi.rps >= cached.rps,
    )
    for mode, phases in outages.items():
        failed = sum(r.failed for r in phases)
        target(
            f"outage {mode} s: no request fails",
            "0 failed",
            f"{failed:,} failed",
            failed == 0,
        )
    if "5" in outages:
        up, killed, _ = outages["5"]
        target(
            "outage 5 s: killed req/s vs up",
            f">= {OUTAGE_KEEP_RPS:.0%}",
            f"{killed.rps / up.rps:.0%}",
            killed.rps >= OUTAGE_KEEP_RPS * up.rps,
        )
        target(
            "outage 5 s: killed db xact/s vs up",
            f"<= {OUTAGE_MAX_XACTS:g}x",
            _ratio(killed.xacts_per_s, up.xacts_per_s),
            killed.xacts_per_s <= OUTAGE_MAX_XACTS * up.xacts_per_s,
        )
    print(
        table(
            ["target", "goal", "measured", "result"],
            [[t["target"], t["goal"], t["measured"], t["result"]] for t in targets],
            set(),
        )
    )
    missed = [t["target"] for t in targets if t["result"] == "MISS"]
    print(
        f"{len(targets) - len(missed)} targets met, {len(missed)} missed"
        + (f": {', '.join(missed)}." if missed else ".")
    )
    return targets


# -- main ---------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM ends the run as Ctrl-C does: through the cleanup below."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="a smoke run: 3 s runs, fewer rows")
    p.add_argument("--duration", type=float, help="seconds of each measured run (30)")
    p.add_argument("--phase", type=float, help="seconds of each outage phase (10)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--db",
        default=os.environ.get("TC_LOAD_DB", DEFAULT_DB),
        help=f"database to create and drop (default {DEFAULT_DB})",
    )
    p.add_argument(
        "--pg",
        default=os.environ.get("TC_LOAD_PG", DEFAULT_PG),
        help=f"PostgreSQL server URL, without a database (default {DEFAULT_PG})",
    )
    p.add_argument("--keep-db", action="store_true", help="leave the database in place")
    args = p.parse_args(argv)
    plan = QUICK if args.quick else FULL
    if args.duration:
        plan = Plan(**{**asdict(plan), "duration": args.duration})
    if args.phase:
        plan = Plan(**{**asdict(plan), "phase": args.phase})
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk; make loadtest does)", file=sys.stderr)
        return 1

    signal.signal(signal.SIGTERM, _interrupt)
    from tests.redis_server import RedisServer

    workdir = Path(tempfile.mkdtemp(prefix="tc-loadtest-"))
    db = Database(args.pg, args.db)
    redis = RedisServer(workdir)
    status = 0
    created = False
    try:
        redis.start()
        log(f"private redis-server on port {redis.port}; database {db.name}: recreating")
        db.recreate()
        created = True
        env = configure_django(db, redis.url)
        test = LoadTest(plan, db, redis, env, workdir)
        rows = test.prepare()
        log(
            f"demo data: {len(rows.users):,} users, {len(rows.flows):,} flows, "
            f"{len(rows.models)} provider models, {len(rows.globals)} global models"
        )
        runs: dict[str, Run] = {}
        tiers: dict[str, list[dict[str, Any]]] = {}
        counters: dict[str, dict[str, Any]] = {}
        for key, label, kind, prefix, _ in RUNS:
            log(f"{label}: {plan.warmup:g} s warm-up, {plan.duration:g} s")
            runs[key], split = test.measured(key, kind, prefix)
            if split:
                tiers[key], counters[key] = tier_rows(split), split
        for key, label, kind, prefix, app, bare in DJANGO_RUNS:
            log(f"{label}: {plan.warmup:g} s warm-up, {plan.duration:g} s")
            runs[key], _ = test.measured(key, kind, prefix, app, bare)
        outages: dict[str, list[Run]] = {}
        stale_hits: dict[str, int] = {}
        for stale in OUTAGE_STALE:
            log(f"Redis outage, OUTAGE_STALE_SECONDS {stale:g}: 3 phases of {plan.phase:g} s")
            outages[f"{stale:g}"], stale_hits[f"{stale:g}"] = test.outage(stale)

        meta = machine(redis)
        meta["mode"] = "quick" if args.quick else "full"
        targets = report(meta, plan, runs, tiers, outages, stale_hits)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    _json_safe(
                        {
                            "meta": meta,
                            "plan": asdict(plan),
                            "mix": {**MIX, "write": WRITES},
                            "runs": {k: asdict(r) for k, r in runs.items()},
                            "tiers": tiers,
                            "counters": counters,
                            "outage": {m: [asdict(r) for r in ph] for m, ph in outages.items()},
                            "outage_stale_hits": stale_hits,
                            "targets": targets,
                        }
                    ),
                    f,
                    indent=2,
                )
            log(f"wrote {args.json}")
    except KeyboardInterrupt:
        log("interrupted")
        status = 1
    except Exception:
        traceback.print_exc()
        for server in _live:
            print(f"{server.kind} log ({server.log_path}):\n{server.log_tail()}", file=sys.stderr)
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for server in list(_live):
            server.stop()
        try:
            from django.db import connections

            connections.close_all()
        except Exception:
            pass
        redis.stop()
        if created and not args.keep_db:
            try:
                db.recreate(create=False)
                log(f"dropped database {db.name}")
            except Exception:
                traceback.print_exc()
                status = 1
        if status == 0:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"logs kept in {workdir}")
    log("done")
    return status


def _json_safe(x: Any) -> Any:
    if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


if __name__ == "__main__":
    sys.exit(main())
