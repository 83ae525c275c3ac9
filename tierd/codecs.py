"""Codecs: how an object's bytes are stored on the slower tiers.

Objects are stored in chunks (``[tiers.nvme] chunk_size``, 4 MiB by default),
each encoded on its own so chunks compress on all cores and decode alone.
Every chunk records the *mode* it was stored with, so decoding never needs to
know which codec was asked for, and a codec that does not pay for a chunk
stores it raw:

* ``none``: raw bytes;
* ``zstd``: zstandard, level 1 by default;
* ``bytegroup``: split each element's bytes into planes (bf16 -> high byte
  plane + low byte plane), then zstd. The high planes (sign, exponent) of
  floating-point weights are very repetitive; the low planes are nearly
  random. Grouping lets zstd find that out plane by plane.

A chunk whose encoded size is worse than 0.95 of its raw size is stored raw.
Compression happens only on the way to nvme, never on the host tier.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from enum import IntEnum
from typing import ClassVar

import msgspec
import numpy as np
import torch
import zstandard

from tierd import checksums
from tierd.errors import CorruptObject, InvalidArgument

__all__ = ["Chunk", "Codec", "ChunkMode", "get_codec", "decode_chunk", "CODECS", "GIVE_UP_RATIO"]

GIVE_UP_RATIO = 0.95


class ChunkMode(IntEnum):
    RAW = 0
    ZSTD = 1
    BYTEGROUP = 2


_local = threading.local()


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # ZstdCompressor objects are not thread-safe; one per thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    cctx = cache.get(level)
    if cctx is None:
        cctx = cache[level] = zstandard.ZstdCompressor(level=level)
    return cctx


def _decompressor() -> zstandard.ZstdDecompressor:
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


class Codec(ABC):
    """Encodes one chunk of an object.

    Note for implementers: ``encode`` may be called from many threads at once
    and must return ``(ChunkMode.RAW, chunk)`` when encoding does not pay.
    """

    name: ClassVar[str]

    @abstractmethod
    def encode(self, chunk: memoryview, itemsize: int) -> tuple[ChunkMode, bytes | memoryview]:
        """Encode ``chunk`` (raw bytes of whole elements of ``itemsize`` bytes)."""


class NoneCodec(Codec):
    name = "none"

    def encode(self, chunk: memoryview, itemsize: int) -> tuple[ChunkMode, bytes | memoryview]:
        return ChunkMode.RAW, chunk


class ZstdCodec(Codec):
    name = "zstd"

    def __init__(self, level: int = 1) -> None:
        self.level = level

    def encode(self, chunk: memoryview, itemsize: int) -> tuple[ChunkMode, bytes | memoryview]:
        packed = _compressor(self.level).compress(chunk)
        if len(packed) > GIVE_UP_RATIO * len(chunk):
            return ChunkMode.RAW, chunk
        return ChunkMode.ZSTD, packed


class ByteGroupCodec(Codec):
    name = "bytegroup"

    def __init__(self, level: int = 1) -> None:
        self.level = level

    def encode(self, chunk: memoryview, itemsize: int) -> tuple[ChunkMode, bytes | memoryview]:
        if itemsize <= 1 or len(chunk) % itemsize:
            return ZstdCodec(self.level).encode(chunk, itemsize)
        # (n, k) -> (k, n): plane j holds byte j of every element.
        planes = np.frombuffer(chunk, dtype=np.uint8).reshape(-1, itemsize).T.copy()
        packed = _compressor(self.level).compress(planes.data)
        if len(packed) > GIVE_UP_RATIO * len(chunk):
            return ChunkMode.RAW, chunk
        return ChunkMode.BYTEGROUP, packed


CODECS: dict[str, Codec] = {c.name: c for c in (NoneCodec(), ZstdCodec(), ByteGroupCodec())}


def get_codec(name: str | None) -> Codec:
    """The codec called ``name`` (None means ``"none"``).

    Raises:
        InvalidArgument: no such codec.
    """
    codec = CODECS.get(name or "none")
    if codec is None:
        raise InvalidArgument(f"unknown codec {name!r}; choose one of {sorted(CODECS)}")
    return codec


class Chunk(msgspec.Struct, frozen=True, array_like=True):
    """One stored chunk of an object, on any medium: nvme, the remote tier, a checkpoint shard.

    ``slab`` and ``offset`` say where it is (nvme: slab file and byte offset
    in it; remote: 0 and the chunk's position in the object, its Redis key
    being ``<oid>:<index>``; checkpoint: 0 and the offset in the shard file);
    ``stored`` bytes there decode with ``mode`` to ``raw`` bytes; ``checksum``
    of ``kind`` (:mod:`tierd.checksums`) covers the stored bytes (checkpoints
    check whole tensors instead and leave it 0).

    The field order is the durable index's encoding of nvme chunks (msgpack,
    positional): it must not change.
    """

    slab: int
    offset: int
    stored: int
    raw: int
    mode: int
    checksum: int = 0
    kind: int = checksums.XXH3

    def intact(self, stored: torch.Tensor | memoryview | bytes) -> bool:
        """Whether ``stored``, as read back, is this chunk's stored bytes (length and checksum)."""
        n = stored.numel() if isinstance(stored, torch.Tensor) else len(stored)
        return n == self.stored and checksums.checksum(self.kind, stored) == self.checksum

    def decode_into(self, stored: memoryview, out: memoryview, itemsize: int) -> None:
        """Decode the stored bytes into ``out`` (this chunk's ``raw`` bytes); see :func:`decode_chunk`."""
        decode_chunk(self.mode, stored, out, itemsize)


def decode_chunk(mode: int, stored: memoryview, out: memoryview, itemsize: int) -> None:
    """Decode one stored chunk into ``out`` (exactly the chunk's raw length).

    Raises:
        CorruptObject: the stored bytes do not decode to ``len(out)`` bytes.
    """
    if mode == ChunkMode.RAW:
        out[:] = stored
        return
    try:
        raw = _decompressor().decompress(stored, max_output_size=len(out))
    except zstandard.ZstdError as exc:
        raise CorruptObject(f"chunk does not decompress: {exc}") from exc
    if len(raw) != len(out):
        raise CorruptObject(f"chunk decompressed to {len(raw)} bytes, expected {len(out)}")
    if mode == ChunkMode.ZSTD:
        out[:] = raw
    elif mode == ChunkMode.BYTEGROUP:
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, -1)
        np.frombuffer(out, dtype=np.uint8).reshape(-1, itemsize)[:] = planes.T
    else:
        raise CorruptObject(f"unknown chunk mode {mode}")
