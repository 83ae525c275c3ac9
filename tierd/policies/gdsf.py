"""GreedyDual-Size-Frequency: keep what is costly to fetch back per byte, and popular.

Priority ``H = L + frequency * cost / size``, where ``cost`` is the time to
bring the object back from the tier below (:class:`CostModel`, fed with
measured bandwidth and latency): a small object pays the latency for few
bytes, so it is worth more per byte than a large one. The lowest ``H`` goes
first and ``L`` rises to it ("inflation"), so objects that stop being used
age out.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from tierd.policies.base import EvictionPolicy

__all__ = ["GDSFPolicy"]


class GDSFPolicy(EvictionPolicy):
    name = "gdsf"

    def __init__(self) -> None:
        super().__init__()
        self._L: dict[str, float] = {}
        self._h: dict[tuple[str, str], float] = {}
        self._freq: dict[tuple[str, str], int] = {}
        self._size: dict[tuple[str, str], int] = {}
        self._heap: dict[str, list[tuple[float, int, str]]] = {}
        self._seq = 0

    def _priority(self, tier: str, key: str) -> float:
        size = max(self._size[(tier, key)], 1)
        return self._L.get(tier, 0.0) + self._freq[(tier, key)] * self.cost.fetch_s(size) / size

    def _push(self, tier: str, key: str) -> None:
        h = self._priority(tier, key)
        self._h[(tier, key)] = h
        self._seq += 1
        heapq.heappush(self._heap.setdefault(tier, []), (h, self._seq, key))

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        self._size[(tier, key)] = nbytes
        self._freq[(tier, key)] = 1
        self._push(tier, key)

    def _on_access(self, key: str, tier: str, now: float) -> None:
        if (tier, key) in self._freq:
            self._freq[(tier, key)] += 1
            self._push(tier, key)

    def _on_remove(self, key: str, tier: str) -> None:
        for table in (self._h, self._freq, self._size):
            table.pop((tier, key), None)  # heap entries go stale and are skipped

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        heap = self._heap.get(tier, [])
        skipped: list[tuple[float, int, str]] = []
        try:
            while heap:
                entry = heapq.heappop(heap)
                h, _, key = entry
                if self._h.get((tier, key)) != h:
                    continue  # stale
                self._L[tier] = h  # inflation: the next inserts start at the evicted priority
                skipped.append(entry)
                yield key
        finally:
            for entry in skipped:  # still tracked unless removed; keep their entries
                if self._h.get((tier, entry[2])) == entry[0]:
                    heapq.heappush(heap, entry)
        if len(heap) > 4 * max(len(self._h), 16):  # drop stale entries now and then
            self._heap[tier] = [e for e in heap if self._h.get((tier, e[2])) == e[0]]
            heapq.heapify(self._heap[tier])
