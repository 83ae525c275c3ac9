"""Keys ordered by next use, farthest first, weighted by size: Belady's choice without a sort per victim.

Both OPT (the future known from the trace) and the schedule policy (the future
a learned or declared schedule predicts) evict the key whose next use is
farthest away, times its size: ``(next_use - now) * size``. The next use is
an absolute position (an event index, or the schedule's clock plus the
key's distance), so it does not change while time passes; only the product's
ranking does, between keys of different sizes.

So keys are kept in one heap per distinct size, each ordered by next use
alone. The best victim is the best of the heaps' tops: ``O(sizes + log n)``
per victim instead of ``O(n log n)``. Training and KV traces have few
distinct sizes (block sizes, tensor shapes). Ties (equal products, such as
keys never used again) go to the smaller ``seq``: the caller's insertion or
recency order.

Entries are lazy: setting a key again pushes a new entry and the old one is
skipped when it reaches a top (it no longer matches the key's live entry).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator

__all__ = ["FarthestFirst"]


class FarthestFirst:
    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[float, int, str]]] = {}  # size -> (-next_use, seq, key)
        self._live: dict[str, tuple[float, int, int]] = {}  # key -> (next_use, seq, size)
        self._pushed = 0

    def __len__(self) -> int:
        return len(self._live)

    def __contains__(self, key: str) -> bool:
        return key in self._live

    def set(self, key: str, size: int, next_use: float, seq: int) -> None:
        """Track ``key`` (or update it) with its absolute ``next_use`` (``inf``: never)."""
        size = max(size, 1)
        entry = (next_use, seq, size)
        if self._live.get(key) == entry:
            return
        self._live[key] = entry
        heapq.heappush(self._heaps.setdefault(size, []), (-next_use, seq, key))
        self._pushed += 1
        if self._pushed > 4 * len(self._live) + 64:
            self._compact()

    def get(self, key: str) -> tuple[float, int, int] | None:
        """``(next_use, seq, size)`` of a tracked key."""
        return self._live.get(key)

    def discard(self, key: str) -> None:
        self._live.pop(key, None)

    def _valid(self, entry: tuple[float, int, str], size: int) -> bool:
        live = self._live.get(entry[2])
        return live is not None and live[0] == -entry[0] and live[1] == entry[1] and live[2] == size

    def _compact(self) -> None:
        """Drop the entries that no longer match (each key's last set is its only valid entry)."""
        heaps: dict[int, list[tuple[float, int, str]]] = {}
        for key, (next_use, seq, size) in self._live.items():
            heaps.setdefault(size, []).append((-next_use, seq, key))
        for heap in heaps.values():
            heapq.heapify(heap)
        self._heaps = heaps
        self._pushed = len(self._live)

    def _top(self, size: int) -> tuple[float, int, str] | None:
        heap = self._heaps[size]
        while heap and not self._valid(heap[0], size):
            heapq.heappop(heap)
        return heap[0] if heap else None

    def farthest(self, now: float) -> Iterator[str]:
        """Every key, ``(next_use - now) * size`` largest first (smaller ``seq`` first on ties).

        A generator the caller may stop at any point: what it took off the heaps
        and did not see removed is put back when it ends (or is closed).
        """
        taken: list[tuple[int, tuple[float, int, str]]] = []
        try:
            while True:
                best: tuple[float, int, int, tuple[float, int, str]] | None = None
                for size in list(self._heaps):
                    top = self._top(size)
                    if top is None:
                        del self._heaps[size]
                        continue
                    next_use = -top[0]
                    score = math.inf if next_use == math.inf else (next_use - now) * size
                    if best is None or score > best[0] or (score == best[0] and top[1] < best[1]):
                        best = (score, top[1], size, top)
                if best is None:
                    return
                _, _, size, entry = best
                heapq.heappop(self._heaps[size])
                taken.append((size, entry))
                yield entry[2]
        finally:
            for size, entry in taken:  # still tracked unless removed meanwhile: back on its heap
                if self._valid(entry, size):
                    heapq.heappush(self._heaps.setdefault(size, []), entry)
