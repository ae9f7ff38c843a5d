"""Commit-to-drop latency across processes: from the COMMIT of a write in this process to
the moment another process's bus listener has dropped the row from its L1.

`measure_commit_to_drop(n)` is what `make bench` prints and tests/test_coherence.py runs.
It needs Django set up with tests.settings (a worker process shares the run's database
and key prefix), committed data (not inside a test transaction) and a reachable Redis.

Both timestamps are time.monotonic(), which on Linux is CLOCK_MONOTONIC: one clock for
every process of the machine. The commit time is taken by an on_commit callback
registered before the write, so it runs first, right after COMMIT returned; the drop
time by an invalidation hook in the other process, right after its L1 entry went.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from django.db import transaction

# L1 entries are labelled by invalidation group: "<database alias>:<root model label>".
LABEL = "default:testapp.flow"

# -- the other process's side -------------------------------------------------------------

_drops: list[tuple[float, int]] = []
_busy_stop = threading.Event()


def install_hook() -> None:
    """Record (time, L1 entries of the model left) each time the bus drops our model."""
    from tiered_cache import invalidation
    from tiered_cache.tiers import local_tier

    def hook(labels: set[str]) -> None:
        if LABEL in labels:
            _drops.append((time.monotonic(), local_tier.count(LABEL)))

    invalidation.local_hooks.append(hook)


def warm(pk: int) -> int:
    """Put the row in L1 (waiting for a trusted bus); the number of drops seen so far."""
    from tests.testapp.models import Flow
    from tiered_cache.bus import bus
    from tiered_cache.tiers import local_tier

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        bus.wait_trusted()
        Flow.objects.get_cached(pk=pk)
        if local_tier.count(LABEL) >= 1:
            break
        time.sleep(0.002)
    return len(_drops)


def wait_drop(seen: int, timeout: float = 5.0) -> tuple[float, int] | None:
    deadline = time.monotonic() + timeout
    while len(_drops) <= seen:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.0005)
    return _drops[seen]


def start_busy(provider_pk: int, threads: int) -> None:
    """Threads reading another model's row from L1 in a loop: they compete with the
    listener for the GIL, as request threads of a busy web process do. (A Provider: the
    row becomes the hottest of its model in the cluster's stats, and no test looks there.)"""
    from tests.testapp.models import Provider

    _busy_stop.clear()

    def loop() -> None:
        while not _busy_stop.is_set():
            Provider.objects.get_cached(pk=provider_pk)

    for _ in range(threads):
        threading.Thread(target=loop, daemon=True).start()


def stop_busy() -> None:
    _busy_stop.set()


# The floor: a thread of the same busy process on a plain redis-py subscription, doing
# nothing with what it receives but note the time. Any listener of any design waits this
# long for its message: for the OS to wake the thread and for the busy threads to hand it
# the GIL.

_received: dict[int, float] = {}
_subscriber_stop = threading.Event()


def start_subscriber(channel: str) -> None:
    from tiered_cache.bus import bus
    from tiered_cache.tiers import redis_tier

    bus.wait_trusted()  # the process has switched its GIL interval, as for the bus
    pubsub = redis_tier.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    _subscriber_stop.clear()

    def listen() -> None:
        while not _subscriber_stop.is_set():
            message = pubsub.get_message(timeout=1.0)
            if message is not None:
                _received[int(message["data"])] = time.monotonic()
        pubsub.close()

    threading.Thread(target=listen, daemon=True).start()


def wait_received(i: int, timeout: float = 5.0) -> float | None:
    deadline = time.monotonic() + timeout
    while i not in _received:
        if time.monotonic() > deadline:
            return None
        time.sleep(0.0005)
    return _received[i]


def stop_subscriber() -> None:
    _subscriber_stop.set()


# -- this process's side ------------------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


@contextmanager
def _busy_worker(busy_threads: int, prepare: str, *args: Any) -> Iterator[Any]:
    """The setting both measurements share: a worker process, prepared by `prepare` (a
    function of this module, called there with args), with busy_threads of its threads
    reading a row from L1 for as long as the block runs."""
    from tests.processes import worker
    from tests.testapp.models import Provider

    provider = Provider.objects.create(name=f"bench-{secrets.token_hex(4)}", display_name="Bench")
    try:
        with worker() as other:
            other.call(f"benchmarks.latency.{prepare}", *args)
            if busy_threads:
                other.call("benchmarks.latency.start_busy", provider.pk, busy_threads)
            yield other
            if busy_threads:
                other.call("benchmarks.latency.stop_busy")
    finally:
        Provider.objects.filter(pk=provider.pk).delete()


def measure_commit_to_drop(n: int = 200, busy_threads: int = 0) -> dict[str, Any]:
    """Commit a write n times and time how long another process takes to drop the row
    from its L1. busy_threads > 0 keeps that many threads of the other process reading
    from L1 meanwhile. Returns counts and milliseconds (p50, p90, p99, max)."""
    from tests.testapp.models import Flow

    row = Flow.objects.create(
        tenant_id=f"bench-{secrets.token_hex(4)}", session_id="commit-to-drop"
    )
    samples: list[float] = []
    missed = not_dropped = 0
    try:
        with _busy_worker(busy_threads, "install_hook") as other:
            for i in range(n):
                seen = other.call("benchmarks.latency.warm", row.pk)
                committed: list[float] = []
                with transaction.atomic():
                    Flow.objects.filter(pk=row.pk).update(current_step=i + 1)
                    # The invalidation runs at COMMIT, before every on_commit callback: the
                    # clock starts just before the block commits (the COMMIT is counted).
                    committed.append(time.monotonic())
                drop = other.call("benchmarks.latency.wait_drop", seen)
                if drop is None:
                    missed += 1
                    continue
                at, left = drop
                if left:
                    not_dropped += 1
                samples.append(at - committed[0])
    finally:
        Flow.objects.filter(pk=row.pk).delete()
    return _summary(samples, n, busy_threads, missed, still_in_l1=not_dropped)


def measure_publish_to_receive(n: int = 200, busy_threads: int = 0) -> dict[str, Any]:
    """The floor of measure_commit_to_drop(), set up the same way: n messages published
    here, each timed to its arrival at a bare subscriber thread of the other process
    (start_subscriber), busy_threads of which read from L1 meanwhile."""
    from tiered_cache.tiers import redis_tier

    channel = f"bench-floor-{secrets.token_hex(4)}"
    samples: list[float] = []
    missed = 0
    with _busy_worker(busy_threads, "start_subscriber", channel) as other:
        publish = redis_tier.client.publish
        while not publish(channel, "-1"):  # until the subscription is in place
            time.sleep(0.01)
        for i in range(n):
            sent = time.monotonic()
            publish(channel, str(i))
            at = other.call("benchmarks.latency.wait_received", i)
            if at is None:
                missed += 1
            else:
                samples.append(at - sent)
        other.call("benchmarks.latency.stop_subscriber")
    return _summary(samples, n, busy_threads, missed)


def _summary(
    samples: list[float], n: int, busy_threads: int, missed: int, still_in_l1: int = 0
) -> dict[str, Any]:
    samples.sort()
    ms = [s * 1000 for s in samples]
    return {
        "n": n,
        "busy_threads": busy_threads,
        "measured": len(ms),
        "missed": missed,
        "still_in_l1": still_in_l1,
        "p50_ms": round(_percentile(ms, 0.50), 3) if ms else None,
        "p90_ms": round(_percentile(ms, 0.90), 3) if ms else None,
        "p99_ms": round(_percentile(ms, 0.99), 3) if ms else None,
        "max_ms": round(ms[-1], 3) if ms else None,
        "min_ms": round(ms[0], 3) if ms else None,
    }


def format_result(result: dict[str, Any]) -> str:
    return (
        f"commit-to-drop across processes (busy reader threads: {result['busy_threads']}): "
        f"n={result['measured']}/{result['n']} p50={result['p50_ms']} ms "
        f"p90={result['p90_ms']} ms p99={result['p99_ms']} ms max={result['max_ms']} ms "
        f"missed={result['missed']}"
    )
