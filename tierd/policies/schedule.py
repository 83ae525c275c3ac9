"""Access schedules: declared by the caller or learned, and the policies that use them.

Training repeats the same access order every step. :class:`Schedule` learns
one iteration of it (or takes a declared one), follows where the stream is
in it, and re-learns when the stream stops matching, so a wrong schedule
costs hits for a while but never wedges anything.

Learning: an iteration has ended at position ``p`` when the keys from ``p``
on repeat the first ``m`` recorded keys (``m = min(8, p)``). A key that
occurs twice in one iteration (an activation put in forward and read in
backward) does not end it early, because what follows it differs.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

from tierd.policies.base import EvictionPolicy, PrefetchPolicy

__all__ = ["Schedule", "ScheduleEviction", "SchedulePrefetch"]

_MATCH = 8
_MAX_RECORD = 1 << 20  # accesses; past this the stream is not periodic enough to learn


class Schedule:
    """A cyclic access order and the stream's position in it."""

    def __init__(self, *, relearn_after: int = 16) -> None:
        self.order: list[str] = []
        self.cyclic = True
        self.declared = False
        self.cursor = 0  # index in ``order`` of the next expected access
        self.clock = 0  # accesses observed while following (absolute positions)
        self.relearns = 0
        self._positions: dict[str, list[int]] = {}
        self._recording: list[str] = []
        self._candidates: list[int] = []
        self._misses = 0
        self._relearn_after = relearn_after

    @property
    def active(self) -> bool:
        """Whether there is a schedule to plan with (learned or declared, and matching)."""
        return bool(self.order)

    def declare(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self._install(list(keys), cursor=0)
        self.cyclic = cyclic
        self.declared = True

    def _install(self, order: list[str], cursor: int) -> None:
        self.order = order
        self._positions = {}
        for i, key in enumerate(order):
            self._positions.setdefault(key, []).append(i)
        self.cursor = cursor % len(order) if order else 0
        self._recording = []
        self._candidates = []
        self._misses = 0

    def _relearn(self) -> None:
        self.order = []
        self._positions = {}
        self.declared = False
        self._recording = []
        self._candidates = []
        self._misses = 0
        self.relearns += 1

    def observe(self, key: str) -> None:
        """One access of ``key`` happened."""
        if self.order:
            self._follow(key)
        else:
            self._learn(key)

    def _follow(self, key: str) -> None:
        n = len(self.order)
        self.clock += 1
        if self.order[self.cursor] == key:
            self.cursor = (self.cursor + 1) % n
            self._misses = 0
            return
        # Off the expected position: resynchronise at the key's next occurrence.
        nxt = self._next_index(key)
        if nxt is not None:
            self.cursor = (nxt + 1) % n
        self._misses += 1
        if self._misses >= self._relearn_after:
            self._relearn()
            self._learn(key)

    def _learn(self, key: str) -> None:
        rec = self._recording
        if rec and key == rec[0]:
            self._candidates.append(len(rec))
        rec.append(key)
        for p in list(self._candidates):
            m = min(_MATCH, p)
            if len(rec) < p + m:
                continue
            self._candidates.remove(p)
            if rec[p : p + m] == rec[:m]:
                self._install(rec[:p], cursor=len(rec) - p)
                return
        if len(rec) > _MAX_RECORD:
            self._recording, self._candidates = [], []

    def _next_index(self, key: str) -> int | None:
        positions = self._positions.get(key)
        if not positions:
            return None
        i = bisect.bisect_left(positions, self.cursor)
        if i < len(positions):
            return positions[i]
        return positions[0] if self.cyclic else None

    def distance(self, key: str) -> float:
        """Accesses from now until ``key`` is next used; inf if not in the schedule."""
        if not self.order:
            return math.inf
        nxt = self._next_index(key)
        if nxt is None:
            return math.inf
        return (nxt - self.cursor) % len(self.order) if self.cyclic else nxt - self.cursor

    def upcoming(self, k: int) -> list[str]:
        """The next ``k`` distinct keys the schedule expects."""
        out: list[str] = []
        n = len(self.order)
        for i in range(min(n, 4 * k + 8)):
            if not self.cyclic and self.cursor + i >= n:
                break
            key = self.order[(self.cursor + i) % n]
            if key not in out:
                out.append(key)
                if len(out) == k:
                    break
        return out


class ScheduleEviction(EvictionPolicy):
    """Belady on the schedule: evict the object whose next use is farthest away.

    Objects the schedule does not know go first (least recently used first);
    with no schedule yet it is LRU.
    """

    name = "schedule"

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__()
        self.schedule = schedule or Schedule()
        self._lru: dict[str, OrderedDict[str, None]] = {}

    def _tier(self, tier: str) -> OrderedDict[str, None]:
        return self._lru.setdefault(tier, OrderedDict())

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        self._tier(tier)[key] = None
        self._tier(tier).move_to_end(key)

    def _on_access(self, key: str, tier: str, now: float) -> None:
        order = self._tier(tier)
        if key in order:
            order.move_to_end(key)

    def _on_remove(self, key: str, tier: str) -> None:
        self._tier(tier).pop(key, None)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        order = self._tier(tier)
        if not self.schedule.active:
            yield from order
            return
        dist = self.schedule.distance
        # Farthest next use first; the unknown (inf) in LRU order ahead of all.
        heap = [(-dist(k), i, k) for i, k in enumerate(order)]
        heapq.heapify(heap)
        while heap:
            yield heapq.heappop(heap)[2]

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self.schedule.declare(keys, cyclic=cyclic)


class SchedulePrefetch(PrefetchPolicy):
    """Bring up the next ``depth`` keys of the schedule after every access."""

    name = "schedule"

    def __init__(self, schedule: Schedule | None = None, *, depth: int = 2) -> None:
        self.schedule = schedule or Schedule()
        self.depth = depth

    def on_access(self, key: str, now: float) -> list[str]:
        return self.schedule.upcoming(self.depth) if self.schedule.active else []

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self.schedule.declare(keys, cyclic=cyclic)
