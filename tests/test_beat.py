"""Celery beat for real: `celery -A demo_project worker -B` as a process group of its own,
on the Redis broker and on RabbitMQ, with a warmup and the cleanup due every second, from
CELERY_BEAT_SCHEDULE and from django-celery-beat's database scheduler. The scheduled runs
land in Redis (L2 rows, the run records of the worker's processes) and on the dashboard.

The worker reads this run's test database and Redis key prefix (tests/processes.py) and
its Celery settings from TC_CELERY_JSON (tests/settings.py); data is committed so it sees
the rows. A broker that does not answer fails the test, naming `make broker`."""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.test import Client
from django_celery_beat.models import IntervalSchedule, PeriodicTask
from kombu import Connection

from tests.cache_fixtures import l2_keys
from tests.processes import child_env, wait_for
from tests.testapp.factories import UserFactory
from tests.testapp.models import User
from tiered_cache import maintenance
from tiered_cache.reporting import process_name
from tiered_cache.tiers.remote import Unavailable

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("no_past_runs")]

ROOT = Path(__file__).resolve().parent.parent
# For the worker to start and beat to send the runs; a loaded 2-core machine takes a while
# to start a Celery worker with Django.
WAIT = 30
STOP_WAIT = 15
DASHBOARD = "/admin/tiered_cache/pendinginvalidation/dashboard/"
RABBITMQ_URL = os.environ.get("TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")

WARMUP = {
    "task": "tiered_cache.tasks.warmup",
    "args": ["testapp.User"],
    "kwargs": {"limit": 1000},
}
CLEANUP = {"task": "tiered_cache.tasks.cleanup_expired"}
# Every second. A run still queued after this is dropped (the next is due anyway); longer
# than the period, as a worker starting on a loaded machine lets the first few wait.
EXPIRES = 20


# -- the brokers ---------------------------------------------------------------------------


def _redis_broker() -> str:
    url: str = settings.TEST_REDIS_URL
    try:
        redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        pytest.fail(f"The Redis broker at {url} is not answering ({exc}); run: make services")
    return url


def _rabbitmq_broker() -> str:
    try:
        with Connection(RABBITMQ_URL, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        pytest.fail(
            f"RabbitMQ at {RABBITMQ_URL} is not answering ({exc!r}); start it with: make broker"
        )
    return RABBITMQ_URL


@pytest.fixture(params=["redis", "rabbitmq"])
def broker(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any]]]:
    """The broker's URL and the Celery settings that keep this run's queue apart: under the
    run's key prefix on Redis (conftest deletes its keys), a queue of its own on RabbitMQ
    (deleted here with its exchange)."""
    prefix = settings.TEST_KEY_PREFIX
    queue = f"{prefix}.beat." + re.sub(r"\W+", "-", request.node.name)
    if request.param == "redis":
        yield (
            _redis_broker(),
            {
                "task_default_queue": queue,
                "broker_transport_options": {"global_keyprefix": f"{prefix}:celery:"},
            },
        )
        return
    url = _rabbitmq_broker()
    yield url, {"task_default_queue": queue}
    with Connection(url, connect_timeout=3) as conn:
        channel = conn.default_channel
        channel.queue_delete(queue)
        channel.exchange_delete(queue)


# -- the worker ----------------------------------------------------------------------------


