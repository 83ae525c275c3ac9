"""S3-FIFO (Yang et al., SOSP 2023): a small probationary FIFO, a main FIFO, a ghost list.

New objects enter the small queue (10 % of the tier's bytes); one that is
read again before it reaches the head moves to the main queue, one that is
not leaves (and its key is remembered in the ghost list, so that if it comes
back it goes straight to main). The main queue is a FIFO with a small
frequency counter: reinsertion instead of eviction while the counter lasts.
Quick demotion of one-hit wonders is what beats LRU on skewed workloads.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from tierd.policies.base import EvictionPolicy

__all__ = ["S3FIFOPolicy"]


class _TierQueues:
    def __init__(self) -> None:
        self.small: OrderedDict[str, None] = OrderedDict()
        self.main: OrderedDict[str, None] = OrderedDict()
        self.ghost: OrderedDict[str, None] = OrderedDict()
        self.size: dict[str, int] = {}
        self.freq: dict[str, int] = {}
        self.small_bytes = 0
        self.total_bytes = 0


class S3FIFOPolicy(EvictionPolicy):
    name = "s3fifo"

    def __init__(self, *, small_fraction: float = 0.1) -> None:
        super().__init__()
        self.small_fraction = small_fraction
        self._tiers: dict[str, _TierQueues] = {}

    def _q(self, tier: str) -> _TierQueues:
        q = self._tiers.get(tier)
        if q is None:
            q = self._tiers[tier] = _TierQueues()
        return q

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        q = self._q(tier)
        q.size[key] = nbytes
        q.freq[key] = 0
        q.total_bytes += nbytes
        if key in q.ghost:
            del q.ghost[key]
            q.main[key] = None
        else:
            q.small[key] = None
            q.small_bytes += nbytes

    def _on_access(self, key: str, tier: str, now: float) -> None:
        q = self._q(tier)
        if key in q.freq:
            q.freq[key] = min(q.freq[key] + 1, 3)

    def _on_remove(self, key: str, tier: str) -> None:
        q = self._q(tier)
        nbytes = q.size.pop(key, 0)
        freq = q.freq.pop(key, 0)
        q.total_bytes -= nbytes
        if key in q.small:
            del q.small[key]
            q.small_bytes -= nbytes
            if freq == 0:  # a one-hit wonder: remember it
                q.ghost[key] = None
                while len(q.ghost) > max(16, len(q.main) + len(q.small)):
                    q.ghost.popitem(last=False)
        else:
            q.main.pop(key, None)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        q = self._q(tier)
        offered: set[str] = set()
        # Each key is looked at a bounded number of times (freq <= 3), and
        # offered at most once; a key the caller skips goes to the tail.
        budget = 5 * (len(q.small) + len(q.main)) + 1
        while budget > 0 and (q.small or q.main):
            budget -= 1
            from_small = bool(q.small) and (q.small_bytes > self.small_fraction * q.total_bytes or not q.main)
            queue = q.small if from_small else q.main
            key = next(iter(queue))
            if key in offered:
                break  # went all the way round
            if q.freq[key] > 0:
                if from_small:  # read while on probation: promote to main
                    del q.small[key]
                    q.small_bytes -= q.size[key]
                    q.main[key] = None
                    q.freq[key] = 0
                else:
                    q.freq[key] -= 1
                    q.main.move_to_end(key)
                continue
            offered.add(key)
            yield key
            if key in queue:
                queue.move_to_end(key)
        # Whatever the loop did not reach is still a candidate, worst last.
        for key in [*q.small, *q.main]:
            if key not in offered:
                offered.add(key)
                yield key
