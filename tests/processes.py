"""Real processes for cross-process tests: each a spawned interpreter with its own Django
setup, connections, L1 and bus listener, driven over a pipe."""

from __future__ import annotations

import importlib
import json
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from django.conf import settings
from django.db import connection

_ctx = multiprocessing.get_context("spawn")


def _serve(conn: Any, env: dict[str, str]) -> None:
    os.environ.update(env)
    import django

    django.setup()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        path, args, kwargs = msg
        module, _, name = path.rpartition(".")
        try:
            result = getattr(importlib.import_module(module), name)(*args, **kwargs)
            conn.send(("ok", result))
        except BaseException as exc:  # sent back, raised in the test
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def child_env(extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes another process's tests.settings this run's: its test
    database (the one this process uses now), its Redis key prefix and cache entry."""
    db = connection.settings_dict
    url = (
        f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}"
    )
    extra = dict(extra_env or {})
    cache = dict(settings.CACHES["default"])
    if "TEST_REDIS_URL" in extra:  # a caller pointing the worker at another server
        cache["LOCATION"] = extra["TEST_REDIS_URL"]
    return {
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "TC_TEST_KEY_PREFIX": settings.TEST_KEY_PREFIX,
        "DATABASE_URL": url,
        "TEST_REDIS_URL": cache["LOCATION"],
        # The whole entry: behind Sentinel or on a cluster the location alone says little.
        "TEST_CACHE_JSON": json.dumps(cache),
        **extra,
    }


class Worker:
    def __init__(self, extra_env: dict[str, str] | None = None) -> None:
        env = child_env(extra_env)
        self._conn, child = _ctx.Pipe()
        self.process = _ctx.Process(target=_serve, args=(child, env), daemon=True)
        self.process.start()
        status, self.pid = self._recv(60)
        assert status == "ready"

    def _recv(self, timeout: float) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError("worker process did not answer")
        return self._conn.recv()

    def call(self, path: str, *args: Any, timeout: float = 30, **kwargs: Any) -> Any:
        """Run a module-level function in the worker and return its (picklable) result."""
        self._conn.send((path, args, kwargs))
        return self.result(timeout)

    def send(self, path: str, *args: Any, **kwargs: Any) -> None:
        """Start a call without waiting; collect it with result()."""
        self._conn.send((path, args, kwargs))

    def result(self, timeout: float = 30) -> Any:
        status, value = self._recv(timeout)
        if status == "error":
            raise AssertionError(f"in worker {self.pid}: {value}")
        return value

    def close(self) -> None:
        try:
            self._conn.send(None)
        except OSError:
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()


@contextmanager
def worker(extra_env: dict[str, str] | None = None) -> Iterator[Worker]:
    w = Worker(extra_env)
    try:
        yield w
    finally:
        w.close()


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.005) -> bool:
    """Poll until predicate() holds (True) or the timeout passes (its last answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())
