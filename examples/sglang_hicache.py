"""tierd as SGLang's HiCache storage (L3), created by SGLang's own backend factory.

    bash .ci/engines            # SGLang's CPU install (../shared/INTEGRATIONS.md)
    python examples/sglang_hicache.py

A server would load it with::

    python -m sglang.launch_server ... --enable-hierarchical-cache \\
        --hicache-storage-backend dynamic --hicache-storage-backend-extra-config \\
        '{"backend_name": "tierd", "interface_v1": 1, "module_path": "tierd.integrations.sglang",
          "class_name": "TierdHiCacheStorage", "hicache_storage_pass_prefix_keys": true}'

Here an embedded store stands in for the daemon (add ``"socket": PATH`` to
share one daemon between processes), and ``PageFirstPool`` for SGLang's host
KV pool (its module needs SGLang's GPU runtime): the same buffer shape and
page views as ``MHATokenToKVPoolHost`` in the page_first layout. Pages go
from one pool into tierd and back into other slots, one copy each way.

Then a hybrid model's extra pool, as SGLang's ``HybridCacheController`` uses
it: ``StatePool`` stands in for a Mamba state pool (one slot a page),
registered by name and moved with the v2 calls; ``batch_exists_v2`` answers
the prefix usable with both pools (a state is needed after the prefix's last
page).
"""
# requires: sglang.srt.mem_cache.storage.backend_factory

from __future__ import annotations

import tempfile

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
)
from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

PAGE, LAYERS, HEADS, DIM = 64, 8, 8, 128  # a page: 64 tokens x 8 layers of K and V, 2 MiB in bf16


class PageFirstPool:
    def __init__(self, pages: int) -> None:
        self.page_size, self.layout, self.dtype = PAGE, "page_first", torch.bfloat16
        self.kv_buffer = torch.zeros(2, pages * PAGE, LAYERS, HEADS, DIM, dtype=self.dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[:, index : index + self.page_size]
        return page.flatten() if flat else page


class StatePool:
    def __init__(self, slots: int) -> None:
        self.page_size, self.layout, self.dtype, self.size = 1, "layer_first", torch.float32, slots
        self.state = torch.randn(slots, LAYERS, 256)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        return self.state[index].flatten()

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(LAYERS * 256)

    def set_from_flat_data_page(self, index: int, page: torch.Tensor) -> None:
        self.state[index].copy_(page.reshape(LAYERS, 256))


def slots(pages: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(p * PAGE, (p + 1) * PAGE) for p in pages])


with tempfile.TemporaryDirectory() as tmp:
    extra = {"backend_name": "tierd", "interface_v1": 1, "module_path": "tierd.integrations.sglang",
             "class_name": "TierdHiCacheStorage",
             "config": {"tiers": {"host": {"size": "256MiB"}, "nvme": {"path": tmp, "size": "1GiB"}},
                        "namespaces": {"sglang": {"access": "prefix"}}}}
    cfg = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                               is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                               model_name="meta-llama/Llama-3.1-8B", extra_config=extra)
    pool = PageFirstPool(16)
    pool.kv_buffer.copy_(torch.randn(pool.kv_buffer.shape))
    storage = StorageBackendFactory.create_backend("dynamic", cfg, pool)
    storage.register_mem_pool_host(pool)
    try:
        hashes = [f"page-{i}" for i in range(8)]
        # One sequence's pages, 4 a call, as SGLang's backup stores them; with
        # hicache_storage_pass_prefix_keys each call's prefix_keys + keys is the chain from the
        # sequence start, which tierd declares to the namespace (a prefix cache here).
        stored = [storage.batch_set_v1(hashes[i : i + 4], slots(list(range(i, i + 4))),
                                       HiCacheStorageExtraInfo(prefix_keys=hashes[:i]))
                  for i in (0, 4)]
        print("stored:", stored[0] + stored[1])
        print("hit prefix (pages):", storage.batch_exists(hashes[:5] + ["not-stored"] + hashes[5:]))
        before = pool.kv_buffer[:, : 8 * PAGE].clone()
        print("loaded:", storage.batch_get_v1(hashes, slots(list(range(8, 16)))))
        same = torch.equal(pool.kv_buffer[:, 8 * PAGE :], before)
        print("pages 8..15 equal pages 0..7:", same)
        assert same

        # A Mamba state after pages 4 and 8 (the ends of the two calls above).
        states = StatePool(4)
        storage.register_mem_host_pool_v2(states, PoolName.MAMBA)
        trailing = PoolHitPolicy.TRAILING_PAGES
        print("states stored:", storage.batch_set_v2([PoolTransfer(
            name=PoolName.MAMBA, keys=[hashes[3], hashes[7]], host_indices=torch.tensor([0, 1]),
            hit_policy=trailing)]))
        usable = storage.batch_exists_v2(hashes, [PoolTransfer(name=PoolName.MAMBA, keys=["last"],
                                                               hit_policy=trailing)])
        print("usable prefixes (pages):", usable.restorable_prefix_pages, "-> loads", usable.kv_hit_pages)
        assert usable.restorable_prefix_pages == [4, 8]
    finally:
        storage.close()
