"""GPU paths: pinned registration, copies, the gpu tier, device checksums, GDS.

The piece logic, the device checksum, the chunk format and the gpu tier's
bookkeeping run here on the CPU (the gpu tier on a CPU "device"); the
tests marked ``gpu`` need CUDA and skip cleanly without it.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import flip_byte, small_config
from daemon import Daemon

import tierd
from tierd.checksums import device_checksum
from tierd.clients.gpu import GpuTierStore
from tierd.codecs import get_codec
from tierd.tiers.gpu import MIN_PIECE, GpuTier, PinnedArena, plan_registration
from tierd.tiers.nvme import CHECKSUM_DEVICE, CHECKSUM_XXH3, NvmeTier

MIB = 1 << 20
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


# -- pinned registration ------------------------------------------------------------


def test_plan_registration_pieces_and_memlock() -> None:
    pieces, left = plan_registration(5 * MIB * 2, 4 * MIB, None)
    assert pieces == [(0, 4 * MIB), (4 * MIB, 4 * MIB), (8 * MIB, 2 * MIB)] and left == 0
    pieces, left = plan_registration(10 * MIB, 4 * MIB, 7 * MIB)  # ulimit -l = 7 MiB: 4 + 2 MiB fit
    assert pieces == [(0, 4 * MIB), (4 * MIB, 2 * MIB)] and left == 4 * MIB
    with pytest.raises(tierd.InvalidArgument, match="multiple of 2 MiB"):
        plan_registration(10 * MIB, 3 * MIB, None)


def test_pinned_arena_halves_pieces_the_driver_refuses() -> None:
    calls: list[tuple[int, int]] = []
    unregistered: list[int] = []

    def register(ptr: int, n: int) -> str | None:
        calls.append((ptr, n))
        return "too large" if n > 4 * MIB else None

    arena = PinnedArena(1 << 40, 20 * MIB, piece=16 * MIB, register=register, unregister=unregistered.append)
    assert arena.problem is None and arena.pinned_bytes == 20 * MIB
    assert all(n <= 4 * MIB for _, n in arena.registered)
    covered = sorted(arena.registered)
    assert covered[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(covered, covered[1:], strict=False))
    arena.close()
    assert sorted(unregistered) == sorted((1 << 40) + off for off, _ in covered) and not arena.registered


def test_pinned_arena_reports_refusal_and_memlock() -> None:
    arena = PinnedArena(0, 8 * MIB, piece=MIN_PIECE, register=lambda p, n: None if p < 4 * MIB else "no",
                        unregister=lambda p: None)
    assert arena.pinned_bytes == 4 * MIB and arena.problem and "cudaHostRegister refused" in arena.problem
    limited = PinnedArena(0, 8 * MIB, piece=4 * MIB, allowance=4 * MIB, register=lambda p, n: None,
                          unregister=lambda p: None)
    assert limited.pinned_bytes == 4 * MIB and limited.problem and "ulimit -l" in limited.problem


# -- device checksums and the chunk format ------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 7, 8, 4096, 4099])
def test_device_checksum_sees_every_flip(n: int) -> None:
    data = torch.randint(0, 256, (n,), dtype=torch.uint8)
    base = device_checksum(data)
    assert device_checksum(data.clone()) == base
    gen = torch.Generator().manual_seed(n)
    for pos in torch.randint(0, max(n, 1), (min(n, 32),), generator=gen).tolist():
        bad = data.clone()
        bad[pos] ^= 1 << (pos % 8)
        assert device_checksum(bad) != base, pos
    if n >= 16:  # two words swapped
        swapped = data.clone()
        swapped[:8], swapped[8:16] = data[8:16], data[:8]
        if not torch.equal(swapped, data):
            assert device_checksum(swapped) != base
    assert device_checksum(torch.cat([data, torch.zeros(1, dtype=torch.uint8)])) != base  # length counts


def test_nvme_chunks_with_device_checksums(tmp_path: os.PathLike[str]) -> None:
    # With gds on, raw chunks written from host memory carry the device checksum
    # (Note [GPUDirect Storage]); the POSIX path verifies it on the CPU.
    tier = NvmeTier(tmp_path, 64 * MIB, slab_size=16 * MIB, chunk_size=1 * MIB)
    try:
        tier.gds = True
        src = torch.randint(0, 256, (3 * MIB + 123,), dtype=torch.uint8)
        loc = tier.write(src, codec=get_codec("none"), itemsize=1, durable=True)
        assert {c.kind for c in loc.chunks} == {CHECKSUM_DEVICE}
        zeros = torch.zeros(2 * MIB, dtype=torch.uint8)
        zloc = tier.write(zeros, codec=get_codec("zstd"), itemsize=1, durable=False)  # decoded on the CPU: xxh3
        assert {c.kind for c in zloc.chunks} == {CHECKSUM_XXH3}
        tier.gds = False  # a reader without a GPU verifies the same chunks
        out = torch.empty_like(src)
        tier.read_into(loc, out, itemsize=1)
        assert torch.equal(out, src)
        c = loc.chunks[1]
        flip_byte(tier.slab_file(c.slab), c.offset + 77, 0x20)
        with pytest.raises(tierd.CorruptObject, match="checksum mismatch"):
            tier.read_into(loc, out, itemsize=1)
    finally:
        tier.close()


# -- the gpu tier (bookkeeping on a CPU device) ---------------------------------------


@pytest.fixture
def gpu_store(nvme_dir: os.PathLike[str]) -> GpuTierStore:
    store = GpuTierStore(tierd.open(small_config(nvme_dir)), GpuTier("cpu", 3 * MIB))
    yield store
    store.close()


def test_gpu_tier_holds_objects_and_writes_them_down_when_full(gpu_store: GpuTierStore) -> None:
    below = gpu_store.below
    below.put("g/a", torch.zeros(4))  # an older version below: gone at the gpu put
    tensors = {f"g/{c}": torch.full((MIB // 4,), float(i)) for i, c in enumerate("abcd")}  # 1 MiB each
    for key, t in tensors.items():
        gpu_store.put(key, t, tier="gpu")
        t.add_(100)  # the tier holds a copy, not the caller's tensor
    assert gpu_store.gpu.used_bytes == 3 * MIB
    # "g/a" was least recently used: written down when "g/d" came in.
    assert below.exists("g/a") and not below.exists("g/b")
    assert gpu_store.info("g/b").tier == "gpu" and gpu_store.info("g/a").tier == "host"
    for key, t in tensors.items():
        assert torch.equal(gpu_store.get(key), t - 100), key
    assert gpu_store.keys("g/") == sorted(tensors)
    st = gpu_store.stats()
    assert st["gpu"].objects == 3 and st["gpu"].demoted_bytes == MIB and st["gpu"].hits >= 3
    out = torch.empty(MIB // 4)
    assert torch.equal(gpu_store.get("g/c", out=out), tensors["g/c"] - 100)
    assert gpu_store.delete("g/c") and not gpu_store.exists("g/c")


def test_gpu_tier_caches_moves_and_durable_puts(gpu_store: GpuTierStore) -> None:
    below = gpu_store.below
    t = torch.arange(MIB // 4, dtype=torch.float32)
    below.put("g/x", t)
    gpu_store.move("g/x", "gpu")  # a cached copy: it stays below
    assert gpu_store.info("g/x").tiers[:2] == ("gpu", "host") and below.exists("g/x")
    gpu_store.put("g/d", t * 2, tier="gpu", durable=True)  # written through
    assert below.info("g/d").durable and "g/d" in gpu_store.gpu
    for i in range(3):  # pushes both cached copies out: dropped, still below
        gpu_store.put(f"g/f{i}", torch.ones(MIB // 4), tier="gpu")
    assert "g/x" not in gpu_store.gpu and "g/d" not in gpu_store.gpu
    assert torch.equal(gpu_store.get("g/x"), t) and torch.equal(gpu_store.get("g/d"), t * 2)
    gpu_store.move("g/f2", "nvme")  # only on the gpu: written down, then moved
    assert gpu_store.info("g/f2").tier == "nvme" and torch.equal(gpu_store.get("g/f2"), torch.ones(MIB // 4))
    big = torch.ones(4 * MIB // 4)  # larger than the budget: straight below
    gpu_store.put("g/big", big, tier="gpu")
    assert "g/big" not in gpu_store.gpu and torch.equal(below.get("g/big"), big)
    with pytest.raises(tierd.InvalidArgument):
        gpu_store.put("g/b", b"bytes", tier="gpu")


def test_gpu_tier_close_writes_down_through_the_daemon(nvme_dir: os.PathLike[str]) -> None:
    daemon = Daemon(nvme_dir).start()
    try:
        store = GpuTierStore(daemon.connect(), GpuTier("cpu", 8 * MIB))
        t = torch.randn(1000)
        store.put("g/kept", t, tier="gpu")
        assert not store.below.exists("g/kept")
        store.close()
        with daemon.connect() as other:
            assert torch.equal(other.get("g/kept"), t)
    finally:
        daemon.close()


def test_gpu_tier_config(nvme_dir: os.PathLike[str]) -> None:
    cfg = tierd.load_config({"tiers": {"gpu": {"budget": "2GiB", "pin_piece": "256MiB"}}})
    assert cfg.tiers.gpu.budget == 2 << 30 and cfg.tiers.gpu.pin_piece == 256 * MIB and cfg.tiers.gpu.pin
    with pytest.raises(tierd.ConfigError, match="tiers.gpu"):
        tierd.load_config({"tiers": {"gpu": {"fraction": 1.5}}})
    with pytest.raises(tierd.ConfigError, match="pin_piece"):
        tierd.load_config({"tiers": {"gpu": {"pin_piece": "3MiB"}}})
    if not torch.cuda.is_available():  # the tier is off without CUDA, whatever the budget
        config = small_config(nvme_dir)
        config["tiers"]["gpu"] = {"budget": "1GiB"}
        with tierd.open(config) as store:
            assert not isinstance(store, GpuTierStore)
            with pytest.raises(tierd.InvalidArgument, match="gpu tier is off"):
                store.put("g/x", torch.ones(4), tier="gpu")


# -- on a GPU ---------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("nbytes", [4096, 3 * MIB + 4])
@pytest.mark.parametrize("kind", ["open", "connect"])
def test_cuda_round_trip(tmp_path: os.PathLike[str], kind: str, nbytes: int) -> None:
    daemon = Daemon(tmp_path / "d").start() if kind == "connect" else None
    store = daemon.connect() if daemon is not None else tierd.open(small_config(tmp_path / "e"))
    name = kind
    try:
        t = torch.randn(nbytes // 4, device="cuda")
        store.put("c/t", t)
        assert store.info("c/t").tier == "host"
        back = store.get("c/t", device="cuda")
        assert back.is_cuda and torch.equal(back, t), name
        out = torch.empty_like(t)
        assert store.get("c/t", out=out) is out and torch.equal(out, t), name
        strided = torch.empty(2 * t.numel(), device="cuda")[::2]
        store.get("c/t", out=strided)
        assert torch.equal(strided, t), name
        assert torch.equal(store.get("c/t"), t.cpu()), name
        store.put("c/n", t, tier="nvme")
        assert torch.equal(store.get("c/n", device="cuda"), t), name
        assert store._copies.pinned_bytes > 0, name  # the arena was registered for DMA
    finally:
        store.close()
        if daemon is not None:
            daemon.close()


@gpu
def test_gds_nvme_to_device(nvme_dir: os.PathLike[str]) -> None:
    pytest.importorskip("kvikio")
    with tierd.open(small_config(nvme_dir)) as store:
        if not store.engine.nvme.gds:
            pytest.skip(store.engine.nvme.gds_reason)
        t = torch.randn(5 * MIB // 4, device="cuda")
        store.put("c/g", t, tier="nvme")
        assert {c.kind for c in store.engine.locations("c/g")["nvme"].chunks} == {CHECKSUM_DEVICE}
        assert torch.equal(store.get("c/g", device="cuda"), t)


@gpu
def test_gpu_tier_on_cuda(nvme_dir: os.PathLike[str]) -> None:
    config = small_config(nvme_dir)
    config["tiers"]["gpu"] = {"budget": "2MiB"}
    with tierd.open(config) as store:
        assert isinstance(store, GpuTierStore)
        a, b = torch.randn(MIB // 4, device="cuda"), torch.randn(MIB // 4, device="cuda")
        store.put("g/a", a, tier="gpu")
        store.put("g/b", b, tier="gpu")
        store.put("g/c", a + b, tier="gpu")  # "g/a" goes down to host
        assert store.info("g/a").tier == "host" and store.info("g/c").tier == "gpu"
        assert torch.equal(store.get("g/a", device="cuda"), a) and torch.equal(store.get("g/c", device="cuda"), a + b)
