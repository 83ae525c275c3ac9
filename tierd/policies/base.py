"""The seam for "which object leaves a tier first".

An eviction policy is told what happens to objects and, asked for victims,
answers with candidate keys in the order it would evict them. Policies are
pure bookkeeping: no I/O, no locks of their own, no clock reads (time is
passed in), so the same object runs inside the engine and inside a trace
simulator. The engine calls them under its lock and decides eligibility
(pins, objects being moved or read) itself, skipping candidates it cannot
evict.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

__all__ = ["EvictionPolicy"]


class EvictionPolicy(ABC):
    """Chooses victims among the objects of each tier.

    Note for implementers: ``victims`` is a generator the engine may stop
    early; it must tolerate the engine calling ``on_remove`` / ``on_insert``
    for keys it yielded before the next ``victims`` call, but not during one.
    """

    name: str

    @abstractmethod
    def on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        """``key`` now lives in ``tier`` (a new object, or one just moved there)."""

    @abstractmethod
    def on_access(self, key: str, tier: str, now: float) -> None:
        """``key`` was read from ``tier``."""

    @abstractmethod
    def on_remove(self, key: str, tier: str) -> None:
        """``key`` left ``tier`` (deleted, or moved elsewhere)."""

    @abstractmethod
    def victims(self, tier: str, now: float) -> Iterator[str]:
        """Keys of ``tier``, the best one to evict first."""
