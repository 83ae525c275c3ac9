"""Raw-memory helpers shared by the tiers: views on addresses, aligned buffers."""

from __future__ import annotations

import ctypes
import mmap

import torch

__all__ = ["address_view", "aligned_buffer", "tensor_bytes", "view_address"]


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
