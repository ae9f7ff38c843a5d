"""L1: a bounded, thread-safe LRU of immutable rows, dropped by key, row or model."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Hashable
from typing import Any, NamedTuple

from ..conf import conf

# Stored in place of a row when the database had none.
NEGATIVE = object()

# Entry layout (a tuple, for speed): expires_at, label, row id, frozen row or NEGATIVE,
# flush epoch of the model at fill, for negatives the model's write count at fill, the
# entry's weight in bytes (L1_MAX_BYTES), and for an entry filled while the bus was not
# trusted (OUTAGE_STALE_SECONDS) the monotonic time its database read began, else 0.
_EXP, _LABEL, _ROW, _VALUE, _EPOCH, _WRITES, _WEIGHT, _READ_AT = range(8)

# What an entry costs beyond its values: the entry tuple, its key tuple, the LRU's link and
# the row index's slot (measured with tracemalloc: about 1.4 KB per small row in all).
_ENTRY_OVERHEAD = 600


# Drops remembered for fills in flight (LocalTier._log): far more than can happen during one
# read at any realistic write rate.
_DROP_LOG = 1024


def weigh(value: Any) -> int:
    """An entry's bytes as L1 stores it: a frozen row's values (the immutable ones as the
    objects they are, the mutable ones as their pickles), a derived result's, plus the
    entry's own overhead. An estimate from sizes Python reports, computed once per fill."""
    if value is NEGATIVE:
        return _ENTRY_OVERHEAD
    if type(value) is tuple and len(value) == 3 and type(value[0]) is tuple:
        imm, mut, _ = value
        return (
            _ENTRY_OVERHEAD
            + sum(sys.getsizeof(v) for v in imm)
            + sum(sys.getsizeof(b) for b in mut)
        )
    if isinstance(value, (bytes, str)):
        return _ENTRY_OVERHEAD + sys.getsizeof(value)
    if isinstance(value, tuple):
        return _ENTRY_OVERHEAD + sum(weigh(v) for v in value)
    return _ENTRY_OVERHEAD + sys.getsizeof(value)


def weigh_payload(size: int, values: int) -> int:
    """An entry's weight from the size of its L2 payload, as weigh() finds it without
    asking every value for its size (a third of an L2 hit's own work): an encoded value is
    its data and a few bytes, the object also a header of about 40 bytes."""
    return _ENTRY_OVERHEAD + size + 40 * values


class Peeked(NamedTuple):
    """An L1 entry as stored (LocalTier.peek), with its model's counters now: the entry is
    served while `epoch == current_epoch` and, for a negative one, `writes ==
    current_writes`, until `expires_at` (time.monotonic())."""

    expires_at: float
    label: str
    row: str
    value: Any
    epoch: int
    writes: int
    weight: int
    read_at: float
    current_epoch: int
    current_writes: int


