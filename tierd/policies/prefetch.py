"""Prefetch policies without a learned schedule: ``none`` and ``sequential``."""

from __future__ import annotations

from collections.abc import Sequence

from tierd.policies.base import PrefetchPolicy

__all__ = ["NoPrefetch", "SequentialPrefetch"]


class NoPrefetch(PrefetchPolicy):
    name = "none"

    def on_access(self, key: str, now: float) -> list[str]:
        return []


class SequentialPrefetch(PrefetchPolicy):
    """After ``seq[i]`` comes ``seq[i+1 .. i+depth]`` of a declared sequence."""

    name = "sequential"

    def __init__(self, *, depth: int = 2) -> None:
        self.depth = depth
        self._seq: list[str] = []
        self._index: dict[str, int] = {}
        self._cyclic = False

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self._seq = list(keys)
        self._index = {k: i for i, k in enumerate(self._seq)}
        self._cyclic = cyclic

    def on_access(self, key: str, now: float) -> list[str]:
        i = self._index.get(key)
        if i is None:
            return []
        n = len(self._seq)
        if self._cyclic:
            return [self._seq[(i + j) % n] for j in range(1, min(self.depth, n - 1) + 1)]
        return self._seq[i + 1 : i + 1 + self.depth]
