"""The ``host`` tier: a shared-memory arena (memfd + mmap) of 4 KiB-aligned extents.

The arena is one memfd, so the daemon can hand it to clients with
SCM_RIGHTS and they map the very same pages; pages are only backed by RAM
once touched. Objects are stored raw (no codec): the host tier is on the
GPU<->host path, where compression costs more than it saves.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from typing import Any

import msgspec
import torch

from tierd._buffers import address_view
from tierd.codecs import Codec
from tierd.errors import ConfigError, MediaError, OutOfSpace
from tierd.tiers.alloc import ExtentAllocator
from tierd.tiers.base import Tier, TierUsage

__all__ = ["HostTier", "HostLocation"]

log = logging.getLogger("tierd.tiers.host")

_MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 4)
SMALL_COPY_BYTES = 256 << 10


class HostLocation(msgspec.Struct, frozen=True, array_like=True):
    """``nbytes`` of payload at ``offset`` of the arena (extent rounded up to 4 KiB)."""

    offset: int
    nbytes: int


class HostTier(Tier):
    """A memfd arena of ``capacity_bytes`` with an extent allocator."""

    name = "host"

    def __init__(self, capacity_bytes: int, *, hugepages: bool = False, block: int = 4096) -> None:
        self._alloc = ExtentAllocator(capacity_bytes, block=block)
        size = max(self._alloc.capacity_bytes, block)
        flags = os.MFD_CLOEXEC | (_MFD_HUGETLB if hugepages else 0)
        try:
            self.fd = os.memfd_create("tierd-host", flags)
        except OSError as exc:
            raise MediaError(f"cannot create the host arena: {exc.strerror}") from exc
        try:
            os.ftruncate(self.fd, size)
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except OSError as exc:
            os.close(self.fd)
            if hugepages:
                raise ConfigError(
                    f"tiers.host.hugepages: a {size >> 20} MiB huge-page arena could not be mapped "
                    f"({exc.strerror}); reserve huge pages (sysctl vm.nr_hugepages=N) or set hugepages = false"
                ) from exc
            raise MediaError(f"cannot map a {size >> 20} MiB host arena: {exc.strerror}") from exc
        # One tensor over the whole arena: slices of it are views, and
        # Tensor.copy_ moves bytes with the GIL released and on several threads.
        self.arena = torch.frombuffer(self._map, dtype=torch.uint8)
        self._view = memoryview(self._map)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def capacity_bytes(self) -> int:
        return self._alloc.capacity_bytes

    def usage(self) -> TierUsage:
        with self._lock:
            st = self._alloc.stats()
        return TierUsage(st.capacity_bytes, st.used_bytes, st.largest_free_bytes, st.fragmentation)

    @property
    def used_bytes(self) -> int:
        """Bytes in allocated extents (cheap: the watermark check reads it on every put)."""
        return self._alloc.used_bytes

    def alloc(self, nbytes: int) -> HostLocation | None:
        """Reserve an extent for ``nbytes``; None when no free extent is large enough."""
        with self._lock:
            offset = self._alloc.alloc(nbytes)
        return None if offset is None else HostLocation(offset, nbytes)

    def view(self, location: HostLocation) -> torch.Tensor:
        """The payload bytes at ``location``, as a uint8 tensor aliasing the arena."""
        return self.arena[location.offset : location.offset + location.nbytes]

    def extent_view(self, location: HostLocation) -> torch.Tensor:
        """The whole extent (payload rounded up to the block size)."""
        size = -(-max(location.nbytes, 1) // self._alloc.block) * self._alloc.block
        return self.arena[location.offset : location.offset + size]

    def copy_in(self, location: HostLocation, src: torch.Tensor | memoryview) -> None:
        """Copy ``src`` (flat bytes) into the extent at ``location``."""
        n = location.nbytes
        if isinstance(src, memoryview):
            self._view[location.offset : location.offset + n] = src
        elif n < SMALL_COPY_BYTES and src.device.type == "cpu":
            # Small: a memoryview copy costs ~1 µs; a torch op ~10 µs of dispatch.
            self._view[location.offset : location.offset + n] = address_view(src.data_ptr(), n)
        else:
            self.view(location).copy_(src)  # large: GIL released, several threads

    def copy_out(self, location: HostLocation, dest: torch.Tensor | memoryview) -> None:
        """Copy the payload at ``location`` into ``dest`` (flat bytes of the same length)."""
        n = location.nbytes
        if isinstance(dest, memoryview):
            dest[:] = self._view[location.offset : location.offset + n]
        elif n < SMALL_COPY_BYTES and dest.device.type == "cpu":
            address_view(dest.data_ptr(), n)[:] = self._view[location.offset : location.offset + n]
        else:
            dest.copy_(self.view(location))

    def write(self, src: torch.Tensor, *, codec: Codec, itemsize: int, durable: bool) -> HostLocation:
        location = self.alloc(src.numel())
        if location is None:
            raise OutOfSpace(f"host tier has no free extent of {src.numel()} bytes")
        self.copy_in(location, src)
        return location

    def read_into(self, location: HostLocation, dest: torch.Tensor, *, itemsize: int) -> None:
        self.copy_out(location, dest)

    def free(self, location: HostLocation) -> None:
        with self._lock:
            self._alloc.free(location.offset)

    def stored_nbytes(self, location: Any) -> int:
        return int(location.nbytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        del self.arena
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # A tensor handed out earlier still aliases the arena; the mapping
            # goes when the last such tensor is collected.
            log.debug("host arena still referenced at close; unmapped later")
        os.close(self.fd)
