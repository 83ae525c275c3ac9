"""Two chat requests that share a system prompt: the second reuses the first's KV from tierd.

    python examples/transformers_cache.py

Runs on a CPU-only machine in a few seconds: a small Llama built from its config
(random weights, no download), a store with a 256 MiB host tier and an nvme tier
in a temporary directory. ``TierdCache`` keeps each layer's KV in the store
between uses (offload) and, given ``prompt=``, loads the longest stored prefix of
the prompt, so ``generate()`` computes only the rest; after the prefill it stores
the prompt's blocks for the next request.
"""
# requires: transformers

from __future__ import annotations

import tempfile
import time
from typing import Any

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

import tierd
from tierd.integrations.transformers import TierdCache, model_fingerprint


class FirstToken(BaseStreamer):
    """Records when generate() hands out its first new token (its first put is the prompt)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.calls = 0
        self.ttft_s = float("nan")

    def put(self, value: Any) -> None:
        self.calls += 1
        if self.calls == 2:
            self.ttft_s = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def run(model: Any, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, float]:
    streamer = FirstToken()
    out = model.generate(ids, cache=cache, max_new_tokens=16, do_sample=False, streamer=streamer)
    return out, streamer.ttft_s


torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)).eval()
model_id = model_fingerprint(model)  # weights and config: once, for every request
g = torch.Generator().manual_seed(1)
system = torch.randint(1, 1024, (768,), generator=g)  # the shared system prompt
first = torch.cat([system, torch.randint(1, 1024, (40,), generator=g)])[None]
second = torch.cat([system, torch.randint(1, 1024, (40,), generator=g)])[None]
run(model, first[:, :64], DynamicCache(config=model.config))  # warm-up: first-call costs off the clock

with tempfile.TemporaryDirectory() as nvme:
    config = {"tiers": {"host": {"size": "256MiB"}, "nvme": {"path": nvme, "size": "1GiB"}}}
    with tierd.open(config) as store:
        with TierdCache(store, model, prompt=first, model_id=model_id) as cache:
            _, ttft_first = run(model, first, cache)
            print(f"request 1: {first.shape[1]} prompt tokens, reused {cache.reused_tokens}, "
                  f"time to first token {ttft_first * 1e3:.1f} ms")
        expected, ttft_default = run(model, second, DynamicCache(config=model.config))
        with TierdCache(store, model, prompt=second, model_id=model_id) as cache:
            out, ttft_reuse = run(model, second, cache)
            print(f"request 2: {second.shape[1]} prompt tokens, reused {cache.reused_tokens}, "
                  f"time to first token {ttft_reuse * 1e3:.1f} ms "
                  f"(transformers' DynamicCache, nothing reused: {ttft_default * 1e3:.1f} ms)")
        assert cache.reused_tokens == 768 and torch.equal(out, expected)  # the same tokens, greedy
        print(f"same output as without reuse; {len(store.keys('kv/'))} KV blocks stored, "
              f"host tier {store.stats()['host'].used_bytes >> 20} MiB used")
