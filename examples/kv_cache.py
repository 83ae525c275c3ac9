"""Fill a prefix KV cache with a few conversations, then reuse it.

    python examples/kv_cache.py

Runs on a CPU-only machine with a toy KV shape (4 layers, 2 KV heads,
head_dim 64, 64-token blocks). Every request shares a system prompt; turns
of one conversation extend the previous turn. The second time round, the
shared prefix is found in the store and only the new tokens would need a
prefill. Set TIERD_REDIS=redis://127.0.0.1:6379/0 to also keep write-through
copies in Redis, where another machine's store would find them.
"""

from __future__ import annotations

import os
import tempfile

import torch

import tierd

LAYERS, HEADS, DIM, BLOCK = 4, 2, 64, 64


def prefill(tokens: list[int]) -> torch.Tensor:
    """Stand-in for a model's prefill. Like a real causal model, the KV of a
    position depends only on the tokens up to it, so a cached prefix is exact."""
    blocks = []
    for end in range(BLOCK, len(tokens) + BLOCK, BLOCK):
        g = torch.Generator().manual_seed(hash(tuple(tokens[:end])) % (2**31))
        n = min(end, len(tokens)) - (end - BLOCK)
        blocks.append(torch.randn(LAYERS, 2, n, HEADS, DIM, generator=g))
    return torch.cat(blocks, dim=2).to(torch.bfloat16)


with tempfile.TemporaryDirectory() as nvme:
    config: dict = {"tiers": {"host": {"size": "64MiB"}, "nvme": {"path": nvme, "size": "1GiB"}},
                    "namespaces": {"kv": {"policy": "gdsf"}}}
    if os.environ.get("TIERD_REDIS"):
        config["tiers"]["remote"] = {"url": os.environ["TIERD_REDIS"]}
        config["namespaces"]["kv"]["write_through"] = True
    with tierd.open(config) as store:
        kv = tierd.PrefixKVStore(store, model="toy-model", block_tokens=BLOCK)
        system = list(range(1000, 1000 + 3 * BLOCK))  # a 192-token system prompt every request shares
        computed = reused = 0
        for conversation in range(4):
            history = system + [conversation] * BLOCK
            for turn in range(3):
                history = history + [conversation * 100 + turn] * BLOCK  # the user's next message
                hit = kv.lookup(history)
                if hit:
                    cached = kv.get(history)  # [layers, 2, hit, heads, dim]
                    assert torch.equal(cached, prefill(history)[:, :, :hit])  # exactly what prefill gives
                computed += len(history) - hit  # what a real server would still prefill
                reused += hit
                kv.put(history, prefill(history))
        print(f"tokens reused from the cache: {reused}, computed: {computed}")
        print(f"reuse ratio: {reused / (reused + computed):.2f}")
        host = store.stats()["host"]
        print(f"blocks stored: {len(store.keys('kv/'))}, host tier {host.used_bytes >> 10} KiB used")
        assert reused > computed
