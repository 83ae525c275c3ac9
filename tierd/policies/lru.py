"""Least recently used: evict the object untouched for the longest time."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from tierd.policies.base import EvictionPolicy

__all__ = ["LRUPolicy"]


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        super().__init__()
        self._order: dict[str, OrderedDict[str, None]] = {}

    def _tier(self, tier: str) -> OrderedDict[str, None]:
        order = self._order.get(tier)
        if order is None:
            order = self._order[tier] = OrderedDict()
        return order

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        order = self._tier(tier)
        order[key] = None
        order.move_to_end(key)

    def _on_access(self, key: str, tier: str, now: float) -> None:
        order = self._tier(tier)
        if key in order:
            order.move_to_end(key)

    def _on_remove(self, key: str, tier: str) -> None:
        self._tier(tier).pop(key, None)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        # A live iterator, not a copy: callers stop it before changing anything.
        yield from self._tier(tier)
