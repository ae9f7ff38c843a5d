"""A daemon thread each process runs once (the bus listener, the filler, the statistics
publisher): started on first use, and again by a forked child, which inherits no thread."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

__all__ = ["ProcessThread"]


class ProcessThread:
    def __init__(
        self,
        name: str,
        target: Callable[[], None],
        prepare: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._target = target
        # Runs under the lock right before a thread starts: fresh queues, events.
        self._prepare = prepare
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0
        os.register_at_fork(after_in_child=self.after_fork)

    def running(self) -> bool:
        t = self._thread
        return self._pid == os.getpid() and t is not None and t.is_alive()

    def start(self) -> bool:
        """Start the thread unless this process runs it already; True if it started now."""
        if self.running():
            return False
        with self._lock:
            if self.running():
                return False
            if self._prepare is not None:
                self._prepare()
            self._pid = os.getpid()
            self._thread = threading.Thread(target=self._target, name=self.name, daemon=True)
            self._thread.start()
            return True

    def join(self, timeout: float) -> None:
        """Wait for a thread that was told to stop (never the calling thread itself)."""
        t = self._thread
        if t is not None and t.is_alive() and t is not threading.current_thread():
            t.join(timeout)
        self._thread = None

    def after_fork(self) -> None:
        self._lock = threading.Lock()
        self._thread = None
        self._pid = 0
