"""Raw-memory helpers shared by the tiers: views on addresses, aligned buffers."""

from __future__ import annotations

import ctypes
import mmap

import numpy as np
import torch

__all__ = ["address_view", "aligned_buffer", "copy_bytes", "tensor_bytes", "view_address", "writable_tensor"]


def address_view(address: int, nbytes: int) -> memoryview:
    """A writable byte memoryview of ``nbytes`` at ``address``.

    The caller keeps the memory alive for as long as the view is used.
    """
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def view_address(view: memoryview) -> int:
    """Address of the first byte of a writable, contiguous memoryview."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """Anonymous, page-aligned memory (what O_DIRECT needs), zero-filled."""
    return mmap.mmap(-1, max(nbytes, mmap.PAGESIZE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def tensor_bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous CPU tensor (any dtype, any shape, 0-d too)."""
    return t.reshape(-1).view(torch.uint8)


def writable_tensor(view: memoryview) -> torch.Tensor:
    """A flat uint8 tensor over a writable byte memoryview, or over a copy of a read-only one."""
    if view.readonly:
        view = memoryview(bytearray(view))
    return torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)


SMALL_COPY_BYTES = 256 << 10
PARALLEL_COPY_BYTES = 4 << 20


def copy_bytes(dest: torch.Tensor, src: torch.Tensor) -> None:
    """Copy flat uint8 ``src`` into ``dest`` (same length), the fastest way for the size.

    Below 256 KiB a memoryview copy (~1 µs; a torch op costs ~10 µs of
    dispatch). Below 4 MiB one thread with the GIL released (np.copyto): as
    fast as torch's parallel copy there on free cores, and it does not stall
    on busy ones, where torch's OpenMP threads wait for a time slice. From
    4 MiB torch's multi-threaded copy, faster on free cores, at the price of
    that stall on busy ones (``python bench/copies.py`` on 2 cores: 4 MiB
    p50 106 against 126 µs idle; with 2 busy processes p90 8.0 ms against
    0.2 ms). Device tensors always go through torch.
    """
    n = src.numel()
    if dest.device.type != "cpu" or src.device.type != "cpu" or n >= PARALLEL_COPY_BYTES:
        dest.copy_(src)
    elif n < SMALL_COPY_BYTES:
        address_view(dest.data_ptr(), n)[:] = address_view(src.data_ptr(), n)
    else:
        np.copyto(dest.numpy(), src.numpy())
