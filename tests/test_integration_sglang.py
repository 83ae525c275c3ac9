"""tierd as SGLang's HiCache storage, created by SGLang's own backend factory (dynamic backend).

Runs only where the real ``sglang`` package is installed (``.ci/engines``; ``.ci/run``'s third step).

The host pool: SGLang's host-pool modules import its whole runtime (model configs, torchvision's
CUDA build), which cannot import on this CPU machine (../shared/INTEGRATIONS.md: import only the
storage modules). :class:`HostPool` is a real tensor pool that exposes what the backend uses of
``MHATokenToKVPoolHost`` with the same buffer shapes and page views (pool_host/mha.py: ``kv_buffer``
``[2, size, layers, heads, dim]`` for page_first, ``[2, layers, size, heads, dim]`` for
layer_first, ``get_data_page``, ``get_dummy_flat_data_page``, ``set_from_flat_data_page``).
:class:`StatePool` and :class:`IndexerPool` do the same for the extra pools of the v2 calls:
``MambaPoolHost`` (pool_host/mamba.py: one slot a page, a page assembled from several state
buffers, so not a view) and the DSA indexer's host pool (pool_host/dsa.py: one row per page,
found from a KV host index).

SGLang's wheel ships no tests. The v2 tests below check the contract SGLang's own file backend
(``HiCacheFile``) keeps: what ``batch_exists_v2`` folds per hit policy, what ``batch_get_v2`` /
``batch_set_v2`` answer per pool and key, and that a stored key is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config
from daemon import Daemon

import tierd
from tierd.engine.keys import MAX_CHAIN
from tierd.policies.simulator import read_trace
from tierd.testing import wait_until

pytest.importorskip("sglang.srt.mem_cache.storage.backend_factory")

from sglang.srt.mem_cache.hicache_storage import (  # noqa: E402
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)
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

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2 * LAYERS * self.page_size * HEADS * DIM, dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = self.get_data_page(index, flat=False)
        page.copy_(data_page.reshape(page.shape))

    def fill(self, seed: int) -> None:
        self.kv_buffer.copy_(torch.randn(self.kv_buffer.shape, generator=torch.Generator().manual_seed(seed)))


class StatePool:
    """``MambaPoolHost``'s pages: one slot each, its conv and temporal states' bytes joined (a copy)."""

    layout, page_size = "layer_first", 1

    def __init__(self, slots: int) -> None:
        self.size = slots
        self.conv = torch.zeros(LAYERS, slots, 3, 8, dtype=torch.bfloat16)
        self.temporal = torch.zeros(LAYERS, slots, 2, 4, dtype=torch.float32)
        self.dtype = torch.uint8

    def _parts(self, index: int) -> list[torch.Tensor]:
        return [self.conv[:, index : index + 1], self.temporal[:, index : index + 1]]

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        return torch.cat([t.contiguous().view(torch.uint8).reshape(-1) for t in self._parts(index)])

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(sum(t.nbytes for t in self._parts(0)), dtype=torch.uint8)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        flat, at = data_page.view(torch.uint8).reshape(-1), 0
        for t in self._parts(index):
            t.copy_(flat[at : at + t.nbytes].view(t.dtype).reshape(t.shape))
            at += t.nbytes

    def fill(self, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.conv.copy_(torch.randn(self.conv.shape, generator=g))
        self.temporal.copy_(torch.randn(self.temporal.shape, generator=g))

    def slot(self, index: int) -> torch.Tensor:
        return self.get_data_page(index)


class IndexerPool:
    """The DSA indexer's host pool: one row of bytes per page, found from the page's KV host index."""

    layout, dtype = "page_first", torch.uint8

    def __init__(self, pages: int) -> None:
        self.page_size, self.size = PAGE, pages * PAGE
        self.buffer = torch.zeros(pages, LAYERS, 1, 132, dtype=torch.uint8)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.buffer[int(index) // self.page_size : int(index) // self.page_size + 1]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(LAYERS * 132, dtype=torch.uint8)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.get_data_page(index, flat=False).copy_(data_page.reshape(1, LAYERS, 1, 132))

    def fill(self, seed: int) -> None:
        self.buffer.copy_(torch.randint(0, 256, self.buffer.shape, generator=torch.Generator().manual_seed(seed),
                                        dtype=torch.uint8))


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


def _sibling(backend: Any, pool: HostPool, **kw: Any) -> Any:
    """Another backend (another process's, with its own host pool) on ``backend``'s store: how an
    embedded store is shared (SGLang's factory has no way to pass one)."""
    from tierd.integrations.sglang import TierdHiCacheStorage

    other = TierdHiCacheStorage(_config(**kw), store=backend.store)
    other.register_mem_pool_host(pool)
    return other


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
    pool = HostPool(2)
    pool.fill(6)
    backend = _backend(pool, config=small_config(nvme_dir))
    try:
        value, other = pool.get_data_page(0), pool.get_data_page(PAGE)  # flat pages, as SGLang's batch_set gets
        assert backend.set("a", value) and backend.exists("a") and not backend.exists("b")
        assert backend.batch_set(["a", "b"], [value, other])
        out = pool.get_dummy_flat_data_page()
        assert backend.get("b", out) is not None and torch.equal(out, other)
        got = backend.batch_get(["a", "zz"])
        assert torch.equal(got[0], value) and got[1] is None
        assert backend.clear() is True
        assert not backend.exists("a") and backend.batch_exists(["a", "b"]) == 0
    finally:
        backend.close()


def test_a_bad_item_fails_only_itself(nvme_dir: Path) -> None:
    """A key tierd cannot take (a NUL, over 1 KiB), a host index outside the pool, a buffer of the wrong
    size: that item fails, nothing is stored for it, and the rest of its batch goes on."""
    pool, dst = HostPool(8), HostPool(8)
    pool.fill(7)
    backend = _backend(pool, config=small_config(nvme_dir))
    reader = _sibling(backend, dst)
    nul, long = "bad\0hash", "m" * 2000
    try:
        assert backend.batch_set_v1(["g0", nul, "g1", long], _indices([0, 1, 2, 3])) == [True, False, True, False]
        assert backend.batch_exists(["g0", "g1"]) == 2
        assert backend.batch_exists(["g0", nul, "g1"]) == 1  # a key tierd cannot take is not stored
        assert not backend.exists(nul) and not backend.exists(long)
        assert reader.batch_get_v1(["g0", long, "g1", nul], _indices([4, 5, 6, 7])) == [True, False, True, False]
        assert torch.equal(dst.get_data_page(4 * PAGE, flat=False), pool.get_data_page(0, flat=False))
        assert torch.equal(dst.get_data_page(6 * PAGE, flat=False), pool.get_data_page(2 * PAGE, flat=False))

        # Host indices outside the registered pool (8 pages): that page fails, the others are stored.
        outside = torch.cat([_indices([4]), torch.arange(8 * PAGE, 9 * PAGE), _indices([5])])
        assert backend.batch_set_v1(["h0", "h1", "h2"], outside) == [True, False, True]
        assert backend.batch_set_v1(["h3"], _indices([0]) - 1) == [False]  # a negative index
        assert backend.batch_exists(["h0"]) == 1 and not backend.exists("h1") and not backend.exists("h3")
        assert reader.batch_get_v1(["h0", "h2", "h0"], torch.cat([_indices([0, 1]), outside[PAGE : 2 * PAGE]])) == [
            True, True, False]
        # Not a page's worth per key: no page can be told from the next, none is moved.
        assert backend.batch_set_v1(["h4", "h5"], _indices([0])) == [False, False]
        assert backend.batch_get_v1(["h0", "h2"], _indices([0])) == [False, False]
        assert not backend.exists("h4")

        # The older calls: a value or a target of the wrong size, a key tierd cannot take.
        page, short = pool.get_data_page(3 * PAGE), torch.zeros(10, dtype=torch.bfloat16)
        assert backend.batch_set(["t0", "t1", nul, "t2"], [page, short, page, "not a tensor"]) is False
        assert backend.exists("t0") and not backend.exists("t1") and not backend.exists("t2")
        got = backend.batch_get(["t0", "t0", nul], [pool.get_dummy_flat_data_page(), short, None])
        assert torch.equal(got[0], page) and got[1] is None and got[2] is None
    finally:
        reader.close()
        backend.close()


@pytest.mark.parametrize("call", ["v1", "v0"])
def test_a_stored_key_is_kept_as_sglangs_file_backend_keeps_it(nvme_dir: Path, call: str) -> None:
    """HiCacheFile skips a page whose file exists and reports it stored; so does tierd: a second
    store of a key writes nothing, whatever the pool now holds."""
    pool = HostPool(2)
    pool.fill(8)
    first = pool.get_data_page(0).clone()
    backend = _backend(pool, config=small_config(nvme_dir))
    try:
        if call == "v1":
            assert backend.batch_set_v1(["k"], _indices([0])) == [True]
            pool.fill(9)
            assert backend.batch_set_v1(["k"], _indices([0])) == [True]
            assert backend.batch_get_v1(["k"], _indices([1])) == [True]
            assert torch.equal(pool.get_data_page(PAGE), first)
        else:
            assert backend.set("k", first)
            assert backend.set("k", torch.zeros_like(first)) and backend.batch_set(["k"], [torch.ones_like(first)])
            assert torch.equal(backend.get("k", pool.get_dummy_flat_data_page()), first)
    finally:
        backend.close()


def test_a_key_once_stored_from_a_bad_page_is_not_stuck(daemon: Daemon) -> None:
    """The failure this replaces: a store from host indices outside the pool reported True after
    storing an empty page, batch_exists then said hit, every load failed, and the next store (kept)
    never replaced it. Now the bad store stores nothing; and a page that was stored wrong (by an older
    tierd) is dropped by the load that finds it, so the next backup stores it again."""
    pool, dst = HostPool(4), HostPool(4)
    pool.fill(10)
    backend, reader = _backend(pool, socket=str(daemon.socket)), _backend(dst, socket=str(daemon.socket))
    try:
        assert backend.batch_set_v1(["p"], torch.arange(4 * PAGE, 5 * PAGE)) == [False]
        assert backend.batch_exists(["p"]) == 0
        assert backend.batch_set_v1(["p"], _indices([1])) == [True]
        assert reader.batch_get_v1(["p"], _indices([2])) == [True]
        assert torch.equal(dst.get_data_page(2 * PAGE, flat=False), pool.get_data_page(PAGE, flat=False))

        backend.store.put(backend.key("q"), torch.zeros(0, dtype=torch.bfloat16))  # what the old bug stored
        assert backend.batch_exists(["q"]) == 1
        assert reader.batch_get_v1(["q"], _indices([0])) == [False]
        assert backend.batch_exists(["q"]) == 0  # dropped by the load that could not use it
        assert backend.batch_set_v1(["q"], _indices([3])) == [True]
        assert reader.batch_get_v1(["q"], _indices([0])) == [True]
        assert torch.equal(dst.get_data_page(0, flat=False), pool.get_data_page(3 * PAGE, flat=False))
    finally:
        backend.close()
        reader.close()


def _backup(backend: Any, chain: list[str], slots: list[int], batch: int, *, pass_prefix: bool) -> None:
    """Store ``chain``'s pages (from ``slots`` of the pool) as SGLang's backup does: ``batch`` pages
    a call, each call's ``prefix_keys`` the pages before it (managers/cache_controller.py,
    ``_page_backup``), or none without ``hicache_storage_pass_prefix_keys``."""
    for i in range(0, len(chain), batch):
        info = HiCacheStorageExtraInfo(prefix_keys=chain[:i] if pass_prefix else None)
        assert backend.batch_set_v1(chain[i : i + batch], _indices(slots[i : i + batch]), info) == [True] * len(
            chain[i : i + batch])


def test_prefix_keys_declare_each_pages_parent(nvme_dir: Path, tmp_path: Path) -> None:
    """The trace records a put's parent where the namespace was told the chain: every page's is
    the page before it, across batches and across requests that share a head."""
    trace = tmp_path / "sglang.jsonl"
    pool = HostPool(8)
    pool.fill(4)
    cfg = small_config(nvme_dir, trace={"path": str(trace)}, namespaces={"sglang": {"access": "prefix"}})
    backend = _backend(pool, config=cfg)
    try:
        first = [f"a{i}" for i in range(7)]
        _backup(backend, first, list(range(7)), 3, pass_prefix=True)
        branch = first[:2] + ["b2", "b3"]  # another request: the first two pages shared, stored already
        _backup(backend, branch, [0, 1, 2, 3], 2, pass_prefix=True)
    finally:
        backend.close()
    parents = {e.key: e.parent for e in read_trace(trace) if e.op == "put"}
    want = {first[0]: "", **{first[i]: first[i - 1] for i in range(1, 7)}, "b2": "a1", "b3": "b2"}
    assert parents == {backend.key(k): backend.key(v) if v else "" for k, v in want.items()}


@pytest.mark.parametrize(("policy", "pass_prefix"), [
    ("prefix", True),
    pytest.param("prefix", False, marks=pytest.mark.xfail(strict=True)),  # no chains: no parents
    pytest.param("lru", True, marks=pytest.mark.xfail(strict=True)),  # chains, ignored
])
def test_host_keeps_a_head_of_each_chain_stored_through_the_daemon(nvme_dir: Path, policy: str,
                                                                   pass_prefix: bool) -> None:
    """SGLang's backup through a daemon whose ``sglang`` namespace evicts with the prefix policy:
    host, too small for the chains, cuts them from their tails (never a page whose parent left),
    however recently a tail was read. Without ``prefix_keys`` the namespace knows no parents and,
    like LRU, cuts heads. (As tests/test_prefix_policies.py's
    ``test_engine_evicts_chains_from_their_tail``, and like it eviction alone: prefix admission
    judges each new page by its kind, and may send a chain's first pages to nvme and admit the
    next.)"""
    d = Daemon(nvme_dir, host="2MiB", namespaces={"sglang": {"policy": policy}}).start()  # 128 pages of 16 KiB
    pool = HostPool(8)
    try:
        backend = _backend(pool, socket=str(d.socket))
        store = backend.store
        chains = [["sys"] + [f"c{c}p{i}" for i in range(7)] for c in range(40)]  # 7 new pages a chain
        for c, chain in enumerate(chains):
            pool.fill(c)
            # The shared head was stored by the first request; the rest, 3 pages a call.
            _backup(backend, chain, list(range(8)), 3, pass_prefix=pass_prefix)
            # Reading a tail makes it the most recent (an LRU would evict its head first). Only
            # pages in host are read: a read from below promotes, in whatever order there is room for.
            for old in chains[max(0, c - 4) : c]:
                if store.info(backend.key(old[-1])).tier == "host":
                    assert backend.batch_get_v1([old[-1]], _indices([0])) == [True]
        demoted = 0
        for chain in chains:
            where = [store.info(backend.key(h)).tier for h in chain]
            demoted += where.count("nvme")
            # Host holds a head of each chain: never a page whose parent left.
            assert where == sorted(where, key=lambda t: t != "host"), where
        assert demoted > 0
        backend.close()
    finally:
        d.close()


def test_odd_prefix_keys_never_fail_a_store(nvme_dir: Path, tmp_path: Path) -> None:
    """prefix_keys is a hint: a chain too long for one declaration keeps its tail, and one that
    cannot be declared (a page twice, not hashes, a dead daemon) stores the pages anyway."""
    trace = tmp_path / "sglang.jsonl"
    pool = HostPool(4)
    pool.fill(5)
    cfg = small_config(nvme_dir, trace={"path": str(trace)}, namespaces={"sglang": {"access": "prefix"}})
    backend = _backend(pool, config=cfg)
    long = [f"h{i}" for i in range(MAX_CHAIN + 10)]
    try:
        info = HiCacheStorageExtraInfo
        assert backend.batch_set_v1(["x0"], _indices([0]), info(prefix_keys=long)) == [True]
        assert backend.batch_set_v1(["x1"], _indices([1]), info(prefix_keys=["x0", "x1"])) == [True]  # x1 twice
        assert backend.batch_set_v1(["x2"], _indices([2]), info(prefix_keys="x1")) == [True]
        assert backend.batch_set_v1(["x3"], _indices([3]), info(prefix_keys=[1, None])) == [True]
        assert backend.batch_set_v1(["x3"], _indices([3]), info(prefix_keys=[])) == [True]
        assert backend.batch_exists(["x0", "x1", "x2", "x3"]) == 4
    finally:
        backend.close()
    parents = {e.key: e.parent for e in read_trace(trace) if e.op == "put"}
    # The longest chain declared (its last MAX_CHAIN keys) still gives the page its parent.
    assert parents[backend.key("x0")] == backend.key(long[-1])
    assert parents[backend.key("x1")] == ""

    d = Daemon(nvme_dir / "d", namespaces={"sglang": {"access": "prefix"}}).start()
    backend = _backend(pool, socket=str(d.socket))
    try:
        assert backend.batch_set_v1(["y0"], _indices([0]), HiCacheStorageExtraInfo(prefix_keys=long)) == [True]
        d.kill()
        assert backend.batch_set_v1(["y1"], _indices([1]), HiCacheStorageExtraInfo(prefix_keys=["y0"])) == [False]
    finally:
        backend.close()
        d.close()


# -- the v2 calls: extra pools (HybridCacheController), the contract of SGLang's HiCacheFile ----------


class Pools:
    """One engine's host pools as SGLang's HybridCacheController registers them: the KV anchor, a
    Mamba state pool, a DSA indexer pool (KV-derived: it takes the KV pages' host indices) and a
    sliding-window KV pool (registered under a plain string name)."""

    def __init__(self, seed: int) -> None:
        self.kv, self.mamba, self.indexer, self.swa = HostPool(8), StatePool(8), IndexerPool(8), HostPool(8)
        for i, pool in enumerate((self.kv, self.mamba, self.indexer, self.swa)):
            pool.fill(seed + i)

    def register(self, backend: Any) -> Any:
        backend.register_mem_pool_host(self.kv)
        for pool, name in ((self.kv, PoolName.KV), (self.mamba, PoolName.MAMBA), (self.indexer, PoolName.INDEXER),
                           (self.swa, "swa")):
            backend.register_mem_host_pool_v2(pool, name)
        backend.on_host_pools_registered()
        return backend


@pytest.fixture(params=["daemon", "embedded"])
def engines(request: pytest.FixtureRequest, nvme_dir: Path) -> Iterator[Callable[[Pools], Any]]:
    """Builds backends through SGLang's factory, each with its pools registered: all on one real
    daemon, or (embedded) sharing the first one's store."""
    made: list[Any] = []
    d = Daemon(nvme_dir).start() if request.param == "daemon" else None

    def make(pools: Pools, **kw: Any) -> Any:
        if d is not None:
            backend = StorageBackendFactory.create_backend("dynamic", _config(socket=str(d.socket), **kw), pools.kv)
        elif not made:
            backend = StorageBackendFactory.create_backend("dynamic", _config(config=small_config(nvme_dir), **kw),
                                                           pools.kv)
        else:
            from tierd.integrations.sglang import TierdHiCacheStorage

            backend = TierdHiCacheStorage(_config(**kw), store=made[0].store)
        made.append(backend)
        return pools.register(backend)

    try:
        yield make
    finally:
        for backend in reversed(made):
            backend.close()
        if d is not None:
            d.close()


def _transfer(name: Any, keys: list[str], host_indices: torch.Tensor, policy: PoolHitPolicy = PoolHitPolicy.ALL_PAGES,
              ) -> PoolTransfer:
    return PoolTransfer(name=name, keys=keys, host_indices=host_indices, hit_policy=policy)


def _slots(slots: list[int]) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.int64)


KEYS = [f"page{i}" for i in range(5)]


def test_v2_pages_round_trip_per_pool(engines: Callable[[Pools], Any]) -> None:
    """batch_set_v2 answers {pool name: [stored per key]} (the transfer's own name object as the key),
    batch_get_v2 loads each pool's pages into another engine's slots: the same bytes."""
    src, dst = Pools(20), Pools(40)
    writer, reader = engines(src), engines(dst)
    trailing = PoolHitPolicy.TRAILING_PAGES
    stored = writer.batch_set_v2([
        _transfer(PoolName.INDEXER, KEYS[:4], _indices([0, 1, 2, 3])),  # KV-derived: the KV pages' indices
        _transfer(PoolName.MAMBA, KEYS[3:4], _slots([5]), trailing),
        _transfer("swa", KEYS[2:4], _indices([6, 7]), trailing),
    ])
    assert stored == {PoolName.INDEXER: [True] * 4, PoolName.MAMBA: [True], "swa": [True, True]}
    untouched = dst.mamba.slot(1).clone()
    loaded = reader.batch_get_v2([
        _transfer(PoolName.INDEXER, KEYS[:4], _indices([7, 6, 5, 4])),
        _transfer(PoolName.MAMBA, [KEYS[3], "missing"], _slots([0, 1]), trailing),
        _transfer("swa", KEYS[2:4], _indices([0, 1]), trailing),
    ])
    assert loaded == {PoolName.INDEXER: [True] * 4, PoolName.MAMBA: [True, False], "swa": [True, True]}
    for i in range(4):
        assert torch.equal(dst.indexer.get_data_page((7 - i) * PAGE), src.indexer.get_data_page(i * PAGE))
    assert torch.equal(dst.mamba.slot(0), src.mamba.slot(5))
    assert torch.equal(dst.mamba.slot(1), untouched)  # a miss loads nothing
    assert torch.equal(dst.swa.get_data_page(0), src.swa.get_data_page(6 * PAGE))
    assert torch.equal(dst.swa.get_data_page(PAGE), src.swa.get_data_page(7 * PAGE))
    assert writer.batch_set_v2([]) == {} and reader.batch_get_v2([]) == {}


def test_v2_exists_folds_each_pools_hit_policy(engines: Callable[[Pools], Any]) -> None:
    """batch_exists_v2: the KV prefix, cut by every pool: all_pages needs each page of the prefix,
    trailing_pages the last N before its end (so 2 and 4 pages may be usable and 3 not); each pool's
    own boundary is reported unless it is 0, and a prefix no pool leaves usable ends the fold."""
    pools = Pools(60)
    backend = engines(pools)
    trailing = PoolHitPolicy.TRAILING_PAGES
    assert backend.batch_exists_v2(KEYS) == PoolTransferResult(0, {}, [])
    assert backend.batch_set_v1(KEYS, _indices([0, 1, 2, 3, 4])) == [True] * 5
    assert backend.batch_set_v2([
        _transfer(PoolName.INDEXER, KEYS[:3], _indices([0, 1, 2])),
        _transfer(PoolName.MAMBA, [KEYS[1], KEYS[3]], _slots([1, 3]), trailing),  # states after pages 2 and 4
        _transfer("swa", KEYS[2:4], _indices([2, 3]), trailing),
    ]) == {PoolName.INDEXER: [True] * 3, PoolName.MAMBA: [True, True], "swa": [True, True]}

    def exists(*transfers: PoolTransfer, keys: list[str] = KEYS) -> tuple[int, dict[Any, int], list[int] | None]:
        got = backend.batch_exists_v2(keys, list(transfers))
        return got.kv_hit_pages, got.extra_pool_hit_pages, got.restorable_prefix_pages

    indexer = PoolTransfer(name=PoolName.INDEXER)  # all_pages: the call's keys, every one
    mamba = PoolTransfer(name=PoolName.MAMBA, keys=["any"], hit_policy=trailing)  # a window of 1 state
    swa = PoolTransfer(name="swa", keys=["a", "b"], hit_policy=trailing)  # a window of 2 pages
    assert exists() == (5, {PoolName.KV: 5}, [1, 2, 3, 4, 5])
    assert exists(indexer) == (3, {PoolName.KV: 5, PoolName.INDEXER: 3}, [1, 2, 3])
    assert exists(mamba) == (4, {PoolName.KV: 5, PoolName.MAMBA: 4}, [2, 4])
    assert exists(swa) == (4, {PoolName.KV: 5, "swa": 4}, [4])
    assert exists(indexer, mamba) == (2, {PoolName.KV: 5, PoolName.INDEXER: 3, PoolName.MAMBA: 4}, [2])
    assert exists(indexer, swa) == (0, {PoolName.KV: 5, PoolName.INDEXER: 3, "swa": 4}, [])
    # Nothing usable is left after swa and indexer: the pool after them gets no verdict.
    assert exists(swa, indexer, mamba) == (0, {PoolName.KV: 5, "swa": 4, PoolName.INDEXER: 3}, [])
    nothing = PoolTransfer(name=PoolName.DRAFT, hit_policy=trailing)  # no pages (nor pool) at all
    assert exists(nothing, indexer) == (0, {PoolName.KV: 5}, [])
    # The KV prefix bounds every pool: a missing page, a key tierd cannot take.
    assert exists(mamba, keys=KEYS[:2] + ["missing"] + KEYS[3:]) == (2, {PoolName.KV: 2, PoolName.MAMBA: 2}, [2])
    assert exists(indexer, keys=KEYS[:1] + ["x\0"] + KEYS[2:]) == (1, {PoolName.KV: 1, PoolName.INDEXER: 1}, [1])
    # A pool named kv is the KV pages themselves.
    assert exists(PoolTransfer(name=PoolName.KV)) == (5, {PoolName.KV: 5}, [1, 2, 3, 4, 5])
    # block_groups (no SGLang backend supports it): a miss, logged, never an error raised into SGLang.
    blocks = PoolTransfer(name=PoolName.INDEXER, hit_policy=PoolHitPolicy.BLOCK_GROUPS)
    assert backend.batch_exists_v2(KEYS, [blocks]) == PoolTransferResult(0, {}, [])


def test_v2_bad_items_fail_alone_and_stored_keys_are_kept(engines: Callable[[Pools], Any]) -> None:
    pools, other = Pools(80), Pools(90)
    backend, reader = engines(pools), engines(other)
    trailing = PoolHitPolicy.TRAILING_PAGES
    got = backend.batch_set_v2([
        _transfer(PoolName.MAMBA, ["s0", "s1", "s\0", "s3"], _slots([0, 8, 2, -1]), trailing),  # 8: past the pool
        _transfer(PoolName.INDEXER, KEYS[:2], _indices([0])),  # one page's indices for two keys: none moved
        _transfer(PoolName.SWA, KEYS[:1], _indices([0])),  # never registered under this name
        _transfer("swa", ["w" * 2000, "w1"], _indices([0, 1])),
    ])
    assert got == {PoolName.MAMBA: [True, False, False, False], PoolName.INDEXER: [False, False],
                   PoolName.SWA: [False], "swa": [False, True]}
    # Nothing was stored for a failed item: the KV pages are there, the pool's pages are not.
    assert backend.batch_set_v1(["s0", "s1", "s3", "w1"], _indices([0, 1, 2, 3])) == [True] * 4
    mamba = PoolTransfer(name=PoolName.MAMBA, keys=["x"], hit_policy=trailing)
    assert backend.batch_exists_v2(["s0", "s1", "s3"], [mamba]).restorable_prefix_pages == [1]
    assert backend.batch_exists_v2(KEYS[:2], [PoolTransfer(name=PoolName.INDEXER)]).kv_hit_pages == 0

    # A stored key is kept, as HiCacheFile keeps a page whose file exists: reported stored, not rewritten.
    before = pools.mamba.slot(0).clone()
    pools.mamba.fill(99)
    assert backend.batch_set_v2([_transfer(PoolName.MAMBA, ["s0"], _slots([0]), trailing)]) == {PoolName.MAMBA: [True]}
    loaded = reader.batch_get_v2([_transfer(PoolName.MAMBA, ["s0", "s\0", "s1"], _slots([3, 4, 9]), trailing)])
    assert loaded == {PoolName.MAMBA: [True, False, False]}
    assert torch.equal(other.mamba.slot(3), before)


def test_v2_kv_pool_is_the_v1_pages_and_mla_shares_all_but_state(engines: Callable[[Pools], Any]) -> None:
    """A pool named kv moves the same pages as batch_set_v1/batch_get_v1. Under MLA the KV and indexer
    pages are every TP rank's, Mamba state each rank's own (as SGLang's file backend keys them)."""
    src, dst = Pools(100), Pools(110)
    writer, reader = engines(src), engines(dst)
    assert writer.batch_set_v2([_transfer(PoolName.KV, KEYS[:2], _indices([0, 1]))]) == {PoolName.KV: [True, True]}
    assert reader.batch_exists(KEYS[:2]) == 2
    assert reader.batch_get_v1(KEYS[:2], _indices([3, 4])) == [True, True]
    assert torch.equal(dst.kv.get_data_page(3 * PAGE), src.kv.get_data_page(0))
    assert writer.batch_set_v1(KEYS[2:3], _indices([2])) == [True]
    assert reader.batch_get_v2([_transfer(PoolName.KV, KEYS[2:3], _indices([5]))]) == {PoolName.KV: [True]}
    assert torch.equal(dst.kv.get_data_page(5 * PAGE), src.kv.get_data_page(2 * PAGE))

    rank0, rank1 = engines(Pools(120), tp_size=2, mla=True), engines(Pools(130), tp_rank=1, tp_size=2, mla=True)
    trailing = PoolHitPolicy.TRAILING_PAGES
    assert rank0.batch_set_v1(["m0"], _indices([0])) == [True]
    assert rank0.batch_set_v2([_transfer(PoolName.INDEXER, ["m0"], _indices([0])),
                               _transfer(PoolName.MAMBA, ["m0"], _slots([0]), trailing)]) == {
        PoolName.INDEXER: [True], PoolName.MAMBA: [True]}
    pools = [PoolTransfer(name=PoolName.INDEXER), PoolTransfer(name=PoolName.MAMBA, keys=["m0"], hit_policy=trailing)]
    assert rank0.batch_exists_v2(["m0"], pools).kv_hit_pages == 1
    assert rank1.batch_exists_v2(["m0"], pools[:1]).kv_hit_pages == 1
    assert rank1.batch_exists_v2(["m0"], pools).kv_hit_pages == 0


def test_a_daemon_killed_and_restarted_is_a_miss_then_serves_again(daemon: Daemon,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """kill -9 of the daemon as SGLang sees it: every call answers a miss (no exception reaches
    SGLang, which recomputes), the outage is logged once; a new daemon on the same socket is served
    again by the same backend, with no engine restart (the store reconnects by itself)."""
    pools = Pools(140)
    backend = pools.register(_backend(pools.kv, socket=str(daemon.socket)))
    trailing = PoolHitPolicy.TRAILING_PAGES
    mamba = [_transfer(PoolName.MAMBA, ["a"], _slots([0]), trailing)]
    try:
        assert backend.batch_set_v1(["a"], _indices([0])) == [True]
        assert backend.batch_set_v2(mamba) == {PoolName.MAMBA: [True]}
        daemon.kill()
        with caplog.at_level(logging.DEBUG, logger="tierd.integrations.sglang"):
            assert backend.batch_exists(["a"]) == 0 and backend.exists("a") is False
            assert backend.batch_exists_v2(["a"], mamba) == PoolTransferResult(0, {}, [])
            assert backend.batch_get_v1(["a"], _indices([1])) == [False]
            assert backend.batch_get_v2(mamba) == {PoolName.MAMBA: [False]}
            assert backend.batch_set_v1(["b", "c"], _indices([1, 2])) == [False, False]
            assert backend.batch_set_v2(mamba) == {PoolName.MAMBA: [False]}
            assert backend.get("a", pools.kv.get_dummy_flat_data_page()) is None
            assert backend.batch_get(["a"]) == [None]
            assert backend.set("b", pools.kv.get_data_page(0)) is False
            assert backend.clear() is False
        outages = [r for r in caplog.records if r.levelno >= logging.WARNING and "misses until" in r.message]
        assert len(outages) == 1, [r.message for r in caplog.records]

        daemon.start()  # a new daemon on the same socket
        # The store reconnects on a call after the daemon is back; poll (a call just before it
        # accepted connections may have failed), never sleep.
        assert wait_until(lambda: backend.batch_set_v1(["b"], _indices([1])) == [True], timeout_s=30)
        assert backend.batch_exists(["b"]) == 1 and backend.exists("b")
        assert backend.batch_set_v2([_transfer(PoolName.MAMBA, ["b"], _slots([1]), trailing)]) == {
            PoolName.MAMBA: [True]}
        dst = Pools(150)
        reader = dst.register(_backend(dst.kv, socket=str(daemon.socket)))
        try:
            assert reader.batch_get_v1(["b"], _indices([5])) == [True]
            assert torch.equal(dst.kv.get_data_page(5 * PAGE), pools.kv.get_data_page(PAGE))
            assert reader.batch_exists_v2(["b"], [PoolTransfer(name=PoolName.MAMBA, hit_policy=trailing)]).kv_hit_pages == 1
        finally:
            reader.close()
        assert backend.clear() is True
    finally:
        backend.close()
    with pytest.raises(tierd.DaemonUnavailable, match="tierd serve"):
        _backend(None, socket="/tmp/no-such-tierd.sock")
