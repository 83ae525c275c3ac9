"""Records the store returns: :class:`ObjectInfo`, :class:`TierStats`, :class:`Stats`.

They are msgspec Structs so that the daemon can send them over the wire as they are.
"""

from __future__ import annotations

import msgspec

__all__ = ["ObjectInfo", "TierStats", "Stats"]


class ObjectInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the store knows of one object.

    Attributes:
        key: ``namespace/name``.
        tier: the fastest tier holding the object (``"host"``, ``"cxl"``, ``"nvme"`` or ``"remote"``).
        nbytes: size of the value's bytes (``numel * itemsize`` for tensors).
        stored_nbytes: bytes of its nvme copy after the codec, if it has one; else ``nbytes``.
        dtype: torch dtype name (``"bfloat16"``), or ``"bytes"`` for raw bytes.
        shape: tensor shape (``()`` for 0-d; ``(nbytes,)`` for raw bytes).
        codec: codec used on tiers that compress (nvme).
        durable: fsync'ed to nvme and kept across restarts.
        pinned: never evicted from its tier.
        tiers: every tier holding a copy (a durable object cached on host is on both).
        expires_at: UNIX time after which it is gone, or None.
    """

    key: str
    tier: str
    nbytes: int
    stored_nbytes: int
    dtype: str
    shape: tuple[int, ...]
    codec: str
    durable: bool
    pinned: bool
    tiers: tuple[str, ...] = ()
    expires_at: float | None = None


class TierStats(msgspec.Struct, frozen=True, kw_only=True):
    """Counters of one tier since the store opened.

    Attributes:
        capacity_bytes / used_bytes: space (used counts whole 4 KiB blocks).
        objects: objects with a copy on this tier.
        hits / misses: gets served from / not found on this tier.
        bytes_in / bytes_out: payload bytes written to / read from the tier
            (puts, promotions and demotions included).
        promoted_bytes / demoted_bytes: bytes moved up into / down into this tier.
        largest_free_bytes: the largest object that fits without eviction.
        fragmentation: ``1 - largest_free / free`` of the tier's free space.
        evicted / evicted_bytes: objects of cache namespaces dropped from this tier to make room
            (a later get of one is a miss), and their bytes.
    """

    name: str
    capacity_bytes: int
    used_bytes: int
    objects: int
    hits: int
    misses: int
    bytes_in: int
    bytes_out: int
    promoted_bytes: int
    demoted_bytes: int
    largest_free_bytes: int
    fragmentation: float
    evicted: int = 0
    evicted_bytes: int = 0


class Stats(msgspec.Struct, frozen=True, kw_only=True):
    """Per-tier statistics; ``stats["host"]`` or ``stats.tiers["host"]``."""

    tiers: dict[str, TierStats]
    objects: int

    def __getitem__(self, tier: str) -> TierStats:
        return self.tiers[tier]
