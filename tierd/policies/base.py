"""The seams for "which object leaves a tier" and "which one comes up early".

Policies are pure bookkeeping: no I/O, no locks of their own, no clock reads
(``now`` is passed in), so the same objects run inside the engine and inside
the trace simulator (:mod:`tierd.policies.simulator`). The engine calls
them under its lock.

Pins and TTLs are honoured by every eviction policy because the base class
owns them: :meth:`EvictionPolicy.victims` yields expired objects first, never
yields a pinned one, and only then asks the subclass's ``_candidates``.
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence

__all__ = ["EvictionPolicy", "PrefetchPolicy", "AdmissionPolicy", "AdmitAll", "SizeAdmission", "CostModel"]


class CostModel:
    """What it costs to bring bytes back from below a tier: ``latency_s + nbytes / bytes_per_s``.

    The engine feeds it measured figures; the simulator, the ones it was given.
    """

    def __init__(self, latency_s: float = 100e-6, bytes_per_s: float = 2e9) -> None:
        self.latency_s = latency_s
        self.bytes_per_s = bytes_per_s

    def fetch_s(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


class EvictionPolicy(ABC):
    """Chooses victims among the objects of each tier.

    Note for implementers: implement the ``_on_*`` hooks and ``_candidates``.
    ``victims`` is a generator the caller may stop at any point; between two
    calls the caller may insert or remove keys, but not while iterating.
    Candidates the caller skips (an object being read, say) stay tracked.
    """

    name: str = ""

    def __init__(self) -> None:
        self._pinned: set[tuple[str, str]] = set()
        self._expires: dict[tuple[str, str], float] = {}
        self._deadlines: dict[str, list[tuple[float, str]]] = {}  # tier -> heap of (expires_at, key), lazy
        self.cost = CostModel()

    # -- what callers use ------------------------------------------------------

    def on_insert(self, key: str, tier: str, nbytes: int, now: float, *, pinned: bool = False,
                  expires_at: float | None = None) -> None:
        """``key`` now lives in ``tier`` (a new object, or one just moved there)."""
        if pinned:
            self._pinned.add((tier, key))
        if expires_at is not None:
            self._expires[(tier, key)] = expires_at
            heapq.heappush(self._deadlines.setdefault(tier, []), (expires_at, key))
        self._on_insert(key, tier, nbytes, now)

    def on_access(self, key: str, tier: str, now: float) -> None:
        """``key`` was read (or rewritten) in ``tier``."""
        self._on_access(key, tier, now)

    def on_remove(self, key: str, tier: str) -> None:
        """``key`` left ``tier`` (deleted, or moved elsewhere)."""
        self._pinned.discard((tier, key))
        self._expires.pop((tier, key), None)
        self._on_remove(key, tier)

    def victims(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        """Keys of ``tier`` in the order to evict them until ``need_bytes`` are free.

        Expired objects come first (from a heap of deadlines: no scan of every object); pinned
        ones never come; none comes twice.
        """
        offered: set[str] = set()
        heap = self._deadlines.get(tier, [])
        due: list[tuple[float, str]] = []
        try:
            while heap and heap[0][0] <= now:
                at, key = heapq.heappop(heap)
                if self._expires.get((tier, key)) != at or key in offered:
                    continue  # removed, or its TTL changed since: a stale entry
                due.append((at, key))
                offered.add(key)
                yield key
        finally:  # what the caller did not remove stays due
            for at, key in due:
                if self._expires.get((tier, key)) == at:
                    heapq.heappush(heap, (at, key))
        if len(heap) > 2 * len(self._expires) + 64:  # drop stale entries now and then
            self._deadlines[tier] = [(at, k) for at, k in heap if self._expires.get((tier, k)) == at]
            heapq.heapify(self._deadlines[tier])
        for key in self._candidates(tier, need_bytes, now):
            if (tier, key) not in self._pinned and key not in offered:
                offered.add(key)
                yield key

    # -- what subclasses implement -----------------------------------------------

    @abstractmethod
    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None: ...

    @abstractmethod
    def _on_access(self, key: str, tier: str, now: float) -> None: ...

    @abstractmethod
    def _on_remove(self, key: str, tier: str) -> None: ...

    @abstractmethod
    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        """Every key of ``tier``, best victim first (pins and TTLs are handled by the caller)."""

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:  # noqa: B027 - optional
        """A caller's promise about the coming access order; policies that plan use it."""


class PrefetchPolicy(ABC):
    """Answers, after each access, which keys to bring up early and to which tier."""

    name: str = ""

    @abstractmethod
    def on_access(self, key: str, now: float) -> list[str]:
        """``key`` was accessed; the keys to prefetch now (to the host tier), best first."""

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:  # noqa: B027 - optional
        """A declared access order (see :meth:`EvictionPolicy.declare_schedule`)."""


class AdmissionPolicy(ABC):
    """Optionally refuses to place an object in a tier (it goes one tier down)."""

    @abstractmethod
    def admit(self, key: str, tier: str, nbytes: int, now: float) -> bool:
        """Whether ``key`` (``nbytes``) may be placed in ``tier``."""

    def table(self) -> list[dict[str, object]]:
        """What it learned, a row per class of object, for ``tierd status``; none by default."""
        return []


class AdmitAll(AdmissionPolicy):
    def admit(self, key: str, tier: str, nbytes: int, now: float) -> bool:
        return True


class SizeAdmission(AdmissionPolicy):
    """Keeps objects larger than ``max_bytes`` out of the host tier, so one huge
    tensor does not flush everything else; they go straight to nvme. The rest
    are asked of ``then`` (admit all by default)."""

    def __init__(self, max_bytes: int, then: AdmissionPolicy | None = None) -> None:
        self.max_bytes = max_bytes
        self.then = then or AdmitAll()

    def admit(self, key: str, tier: str, nbytes: int, now: float) -> bool:
        if tier == "host" and nbytes > self.max_bytes:
            return False
        return self.then.admit(key, tier, nbytes, now)

    def table(self) -> list[dict[str, object]]:
        return self.then.table()