class BeatWorker:
    """`celery -A demo_project worker -B` in a session of its own: the worker, its pool
    child and the beat process are one process group, stopped together."""

    def __init__(self, tmp_path: Path, broker_url: str, celery: dict[str, Any], *args: str):
        self.log_path = tmp_path / "worker.log"
        env = {
            **os.environ,
            **child_env(
                {
                    "CELERY_BROKER_URL": broker_url,
                    "TC_CELERY_JSON": json.dumps(celery),
                    "PYTHONPATH": str(ROOT),
                }
            ),
        }
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "demo_project",
            "worker",
            "-B",
            "-l",
            "info",
            "--concurrency",
            "1",
            "-n",
            f"beat-{os.getpid()}-{time.monotonic_ns()}@%h",
            # Nothing to say to other workers on the broker, nor to wait for.
            "--without-mingle",
            "--without-gossip",
            "-s",
            str(tmp_path / "celerybeat-schedule"),
            *args,
        ]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        text = self.log_path.read_text(errors="replace")
        return text[-8000:]

    def owns(self, host: str) -> bool:
        """Whether a run record's process ("hostname:pid") is one of this worker's."""
        try:
            return os.getpgid(int(host.rsplit(":", 1)[1])) == self.proc.pid
        except (ValueError, ProcessLookupError):
            return False

    def kill(self) -> None:
        """The last resort (atexit: a run interrupted before its teardown)."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """A warm shutdown (TERM) of the whole group, then KILL for what is left."""
        for sig, wait in ((signal.SIGTERM, STOP_WAIT), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # The leader is gone; its pool child or beat may not be yet.
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                time.sleep(0.1)
            if not _group_alive(self.proc.pid):
                break


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Any]:
    started: list[BeatWorker] = []

    def start(broker_url: str, celery: dict[str, Any], *args: str) -> BeatWorker:
        w = BeatWorker(tmp_path, broker_url, celery, *args)
        started.append(w)
        atexit.register(w.kill)
        return w

    yield start
    for w in started:
        w.stop()
        atexit.unregister(w.kill)


# -- what the test waits for ---------------------------------------------------------------


def runs_by(worker: BeatWorker, since: float) -> dict[str, Any]:
    """The last warmup of testapp.User and the last cleanup, if the worker recorded them
    after `since`."""
    try:
        runs = maintenance.last_runs()
    except Unavailable:  # a loaded machine: Redis did not answer within the socket timeout
        return {}
    out = {}
    for name, run in (("warmup", runs["warmup"].get("testapp.user")), ("cleanup", runs["cleanup"])):
        if run and run["at"] >= since and worker.owns(run["host"]):
            out[name] = run
    return out


def wait_for_runs(worker: BeatWorker, since: float) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        if worker.proc.poll() is not None:
            pytest.fail(f"the worker exited ({worker.proc.returncode}):\n{worker.log()}")
        found = runs_by(worker, since)
        if len(found) == 2:
            return found
        time.sleep(0.2)
    pytest.fail(
        f"no scheduled warmup and cleanup by the worker within {WAIT}s "
        f"(recorded: {runs_by(worker, 0)}):\n{worker.log()}"
    )


def check_scheduled_runs(worker: BeatWorker, client: Client) -> None:
    """Runs of both tasks, then later ones again (beat keeps sending them every second),
    the warmup's rows in L2, and both runs on the dashboard."""
    started = time.time()
    first = wait_for_runs(worker, started)
    again = wait_for_runs(worker, max(run["at"] for run in first.values()) + 0.001)
    for name in ("warmup", "cleanup"):
        assert again[name]["at"] > first[name]["at"], name

    users = User.objects.count()
    assert again["warmup"]["stored"] == users
    assert again["warmup"]["refused"] == 0
    # Read with the test's short socket timeouts (tests/settings.py): retried while loaded.
    assert wait_for(lambda: quietly(lambda: len(l2_keys(User))) == users, WAIT, step=0.2)

    view = dashboard(client)
    cleanup = view["last_cleanup"]
    (row,) = [r for r in view["models"] if r["label_lower"] == "testapp.user"]
    warmup = row["last_warmup"]
    assert worker.owns(cleanup["host"]) and cleanup["at"] >= again["cleanup"]["at"]
    assert worker.owns(warmup["host"]) and warmup["at"] >= again["warmup"]["at"]
    assert warmup["stored"] == users
    page = view["page"]
    last_cleanup = re.search(r'<strong id="tc-last-cleanup">(.*?)</strong>', page, re.S)
    assert last_cleanup and "UTC" in last_cleanup.group(1), page
    user_row = re.search(r'<tr id="tc-testapp-user".*?</tr>', page, re.S)
    assert user_row, page
    last_warmup = re.search(r'<td class="tc-last-warmup">(.*?)</td>', user_row.group(0), re.S)
    assert last_warmup, user_row.group(0)
    assert f"stored {users}, refused 0" in last_warmup.group(1)
    assert process_name() not in (cleanup["host"], warmup["host"])


def quietly(read: Callable[[], Any]) -> Any:
    """read(), or None if Redis did not answer in time."""
    try:
        return read()
    except (redis.RedisError, Unavailable):
        return None


def dashboard(client: Client) -> dict[str, Any]:
    """What the dashboard page rendered, once it could read Redis (on a loaded machine a
    read may miss the socket timeout: the page then says so, in "redis_error")."""
    deadline = time.monotonic() + WAIT
    while True:
        response = client.get(DASHBOARD)
        assert response.status_code == 200
        view: dict[str, Any] = response.context["view"]
        if view["redis_error"] is None or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert view["redis_error"] is None, view["redis_error"]
    view["page"] = response.content.decode()
    return view


@pytest.fixture
def su_client(client: Client) -> Client:
    """Logged in before the worker starts: a login writes the user (last_login), which
    would invalidate its warmed row."""
    UserFactory.create_batch(3)
    client.force_login(UserFactory(username="root", is_staff=True, is_superuser=True))
    return client


# -- the tests -----------------------------------------------------------------------------


def test_beat_schedule_runs_warmup_and_cleanup(
    broker: tuple[str, dict[str, Any]], start_worker: Any, su_client: Client
) -> None:
    url, celery = broker
    schedule = {
        "warm-users": {**WARMUP, "schedule": 1.0, "options": {"expires": EXPIRES}},
        "cleanup": {**CLEANUP, "schedule": 1.0, "options": {"expires": EXPIRES}},
    }
    worker = start_worker(url, {**celery, "beat_schedule": schedule})

    check_scheduled_runs(worker, su_client)


def test_database_scheduler_runs_warmup_and_cleanup(
    broker: tuple[str, dict[str, Any]], start_worker: Any, su_client: Client
) -> None:
    """django-celery-beat as the README sets it up: the periodic tasks are rows (committed,
    in the database the worker reads), the scheduler named `django`, and no
    CELERY_BEAT_SCHEDULE. `celery worker -B` takes it as --scheduler: the worker's -S is
    --statedb (`celery beat -S django` is the separate beat's)."""
    url, celery = broker
    every = IntervalSchedule.objects.create(every=1, period=IntervalSchedule.SECONDS)
    PeriodicTask.objects.create(
        name="warm users",
        task=WARMUP["task"],
        interval=every,
        args=json.dumps(WARMUP["args"]),
        kwargs=json.dumps(WARMUP["kwargs"]),
        expire_seconds=EXPIRES,
    )
    PeriodicTask.objects.create(
        name="cache cleanup", task=CLEANUP["task"], interval=every, expire_seconds=EXPIRES
    )
    worker = start_worker(url, {**celery, "beat_schedule": {}}, "--scheduler", "django")

    check_scheduled_runs(worker, su_client)
