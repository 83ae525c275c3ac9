from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch
from conftest import flip_byte

from tierd import checksums
from tierd.codecs import Chunk, get_codec
from tierd.errors import CorruptObject, TierdError
from tierd.testing import TierTests, payload
from tierd.tiers.host import HostLocation, HostTier
from tierd.tiers.nvme import NvmeLocation, NvmeTier


class TestHostTier(TierTests):
    @pytest.fixture
    def tier(self) -> Iterator[HostTier]:
        t = HostTier(16 << 20)
        yield t
        t.close()

    def backdoor_read(self, tier: Any, location: HostLocation) -> bytes:
        # The arena is a memfd: read it through the file descriptor, not the mapping.
        return os.pread(tier.fd, location.nbytes, location.offset)

    def test_extents_are_page_aligned(self, tier: HostTier) -> None:
        locs = [tier.alloc(n) for n in (1, 5000, 12345, 4096)]
        assert all(loc is not None and loc.offset % 4096 == 0 for loc in locs)


class TestNvmeTier(TierTests):
    @pytest.fixture(params=["direct", "buffered"])
    def tier(self, request: pytest.FixtureRequest, nvme_dir: Path) -> Iterator[NvmeTier]:
        t = NvmeTier(nvme_dir, 16 << 20, slab_size=4 << 20, chunk_size=1 << 20, io_threads=4,
                     direct=request.param == "direct")
        yield t
        t.close()

    def backdoor_read(self, tier: Any, location: NvmeLocation) -> bytes:
        out = b""
        for c in location.chunks:
            with open(tier.slab_file(c.slab), "rb") as fh:
                fh.seek(c.offset)
                out += fh.read(c.stored)
        return out

    def test_direct_io_is_used_on_a_real_filesystem(self, nvme_dir: Path) -> None:
        t = NvmeTier(nvme_dir, 8 << 20)
        try:
            if t.direct_refused:
                pytest.skip(f"O_DIRECT not available here: {t.direct_refused}")
            assert t.direct
        finally:
            t.close()

    def test_flipped_byte_is_detected(self, tier: NvmeTier) -> None:
        src = payload(3 << 20, seed=7)
        loc = tier.write(src, codec=get_codec("none"), itemsize=1, durable=True)
        c = loc.chunks[1]
        flip_byte(tier.slab_file(c.slab), c.offset + 1234)
        with pytest.raises(CorruptObject, match="checksum mismatch"):
            tier.read_into(loc, torch.empty_like(src), itemsize=1)

    @pytest.mark.parametrize("codec", ["zstd", "bytegroup"])
    def test_codecs_round_trip_and_shrink(self, tier: NvmeTier, codec: str) -> None:
        w = (torch.randn(1 << 20) * 0.02).to(torch.bfloat16)
        src = w.view(torch.uint8)
        loc = tier.write(src, codec=get_codec(codec), itemsize=2, durable=False)
        dest = torch.empty_like(src)
        tier.read_into(loc, dest, itemsize=2)
        assert torch.equal(src, dest)
        assert tier.stored_nbytes(loc) < src.numel()

    def test_object_larger_than_a_slab_spans_slabs(self, tier: NvmeTier) -> None:
        src = payload(10 << 20, seed=3)
        loc = tier.write(src, codec=get_codec("none"), itemsize=1, durable=False)
        assert len({c.slab for c in loc.chunks}) >= 3
        dest = torch.empty_like(src)
        tier.read_into(loc, dest, itemsize=1)
        assert torch.equal(src, dest)

    def test_second_owner_of_a_directory_is_refused(self, tier: NvmeTier) -> None:
        with pytest.raises(TierdError, match="in use by another tierd store"):
            NvmeTier(tier.path, 8 << 20)

    def test_reserve_rebuilds_allocation(self, tier: NvmeTier) -> None:
        src = payload(2 << 20, seed=9)
        loc = tier.write(src, codec=get_codec("none"), itemsize=1, durable=True)
        used = tier.usage().used_bytes
        tier.free(loc)
        tier.reserve(loc)
        assert tier.usage().used_bytes == used
        with pytest.raises(ValueError):
            tier.reserve(loc)  # overlaps itself


def test_buffered_fallback_warns_on_tmpfs(caplog: pytest.LogCaptureFixture) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    import tempfile

    with tempfile.TemporaryDirectory(dir=shm) as d:
        t = NvmeTier(d, 8 << 20)
        try:
            if t.direct:
                pytest.skip("this tmpfs accepts O_DIRECT")
            assert "buffered I/O" in caplog.text
            src = payload(5000, seed=2)
            loc = t.write(src, codec=get_codec("none"), itemsize=1, durable=True)
            dest = torch.empty_like(src)
            t.read_into(loc, dest, itemsize=1)
            assert torch.equal(src, dest)
        finally:
            t.close()


def test_one_chunk_record_keeps_the_durable_index_layout() -> None:
    # An nvme location as the durable index has always stored it:
    # [[slab, offset, stored, raw, mode, checksum, kind], ...], positional msgpack.
    stored = msgspec.msgpack.encode([[[3, 8192, 100, 200, 1, 12345, checksums.XXH3]]])
    loc = msgspec.msgpack.decode(stored, type=NvmeLocation)
    assert loc.chunks == (Chunk(slab=3, offset=8192, stored=100, raw=200, mode=1, checksum=12345),)
    assert msgspec.msgpack.encode(loc) == stored


def test_a_chunk_knows_its_stored_bytes() -> None:
    data = bytearray(os.urandom(1000))
    c = Chunk(0, 0, len(data), len(data), 0, checksums.xxh3(bytes(data)))
    assert c.intact(bytes(data)) and c.intact(memoryview(data))
    assert not c.intact(bytes(data[:-1]))  # short
    data[500] ^= 1
    assert not c.intact(bytes(data))  # one bit flipped
