"""A circuit breaker shared by a process's threads; no lock is held across a Redis call."""

from __future__ import annotations

import logging
import os
import threading
import time

from .conf import conf

logger = logging.getLogger("tiered_cache")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


class CircuitBreaker:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = CLOSED
        self._failures = 0
        self._successes = 0
        self._opened_at = 0.0
        self._probing = False
        self.opened_count = 0
        os.register_at_fork(after_in_child=self.after_fork)

    def after_fork(self) -> None:
        """A forked child judges Redis by its own calls, with a lock of its own."""
        self._lock = threading.Lock()
        self.reset()

    def allow(self) -> bool:
        """True if a call may go to Redis now. Open costs one attribute read and a clock read."""
        state = self.state
        if state == CLOSED:
            return True
        if state == OPEN:
            if time.monotonic() - self._opened_at < conf.BREAKER_RECOVERY_TIME:
                return False
            with self._lock:
                if self.state == OPEN:
                    self.state = HALF_OPEN
                    self._successes = 0
                    self._probing = False
        # Half-open: exactly one probe at a time.
        with self._lock:
            if self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        if self.state == CLOSED:
            if self._failures:
                self._failures = 0
            return
        with self._lock:
            self._probing = False
            if self.state == HALF_OPEN:
                self._successes += 1
                if self._successes >= conf.BREAKER_SUCCESS_THRESHOLD:
                    self.state = CLOSED
                    self._failures = 0
                    logger.warning("tiered_cache: Redis answers again; circuit closed")

    def abandon(self) -> None:
        """A call ended by something other than Redis (the caller's own timeout, an
        interrupt): it tells nothing of Redis, but a half-open probe it was must not keep
        every later call from probing."""
        if self._probing:
            with self._lock:
                self._probing = False

    def failure(self, exc: BaseException | None = None) -> None:
        with self._lock:
            self._probing = False
            self._failures += 1
            if self.state == HALF_OPEN or self._failures >= conf.BREAKER_FAILURE_THRESHOLD:
                if self.state == CLOSED:
                    self.opened_count += 1
                    logger.warning(
                        "tiered_cache: Redis failed %d times (last: %r); reads go to the "
                        "database, Redis is tried again every %ss",
                        self._failures,
                        exc,
                        conf.BREAKER_RECOVERY_TIME,
                    )
                self.state = OPEN
                self._opened_at = time.monotonic()

    def reset(self) -> None:
        with self._lock:
            self.state = CLOSED
            self._failures = 0
            self._successes = 0
            self._probing = False


breaker = CircuitBreaker()
