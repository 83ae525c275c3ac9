"""Access schedules: declared by the caller or learned, and the policies that use them.

Training repeats the same access order every step. :class:`Schedule` learns
one iteration of it (or takes a declared one), follows where the stream is
in it, and re-learns when the stream stops matching, so a wrong schedule
costs hits for a while but never wedges anything.

Learning: when a key recurs after ``p`` accesses (counting back over its
last few occurrences), ``p`` is a candidate period; it is believed once the
last 16 accesses repeat the ones ``p`` before them, wherever in the stream
that happens (so a random stretch does not stop a later cycle from being
learned). A key that occurs twice in one iteration (an activation put in
forward and read in backward) gives short candidates that the check rejects.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Iterator, Sequence

from tierd.policies.base import PrefetchPolicy
from tierd.policies.lru import LRUPolicy

__all__ = ["Schedule", "ScheduleEviction", "SchedulePrefetch"]

_CONFIRM = 16  # accesses that must repeat before a period is believed
_OCCURRENCES = 4  # of each key, remembered while learning
_MAX_RECORD = 1 << 18  # accesses kept while learning; periods up to half of it are learnable


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
        self._last_seen: dict[str, list[int]] = {}
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
        self._last_seen = {}
        self._misses = 0

    def _relearn(self) -> None:
        self.order = []
        self._positions = {}
        self.declared = False
        self._recording = []
        self._last_seen = {}
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
        i = len(rec)
        rec.append(key)
        seen = self._last_seen.setdefault(key, [])
        # A key may occur several times per iteration (put in forward, get in
        # backward): the period is the distance to one of its last occurrences.
        for last in reversed(seen):
            p = i - last
            # Believed once the last 16 accesses repeat the ones p earlier (two
            # whole repetitions for periods under 16), wherever in the stream: one
            # iteration plus a little is enough to start planning, and a wrong
            # belief is dropped after relearn_after mismatches.
            span = _CONFIRM if p >= _CONFIRM else min(2 * p, _CONFIRM)
            if len(rec) >= span + p and rec[-span:] == rec[-span - p : -p]:
                self._install(rec[-p:], cursor=0)
                return
        seen.append(i)
        if len(seen) > _OCCURRENCES:
            del seen[0]
        if len(rec) > _MAX_RECORD:
            # Keep the recent half: a period longer than that is not learnable here.
            keep = rec[-(_MAX_RECORD // 2) :]
            self._recording = keep
            self._last_seen = {}
            for j, k in enumerate(keep):
                self._last_seen.setdefault(k, []).append(j)
                del self._last_seen[k][:-_OCCURRENCES]

    def _next_index(self, key: str) -> int | None:
        positions = self._positions.get(key)
        if not positions:
            return None
        i = bisect.bisect_left(positions, self.cursor)
        if i < len(positions):
            return positions[i]
        return positions[0] if self.cyclic else None

    def distance(self, key: str) -> float:
        """Accesses from the latest one until ``key`` is next used (1 = the next access); inf if unknown."""
        if not self.order:
            return math.inf
        nxt = self._next_index(key)
        if nxt is None:
            return math.inf
        return ((nxt - self.cursor) % len(self.order) if self.cyclic else nxt - self.cursor) + 1

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


class ScheduleEviction(LRUPolicy):
    """Belady on the schedule: evict the object whose next use is farthest away
    (size-weighted: ``distance x size``, so mixed sizes do not silt the tier up
    with large objects).

    Objects the schedule does not know go first (least recently used first);
    with no schedule yet it is LRU.
    """

    name = "schedule"

    def __init__(self, schedule: Schedule | None = None) -> None:
        super().__init__()
        self.schedule = schedule or Schedule()
        self._size: dict[tuple[str, str], int] = {}

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        super()._on_insert(key, tier, nbytes, now)
        self._size[(tier, key)] = max(nbytes, 1)

    def _on_remove(self, key: str, tier: str) -> None:
        super()._on_remove(key, tier)
        self._size.pop((tier, key), None)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        if not self.schedule.active:
            yield from super()._candidates(tier, need_bytes, now)
            return
        dist = self.schedule.distance
        # Farthest next use first, weighted by size (evicting one large object
        # frees the room of several small ones that are each needed sooner);
        # the unknown (inf) in LRU order ahead of all.
        heap = [(-dist(k) * self._size.get((tier, k), 1), i, k) for i, k in enumerate(self._tier(tier))]
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
