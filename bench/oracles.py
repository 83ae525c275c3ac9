"""The prefix policy told one thing about the future: what each is worth on a trace.

OPT (Belady) knows the whole future; tierd's ``prefix`` policy
(tierd/policies/prefix.py) only the past. Each variant here is the same
policy told one thing more, so that the gap between the two can be taken
apart (bench/policies.py runs them on the ``serving`` trace):

* :class:`ToldEnds`: which chains will never be read again (a session after
  its last turn, a one-shot document), not when the others come back;
* :class:`ToldThink`: each session's user's median think time (what
  bench/traces.py drew), in place of the rhythm the policy estimates from a
  block's last read gap. A gap far shorter than the median (a burst of a
  tool loop) is kept: it is the user's own.

A chain's blocks share a key prefix: a block's *owner* is its key up to the
last ``/`` (``kv/u7/b3`` -> ``kv/u7``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from tierd.policies.prefix import PrefixHints, PrefixPolicy, _Block
from tierd.policies.simulator import TraceEvent

__all__ = ["ToldEnds", "ToldThink", "last_reads", "owner"]


def owner(key: str) -> str:
    return key.rpartition("/")[0]


def last_reads(events: Sequence[TraceEvent]) -> dict[str, int]:
    """Per owner, the index of the last event that reads one of its blocks."""
    last: dict[str, int] = {}
    for i, ev in enumerate(events):
        if ev.op == "get":
            last[owner(ev.key)] = i
    return last


class ToldEnds(PrefixPolicy):
    """The prefix policy, told which chains are never read again: their blocks go first."""

    name = "prefix, told ends"

    def __init__(self, hints: PrefixHints, last_read: dict[str, int]) -> None:
        super().__init__(hints)
        self.last_read = last_read
        self.now = 0.0  # the simulator's clock (the event's index): when a chain is over

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        self.now = now
        super()._on_insert(key, tier, nbytes, now)

    def _on_access(self, key: str, tier: str, now: float) -> None:
        self.now = now
        super()._on_access(key, tier, now)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        self.now = now
        return super()._candidates(tier, need_bytes, now)

    def _score(self, key: str, m: list, expert: int) -> float:
        if self.now >= self.last_read.get(owner(key), -1):
            return math.inf
        return super()._score(key, m, expert)


class ToldThink(PrefixPolicy):
    """The prefix policy, told each session's user's median think time (in events)."""

    name = "prefix, told think times"

    def __init__(self, hints: PrefixHints, medians: dict[str, float]) -> None:
        super().__init__(hints)
        self.medians = medians

    def _rhythm(self, key: str, block: _Block) -> float:
        median = self.medians.get(owner(key))
        if median is None or 0 <= block.gap < 0.2 * median:
            return block.gap
        return median
