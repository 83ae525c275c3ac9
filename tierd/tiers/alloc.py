"""Extent allocator: aligned extents of one address range, kept unfragmented.

The design is TLSF's (two-level segregated fit, Masmano et al. 2004), in
units of blocks (4 KiB by default):

* free extents sit in segregated lists, one list per size class; a class is a
  power of two split into ``2**SL_BITS`` linear sub-classes, so sizes within
  one class differ by at most 1/16 (bounded internal waste of a good fit);
* two bitmaps (first level, and second level per first level) say which lists
  are non-empty, so finding a list with a block that surely fits is O(1);
* every free extent is indexed by its start and by its end, so a freed extent
  merges with both neighbours at once (immediate coalescing): when everything
  is freed the range is one extent again.

Not thread-safe: the owning tier serialises calls under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExtentAllocator", "AllocatorStats"]

SL_BITS = 4
SL_COUNT = 1 << SL_BITS


def _mapping(nblocks: int) -> tuple[int, int]:
    """Size class (first level, second level) whose lists hold ``nblocks``."""
    if nblocks < SL_COUNT:
        return 0, nblocks
    fl = nblocks.bit_length() - 1
    sl = (nblocks >> (fl - SL_BITS)) & (SL_COUNT - 1)
    return fl - SL_BITS + 1, sl



@dataclass(frozen=True, slots=True)
class AllocatorStats:
    """A snapshot of an allocator.

    Attributes:
        capacity_bytes: size of the managed range.
        used_bytes: bytes inside allocated extents.
        free_bytes: ``capacity_bytes - used_bytes``.
        largest_free_bytes: the largest single allocation that would succeed.
        free_extents: number of free extents.
        fragmentation: ``1 - largest_free / free`` (0 = all free space is one
            extent, towards 1 = free space is scattered crumbs).
    """

    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    largest_free_bytes: int
    free_extents: int
    fragmentation: float


class ExtentAllocator:
    """Allocates ``block``-aligned extents of ``[0, capacity_bytes)``.

    Offsets and lengths given and returned are in bytes; lengths are rounded
    up to whole blocks.
    """

    def __init__(self, capacity_bytes: int, *, block: int = 4096) -> None:
        if block <= 0 or block & (block - 1):
            raise ValueError(f"block must be a power of two, got {block}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity_bytes}")
        self.block = block
        self._nblocks = capacity_bytes // block
        self.capacity_bytes = self._nblocks * block
        self._by_start: dict[int, int] = {}  # free extent start -> length (blocks)
        self._by_end: dict[int, int] = {}  # free extent end (exclusive) -> start
        self._lists: dict[tuple[int, int], dict[int, None]] = {}  # class -> starts
        self._fl_bitmap = 0
        self._sl_bitmap: dict[int, int] = {}
        self._allocated: dict[int, int] = {}  # allocated start -> length (blocks)
        self._used_blocks = 0
        if self._nblocks:
            self._insert(0, self._nblocks)

    # -- free-list bookkeeping -------------------------------------------------

    def _insert(self, start: int, length: int) -> None:
        self._by_start[start] = length
        self._by_end[start + length] = start
        cls = _mapping(length)
        bucket = self._lists.get(cls)
        if bucket is None:
            bucket = self._lists[cls] = {}
        bucket[start] = None
        fl, sl = cls
        self._fl_bitmap |= 1 << fl
        self._sl_bitmap[fl] = self._sl_bitmap.get(fl, 0) | (1 << sl)

    def _remove(self, start: int) -> int:
        length = self._by_start.pop(start)
        del self._by_end[start + length]
        cls = _mapping(length)
        bucket = self._lists[cls]
        del bucket[start]
        if not bucket:
            del self._lists[cls]
            fl, sl = cls
            remaining = self._sl_bitmap[fl] & ~(1 << sl)
            self._sl_bitmap[fl] = remaining
            if not remaining:
                self._fl_bitmap &= ~(1 << fl)
        return length

    def _find(self, nblocks: int) -> int | None:
        """Start of a free extent of at least ``nblocks``, or None."""
        fl, sl = _mapping(nblocks)
        # The request's own class may hold extents both smaller and larger
        # than the request: look at a few (good fit without a full scan).
        bucket = self._lists.get((fl, sl))
        if bucket:
            for checked, start in enumerate(bucket):
                if self._by_start[start] >= nblocks:
                    return start
                if checked >= 8:
                    break
        # Any extent of a higher class fits.
        sl_map = self._sl_bitmap.get(fl, 0) & (~0 << (sl + 1))
        if not sl_map:
            fl_map = self._fl_bitmap & (~0 << (fl + 1))
            if not fl_map:
                return None
            fl = (fl_map & -fl_map).bit_length() - 1
            sl_map = self._sl_bitmap[fl]
        sl = (sl_map & -sl_map).bit_length() - 1
        return next(iter(self._lists[(fl, sl)]))

    # -- public ----------------------------------------------------------------

    def blocks_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.block))

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a new extent of ``nbytes`` (rounded up), or None if none fits."""
        need = self.blocks_for(nbytes)
        start = self._find(need)
        if start is None:
            return None
        length = self._remove(start)
        if length > need:
            self._insert(start + need, length - need)
        self._allocated[start] = need
        self._used_blocks += need
        return start * self.block

    def reserve(self, offset: int, nbytes: int) -> None:
        """Mark ``[offset, offset + nbytes)`` allocated (used when reopening).

        Raises:
            ValueError: the range is not entirely free.
        """
        if offset % self.block:
            raise ValueError(f"offset {offset} is not aligned to {self.block}")
        start, need = offset // self.block, self.blocks_for(nbytes)
        # Find the free extent containing start: walk the by_start index only
        # when the fast path (an extent starting exactly there) misses.
        host = start if start in self._by_start else None
        if host is None:
            for s, n in self._by_start.items():
                if s <= start < s + n:
                    host = s
                    break
        if host is None or start + need > host + self._by_start[host]:
            raise ValueError(f"extent [{offset}, +{nbytes}) is not free")
        length = self._remove(host)
        if start > host:
            self._insert(host, start - host)
        tail = host + length - (start + need)
        if tail:
            self._insert(start + need, tail)
        self._allocated[start] = need
        self._used_blocks += need

    def free(self, offset: int) -> int:
        """Free the extent at ``offset``; return its length in bytes.

        Raises:
            ValueError: ``offset`` is not the start of an allocated extent.
        """
        start = offset // self.block
        length = self._allocated.pop(start, None)
        if length is None or offset % self.block:
            raise ValueError(f"no allocated extent starts at offset {offset}")
        self._used_blocks -= length
        freed = length
        end = start + length
        right = self._by_start.get(end)
        if right is not None:
            length += self._remove(end)
        left = self._by_end.get(start)
        if left is not None:
            length += self._remove(left)
            start = left
        self._insert(start, length)
        return freed * self.block

    def extent_bytes(self, offset: int) -> int:
        """Length in bytes of the allocated extent starting at ``offset``."""
        return self._allocated[offset // self.block] * self.block

    def largest_free_bytes(self) -> int:
        if not self._fl_bitmap:
            return 0
        fl = self._fl_bitmap.bit_length() - 1
        sl = self._sl_bitmap[fl].bit_length() - 1
        return max(self._by_start[s] for s in self._lists[(fl, sl)]) * self.block

    @property
    def used_bytes(self) -> int:
        return self._used_blocks * self.block

    @property
    def free_bytes(self) -> int:
        return self.capacity_bytes - self.used_bytes

    def free_extents(self) -> list[tuple[int, int]]:
        """Free extents as sorted ``(offset, nbytes)`` pairs (for tests and tools)."""
        return sorted((s * self.block, n * self.block) for s, n in self._by_start.items())

    def allocated_extents(self) -> list[tuple[int, int]]:
        return sorted((s * self.block, n * self.block) for s, n in self._allocated.items())

    def stats(self) -> AllocatorStats:
        free = self.free_bytes
        largest = self.largest_free_bytes()
        return AllocatorStats(
            capacity_bytes=self.capacity_bytes,
            used_bytes=self.used_bytes,
            free_bytes=free,
            largest_free_bytes=largest,
            free_extents=len(self._by_start),
            fragmentation=0.0 if free == 0 else 1.0 - largest / free,
        )
