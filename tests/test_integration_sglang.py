"""tierd as SGLang's HiCache storage, created by SGLang's own backend factory (dynamic backend).

Runs only where the real ``sglang`` package is installed (``.ci/engines``; ``.ci/run``'s third step).

The host pool: SGLang's host-pool modules import its whole runtime (model configs, torchvision's
CUDA build), which cannot import on this CPU machine (../shared/INTEGRATIONS.md: import only the
storage modules). :class:`HostPool` is a real tensor pool that exposes what the backend uses of
``MHATokenToKVPoolHost`` with the same buffer shapes and page views (pool_host/mha.py: ``kv_buffer``
``[2, size, layers, heads, dim]`` for page_first, ``[2, layers, size, heads, dim]`` for
layer_first, ``get_data_page``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config
from daemon import Daemon

import tierd

pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory")

from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig  # noqa: E402
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402

PAGE, LAYERS, HEADS, DIM = 16, 4, 2, 32


class HostPool:
    """SGLang's MHA host pool's buffer and page views (see the module's docstring)."""

    def __init__(self, pages: int, layout: str = "page_first", dtype: torch.dtype = torch.bfloat16) -> None:
        self.page_size, self.layout, self.dtype = PAGE, layout, dtype
        self.size = pages * PAGE
        dims = (2, self.size, LAYERS, HEADS, DIM) if layout == "page_first" else (2, LAYERS, self.size, HEADS, DIM)
        self.kv_buffer = torch.zeros(dims, dtype=dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        if self.layout == "page_first":
            page = self.kv_buffer[:, index : index + self.page_size]
        else:
            page = self.kv_buffer[:, :, index : index + self.page_size]
        return page.flatten() if flat else page

    def fill(self, seed: int) -> None:
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=torch.Generator().manual_seed(seed)))


def _config(tp_rank: int = 0, tp_size: int = 1, *, mla: bool = False, **params: Any) -> HiCacheStorageConfig:
    extra = {"backend_name": "tierd", "interface_v1": 1, "module_path": "tierd.integrations.sglang",
             "class_name": "TierdHiCacheStorage"}
    return HiCacheStorageConfig(tp_rank=tp_rank, tp_size=tp_size, pp_rank=0, pp_size=1, attn_cp_rank=0,
                                attn_cp_size=1, is_mla_model=mla, enable_storage_metrics=False,
                                is_page_first_layout=True, model_name="meta-llama/Llama-3.1-8B",
                                extra_config=extra | params)


def _backend(pool: HostPool | None, **kw: Any) -> Any:
    backend = StorageBackendFactory.create_backend("dynamic", _config(**kw), pool)
    if pool is not None:
        backend.register_mem_pool_host(pool)
    return backend


def _indices(pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


@pytest.mark.parametrize("layout", ["page_first", "layer_first"])
def test_pages_round_trip_between_host_pools_through_the_daemon(daemon: Daemon, layout: str) -> None:
    src, dst = HostPool(8, layout), HostPool(8, layout)
    src.fill(1)
    writer, reader = _backend(src, socket=str(daemon.socket)), _backend(dst, socket=str(daemon.socket))
    try:
        assert isinstance(writer, HiCacheStorage)
        keys = [f"hash{i:02d}" for i in range(5)]
        assert writer.batch_set_v1(keys, _indices([0, 1, 2, 3, 4])) == [True] * 5
        # Written again (another request with the same prefix): nothing new is written.
        assert writer.batch_set_v1(keys[:2], _indices([0, 1])) == [True, True]
        assert reader.batch_exists(keys[:3] + ["missing"] + keys[3:]) == 3
        # Into other slots of another process's pool: page i of src lands in slot 7 - i of dst.
        assert reader.batch_get_v1(keys, _indices([7, 6, 5, 4, 3])) == [True] * 5
        for i in range(5):
            assert torch.equal(dst.get_data_page((7 - i) * PAGE, flat=False), src.get_data_page(i * PAGE, flat=False))
        assert not dst.get_data_page(0, flat=False).any()  # untouched slots stay as they were
        assert reader.batch_get_v1(["missing", keys[0]], _indices([0, 1])) == [False, True]
    finally:
        writer.close()
        reader.close()


def test_tensor_parallel_ranks_share_only_what_is_interchangeable(daemon: Daemon) -> None:
    pool = HostPool(2)
    pool.fill(2)
    sock = str(daemon.socket)
    rank0, rank1 = _backend(pool, socket=sock, tp_rank=0, tp_size=2), _backend(pool, socket=sock, tp_rank=1, tp_size=2)
    mla0, mla1 = (_backend(pool, socket=sock, tp_rank=0, tp_size=2, mla=True),
                  _backend(pool, socket=sock, tp_rank=1, tp_size=2, mla=True))
    other_tenant = _backend(pool, socket=sock, tp_rank=0, tp_size=2, salt="tenant-b")
    fp16 = _backend(HostPool(2, dtype=torch.float16), socket=sock, tp_rank=0, tp_size=2)
    try:
        assert rank0.batch_set_v1(["h0"], _indices([0])) == [True]
        assert rank0.batch_exists(["h0"]) == 1
        # A head shard's KV is not another rank's, another tenant's, or another dtype's.
        assert rank1.batch_exists(["h0"]) == 0 and other_tenant.batch_exists(["h0"]) == 0
        assert fp16.batch_exists(["h0"]) == 0
        # MLA's latent KV is the same on every rank: one rank's page serves them all.
        assert mla0.batch_set_v1(["h1"], _indices([1])) == [True]
        assert mla1.batch_exists(["h1"]) == 1
    finally:
        for b in (rank0, rank1, mla0, mla1, other_tenant, fp16):
            b.close()


def test_tensor_calls_and_clear(nvme_dir: Path) -> None:
    backend = _backend(HostPool(1), config=small_config(nvme_dir))
    try:
        value = torch.randn(4, 64)
        assert backend.set("a", value) and backend.exists("a") and not backend.exists("b")
        assert backend.batch_set(["a", "b"], [value, value * 2])
        out = torch.empty(4, 64)
        assert backend.get("b", out) is not None and torch.equal(out, value * 2)
        got = backend.batch_get(["a", "zz"])
        assert torch.equal(got[0], value) and got[1] is None
        backend.clear()
        assert not backend.exists("a") and backend.batch_exists(["a", "b"]) == 0
    finally:
        backend.close()


def test_bad_input_is_clear_and_a_dead_daemon_is_a_miss(daemon: Daemon) -> None:
    pool = HostPool(4)
    pool.fill(3)
    backend = _backend(pool, socket=str(daemon.socket))
    try:
        with pytest.raises(tierd.InvalidArgument, match="host indices"):
            backend.batch_set_v1(["a", "b"], _indices([0]))
        assert backend.batch_set_v1(["a"], _indices([0])) == [True]
        daemon.kill()
        # SGLang recomputes what its L3 cannot give: misses, not exceptions.
        assert backend.batch_exists(["a"]) == 0
        assert backend.batch_get_v1(["a"], _indices([1])) == [False]
        assert backend.batch_set_v1(["b"], _indices([1])) == [False]
    finally:
        backend.close()
    with pytest.raises(tierd.DaemonUnavailable, match="tierd serve"):
        _backend(None, socket="/tmp/no-such-tierd.sock")
