"""The ``host`` tier: a shared-memory arena (memfd + mmap) of 4 KiB-aligned extents.

The arena is one memfd, so the daemon can hand it to clients with
SCM_RIGHTS and they map the very same pages; pages are only backed by RAM
once touched. Objects are stored raw (no codec): the host tier is on the
GPU<->host path, where compression costs more than it saves.

:class:`ArenaTier` is the part that does not care what backs the arena (an
extent allocator over one shared mapping, and the copies in and out); the
``cxl`` tier (:mod:`tierd.tiers.cxl`) is the same class over a memfd bound
to other NUMA nodes, or over a devdax device.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from tierd._buffers import SMALL_COPY_BYTES, address_view, copy_bytes, view_address
from tierd.codecs import Codec
from tierd.errors import ConfigError, MediaError, OutOfSpace
from tierd.tiers.alloc import ExtentAllocator
from tierd.tiers.base import Tier, TierUsage
from tierd.tiers.numa import MappingPlacement, bind_memory, mapping_placement

__all__ = ["ArenaTier", "HostTier", "HostLocation", "memfd_arena"]

log = logging.getLogger("tierd.tiers.host")

_MFD_HUGETLB = getattr(os, "MFD_HUGETLB", 4)


class HostLocation(msgspec.Struct, frozen=True, array_like=True):
    """``nbytes`` of payload at ``offset`` of the arena (extent rounded up to 4 KiB)."""

    offset: int
    nbytes: int


def memfd_arena(
    name: str, size: int, *, hugepages: bool = False, nodes: Sequence[int] = (), prefault: bool = False,
    key: str, node_key: str = "numa_node",
) -> tuple[int, mmap.mmap]:
    """A memfd of ``size`` bytes and a shared mapping of it: the backing of an arena tier.

    Args:
        name: the memfd's name (what ``numa_maps`` and ``/proc/PID/maps`` show).
        hugepages: ``MFD_HUGETLB``.
        nodes: NUMA nodes to bind the memory to (``mbind(MPOL_BIND)``) before
            any page exists; empty: the process's policy (Note [binding a memfd]
            in tierd/tiers/numa.py).
        prefault: allocate every page now (``fallocate``, which follows the
            binding), so that a node without room fails here, not on first use.
        key: the config section the settings came from, and ``node_key`` the
            key of ``nodes`` in it: errors name them.

    Raises:
        ConfigError: huge pages, binding or prefault impossible with these settings.
        MediaError: no memfd or no mapping.
    """
    flags = os.MFD_CLOEXEC | (_MFD_HUGETLB if hugepages else 0)
    try:
        fd = os.memfd_create(name, flags)
    except OSError as exc:
        raise MediaError(f"cannot create the {name} arena: {exc.strerror}") from exc
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except OSError as exc:
        os.close(fd)
        if hugepages:
            raise ConfigError(
                f"{key}.hugepages: a {size >> 20} MiB huge-page arena could not be mapped "
                f"({exc.strerror}); reserve huge pages (sysctl vm.nr_hugepages=N) or set hugepages = false"
            ) from exc
        raise MediaError(f"cannot map a {size >> 20} MiB {name} arena: {exc.strerror}") from exc
    step, culprit = "bound to", node_key
    try:
        if nodes:
            with memoryview(mapping) as whole:
                address = view_address(whole)
            bind_memory(address, size, nodes)
        if prefault:
            step, culprit = "reserved on", "size"
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        mapping.close()
        os.close(fd)
        where = f"NUMA node(s) {list(nodes)}" if nodes else "this machine"
        raise ConfigError(
            f"{key}.{culprit}: a {size >> 20} MiB arena could not be {step} {where} ({exc.strerror}); "
            "check the nodes and their free memory with `tierd doctor` or `numactl -H`"
        ) from exc
    return fd, mapping


class ArenaTier(Tier):
    """An extent allocator over one shared mapping, whatever backs it.

    The tier owns ``fd`` and ``mapping`` (closed by :meth:`close`). Locations
    are :class:`HostLocation` (an offset in the arena), for every arena tier.
    """

    def __init__(self, fd: int, mapping: mmap.mmap, capacity_bytes: int, *, block: int = 4096) -> None:
        self._alloc = ExtentAllocator(min(capacity_bytes, len(mapping)), block=block)
        self.fd = fd
        self._map = mapping
        # One tensor over the whole arena: slices of it are views, and
        # Tensor.copy_ moves bytes with the GIL released and on several threads.
        self.arena = torch.frombuffer(self._map, dtype=torch.uint8)
        self._view = memoryview(self._map)
        self._lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> int:
        """Address of the arena's first byte in this process."""
        return int(self.arena.data_ptr())

    def placement(self) -> MappingPlacement | None:
        """On which NUMA nodes the arena's pages touched by this process are (``/proc/self/numa_maps``)."""
        return mapping_placement(self.address)

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

    def alloc_many(self, sizes: list[int]) -> list[HostLocation | None]:
        """:meth:`alloc` of each size under one lock (None for each that does not fit now)."""
        out: list[HostLocation | None] = []
        with self._lock:
            alloc = self._alloc.alloc
            for nbytes in sizes:
                offset = alloc(nbytes)
                out.append(None if offset is None else HostLocation(offset, nbytes))
        return out

    def view(self, location: HostLocation) -> torch.Tensor:
        """The payload bytes at ``location``, as a uint8 tensor aliasing the arena."""
        return self.arena[location.offset : location.offset + location.nbytes]

    def copy_in(self, location: HostLocation, src: torch.Tensor | memoryview) -> None:
        """Copy ``src`` (flat bytes) into the extent at ``location``."""
        n = location.nbytes
        if isinstance(src, memoryview):
            self._view[location.offset : location.offset + n] = src
        elif n < SMALL_COPY_BYTES and src.device.type == "cpu":  # no torch view: ~1 µs instead of ~5
            self._view[location.offset : location.offset + n] = address_view(src.data_ptr(), n)
        else:
            copy_bytes(self.view(location), src)

    def read_bytes(self, location: HostLocation, *, mutable: bool = False) -> bytes | bytearray:
        """The payload at ``location`` as a new bytes object (a bytearray if ``mutable``): one copy."""
        view = self._view[location.offset : location.offset + location.nbytes]
        return bytearray(view) if mutable else bytes(view)

    def copy_out(self, location: HostLocation, dest: torch.Tensor | memoryview) -> None:
        """Copy the payload at ``location`` into ``dest`` (flat bytes of the same length)."""
        n = location.nbytes
        if isinstance(dest, memoryview):
            dest[:] = self._view[location.offset : location.offset + n]
        elif n < SMALL_COPY_BYTES and dest.device.type == "cpu":
            address_view(dest.data_ptr(), n)[:] = self._view[location.offset : location.offset + n]
        else:
            copy_bytes(dest, self.view(location))

    def write(self, src: torch.Tensor, *, codec: Codec, itemsize: int, durable: bool) -> HostLocation:
        location = self.alloc(src.numel())
        if location is None:
            raise OutOfSpace(f"{self.name} tier has no free extent of {src.numel()} bytes")
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
            log.debug("%s arena still referenced at close; unmapped later", self.name)
        os.close(self.fd)


class HostTier(ArenaTier):
    """A memfd arena of ``capacity_bytes`` with an extent allocator.

    ``numa_node``: bind the arena to that node (``[tiers.host] numa_node``);
    pages are still allocated on first touch, there.
    """

    name = "host"

    def __init__(self, capacity_bytes: int, *, hugepages: bool = False, numa_node: int | None = None,
                 block: int = 4096) -> None:
        size = max(capacity_bytes - capacity_bytes % block, block)
        nodes = () if numa_node is None else (numa_node,)
        fd, mapping = memfd_arena("tierd-host", size, hugepages=hugepages, nodes=nodes, key="tiers.host")
        super().__init__(fd, mapping, capacity_bytes, block=block)
