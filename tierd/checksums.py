"""Checksums of stored bytes: one module for the nvme and remote tiers and for checkpoints.

Two kinds, recorded beside each chunk so a reader knows which to verify:

* ``XXH3`` (xxh3-64) of bytes the CPU holds anyway: what nvme and remote
  chunks carry, and (as hex) what checkpoint manifests carry per tensor.
* ``DEVICE``: :func:`device_checksum`, computed with torch where the data is,
  for chunks that go between a GPU and a file by GPUDirect Storage without
  passing the CPU (Note [GPUDirect Storage] in tiers/nvme.py).
"""

from __future__ import annotations

import torch
import xxhash

from tierd._buffers import address_view

__all__ = ["DEVICE", "XXH3", "checksum", "device_checksum", "xxh3", "xxh3_hex"]

XXH3 = 0
DEVICE = 1

_MASK = 0xFFFFFFFFFFFFFFFF


def _bytes(data: torch.Tensor | memoryview | bytes) -> memoryview | bytes:
    if isinstance(data, torch.Tensor):  # flat uint8 in host memory: hashed in place
        return address_view(data.data_ptr(), data.numel())
    return data


def xxh3(data: torch.Tensor | memoryview | bytes) -> int:
    """xxh3-64 of ``data`` (bytes, or a flat uint8 host tensor, hashed in place)."""
    return xxhash.xxh3_64_intdigest(_bytes(data))


def xxh3_hex(data: torch.Tensor | memoryview | bytes) -> str:
    """:func:`xxh3` as 16 hex digits (the form checkpoint manifests keep)."""
    return xxhash.xxh3_64_hexdigest(_bytes(data))


def device_checksum(data: torch.Tensor) -> int:
    """A 64-bit checksum of flat uint8 ``data``, computed where the data is (GPU or CPU).

    Used for nvme chunks read or written through GPUDirect Storage, whose
    bytes never pass the CPU (xxh3 would need them there). Each 8-byte word
    is mixed (xor-shift and an odd multiplier) and summed with an odd weight
    per position, modulo 2**64: a corrupted word changes the sum for certain,
    and a swap of two words changes it too. The same function on the CPU
    verifies chunks read back through the POSIX path.
    """
    n = data.numel()
    whole = n // 8 * 8
    words = data[:whole].view(torch.int64)
    if whole < n:  # the tail, zero-padded to one word
        tail = torch.zeros(8, dtype=torch.uint8, device=data.device)
        tail[: n - whole] = data[whole:]
        words = torch.cat([words, tail.view(torch.int64)])
    mixed = (words ^ (words >> 29)) * -7046029254386353131  # 0x9E3779B97F4A7C15 as int64
    weights = torch.arange(1, 2 * words.numel() + 1, 2, dtype=torch.int64, device=data.device)
    total = int((mixed * weights).sum().item()) ^ n
    return total & _MASK


def checksum(kind: int, data: torch.Tensor | memoryview | bytes) -> int:
    """The checksum of ``kind`` (:data:`XXH3` or :data:`DEVICE`) of ``data``."""
    if kind == DEVICE:
        tensor = data if isinstance(data, torch.Tensor) else torch.frombuffer(data, dtype=torch.uint8)
        return device_checksum(tensor)
    return xxh3(data)