class LocalTier:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Keys: a read's (lookup, database, scope, *values) tuple, a derived function's str.
        self._data: OrderedDict[Hashable, tuple[Any, ...]] = OrderedDict()
        # (label, row id) -> the key of the row's one entry, or a set when it has several
        # (a set per row would double what the index costs).
        self._rows: dict[tuple[str, str], Any] = {}
        self._epoch: dict[str, int] = {}
        self._writes: dict[str, int] = {}
        # Bumped by clear(): refuses every fill that started before it.
        self._clears = 0
        # The last drops, numbered: a fill in flight is refused by a drop of its own row,
        # not by one of any row of its model (a busy model's writes refused most fills).
        # Past the log's length, every fill older than it is refused.
        self._seq = 0
        self._log: deque[tuple[int, str, frozenset[str] | None]] = deque(maxlen=_DROP_LOG)
        self.evictions = 0
        # The weight of every entry held (L1_MAX_BYTES bounds it).
        self.bytes = 0
        os.register_at_fork(after_in_child=self.after_fork)

    def after_fork(self) -> None:
        """A forked child starts empty: what the parent held is vouched for by the parent's
        bus, not by the child's (which starts on its first read)."""
        self._lock = threading.Lock()
        self.clear()

    # -- reads ---------------------------------------------------------------
    def get(self, key: Any, now: float | None = None) -> Any:
        """The frozen row, NEGATIVE, or None for a miss."""
        # Every L1 hit comes here: acquire() and release() rather than `with`, whose
        # special-method lookups cost CPython 3.11 about as much again as the lock itself.
        lock = self._lock
        lock.acquire()
        try:
            return self._lookup(key, now if now is not None else time.monotonic())
        finally:
            lock.release()

    def get_many(self, keys: list[Any], now: float) -> list[Any]:
        """get() of each key, under one hold of the lock (get_many_cached)."""
        with self._lock:
            return [self._lookup(key, now) for key in keys]

    def _lookup(self, key: Any, now: float) -> Any:
        e = self._data.get(key)
        if e is None:
            return None
        label = e[_LABEL]
        if (
            e[_EXP] < now
            or e[_EPOCH] != self._epoch.get(label, 0)
            or (e[_VALUE] is NEGATIVE and e[_WRITES] != self._writes.get(label, 0))
        ):
            self._remove(key, e)
            return None
        self._data.move_to_end(key)
        return e[_VALUE]

    def peek(self, key: Any) -> Peeked | None:
        """The entry under `key` as stored, whether or not it could be served, without
        touching it: no LRU move, no removal of an expired or flushed entry (inspection)."""
        with self._lock:
            e = self._data.get(key)
            if e is None:
                return None
            label = e[_LABEL]
            return Peeked(
                expires_at=e[_EXP],
                label=label,
                row=e[_ROW],
                value=e[_VALUE],
                epoch=e[_EPOCH],
                writes=e[_WRITES],
                weight=e[_WEIGHT],
                read_at=e[_READ_AT],
                current_epoch=self._epoch.get(label, 0),
                current_writes=self._writes.get(label, 0),
            )

    def get_stale(self, key: Any, now: float, vouched_at: float, bound: float) -> Any:
        """As get(), while the bus cannot vouch for L1 (OUTAGE_STALE_SECONDS): an entry is
        served only while less than `bound` seconds have passed since it was last known
        to match the database: the last answered heartbeat (`vouched_at`) for an entry
        the bus kept, or the start of its database read for one filled since."""
        with self._lock:
            e = self._data.get(key)
            if e is None or now - max(e[_READ_AT], vouched_at) >= bound:
                return None
        return self.get(key, now)

    def token(self, label: str) -> tuple[int, int, int]:
        """Taken before reading L2 or the database: (clears, the model's flush epoch, the
        drop sequence). A fill is refused if L1 was cleared or the model flushed since, or
        if its own row was dropped since (any drop of the model, for an entry with no row
        or a remembered absence: a write may have created it)."""
        return (self._clears, self._epoch.get(label, 0), self._seq)

    def _dropped_since(self, label: str, seq: int) -> frozenset[str] | None:
        """The rows of `label` dropped after drop sequence `seq`, with "" if there was any
        such drop; None when the whole model counts as dropped (a key or the model
        dropped, or the log no longer reaches back)."""
        if seq == self._seq:
            return frozenset()
        log = self._log
        if not log or log[0][0] > seq + 1:
            return None
        rows: set[str] = set()
        for at, lab, dropped in reversed(log):
            if at <= seq:
                break
            if lab == label:
                if dropped is None:
                    return None
                # "" too: any drop of the model (a create's names no cached row) refuses
                # an entry without a row and a remembered absence.
                rows.update(dropped)
                rows.add("")
        return frozenset(rows)

    # -- writes --------------------------------------------------------------
    def set(
        self,
        key: Hashable,
        label: str,
        row: str,
        value: Any,
        timeout: float,
        token: tuple[int, int, int],
        read_at: float = 0.0,
        weight: int | None = None,
    ) -> bool:
        """Store an entry unless `label` changed since `token` was taken (False then, or
        when the entry alone is heavier than L1_MAX_BYTES)."""
        return self.set_many(label, token, [(key, row, value, timeout, weight)], read_at) == 1

    def set_many(
        self,
        label: str,
        token: tuple[int, int, int],
        entries: list[tuple[Hashable, str, Any, float, int | None]],
        read_at: float = 0.0,
    ) -> int:
        """set() of each (key, row id, value, timeout, weight or None), under one hold of
        the lock; how many were stored."""
        stored = 0
        with self._lock:
            if token[0] != self._clears or token[1] != self._epoch.get(label, 0):
                return 0
            # No drop since the token (the usual case) without a call.
            dropped = frozenset() if token[2] == self._seq else self._dropped_since(label, token[2])
            if dropped is None:
                return 0
            writes = self._writes.get(label, 0)
            now = time.monotonic()
            max_bytes = conf.L1_MAX_BYTES
            for key, row, value, timeout, weight in entries:
                if dropped and (row in dropped or not row or value is NEGATIVE):
                    continue  # its row (or, for no row, any row) was written meanwhile
                old = self._data.pop(key, None)
                if old is not None:
                    self.bytes -= old[_WEIGHT]
                    self._unindex(key, old)
                if weight is None:
                    weight = weigh(value)
                if weight > max_bytes:
                    continue  # would push every other entry out: L2 serves this one
                self._data[key] = (
                    now + timeout,
                    label,
                    row,
                    value,
                    token[1],
                    writes,
                    weight,
                    read_at,
                )
                self.bytes += weight
                stored += 1
                if row:
                    rk = (label, row)
                    have = self._rows.get(rk)
                    if have is None or have == key:
                        self._rows[rk] = key
                    elif type(have) is set:
                        have.add(key)
                    else:
                        self._rows[rk] = {have, key}
            # Least recently used first, until both bounds hold.
            limit = conf.L1_MAX_ENTRIES
            while self._data and (len(self._data) > limit or self.bytes > max_bytes):
                k, e = self._data.popitem(last=False)
                self.bytes -= e[_WEIGHT]
                self._unindex(k, e)
                self.evictions += 1
        return stored

    def drop_rows(self, label: str, rows: list[str]) -> int:
        """Drop every entry of these rows, whatever lookup it was cached under."""
        n = 0
        with self._lock:
            self._writes[label] = self._writes.get(label, 0) + 1
            self._logged(label, frozenset(rows))
            for row in rows:
                have = self._rows.pop((label, row), None)
                if have is None:
                    continue
                for key in have if type(have) is set else (have,):
                    e = self._data.pop(key, None)
                    if e is not None:
                        self.bytes -= e[_WEIGHT]
                        n += 1
        return n

    def drop_key(self, key: Hashable, label: str) -> None:
        with self._lock:
            self._writes[label] = self._writes.get(label, 0) + 1
            self._logged(label, None)
            e = self._data.get(key)
            if e is not None:
                self._remove(key, e)

    def drop_model(self, label: str) -> None:
        with self._lock:
            self._epoch[label] = self._epoch.get(label, 0) + 1
            self._writes[label] = self._writes.get(label, 0) + 1
            self._logged(label, None)

    def _logged(self, label: str, rows: frozenset[str] | None) -> None:
        """Record a drop (under the lock) for the fills in flight to check against."""
        self._seq += 1
        self._log.append((self._seq, label, rows))

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._rows.clear()
            self.bytes = 0
            self._clears += 1

    def prune_expired(self) -> int:
        now = time.monotonic()
        with self._lock:
            dead = [k for k, e in self._data.items() if e[_EXP] < now]
            for k in dead:
                self._remove(k, self._data[k])
        return len(dead)

    # -- introspection -------------------------------------------------------
    def __len__(self) -> int:
        return len(self._data)

    def count(self, label: str) -> int:
        with self._lock:
            return sum(1 for e in self._data.values() if e[_LABEL] == label)

    # -- internals -----------------------------------------------------------
    def _remove(self, key: Hashable, e: tuple[Any, ...]) -> None:
        del self._data[key]
        self.bytes -= e[_WEIGHT]
        self._unindex(key, e)

    def _unindex(self, key: Any, e: tuple[Any, ...]) -> None:
        row = e[_ROW]
        if row:
            rk = (e[_LABEL], row)
            have = self._rows.get(rk)
            if have is None:
                return
            if type(have) is set:
                have.discard(key)
                if len(have) == 1:
                    self._rows[rk] = next(iter(have))
                elif not have:
                    del self._rows[rk]
            elif have == key:
                del self._rows[rk]


local_tier = LocalTier()


def clear_local() -> None:
    """Empty this process's L1 (tests, benchmarks). Other processes are not touched."""
    local_tier.clear()
