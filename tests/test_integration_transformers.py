"""TierdCache with real transformers models (tiny, built from configs with fixed seeds: no downloads).

Each equality test compares greedy ``generate()`` with TierdCache against transformers' default
DynamicCache, token for token. float32 is enough: a prefix's KV loaded from the store is bitwise
the one a full prefill computes on these models (checked: the logits match exactly), so no
test needs float64.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config

import tierd

transformers = pytest.importorskip("transformers")

from transformers import DynamicCache  # noqa: E402

from tierd.integrations.transformers import TierdCache, model_fingerprint  # noqa: E402

NEW = 12  # tokens generated per request
PAD = 0  # never drawn as a prompt token: generate() masks pad tokens it finds in the input


def llama(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                  bos_token_id=1, eos_token_id=None, pad_token_id=PAD)
    return transformers.GPT2LMHeadModel(cfg).eval()


def qwen2_sliding(seed: int = 0) -> Any:
    """Layer 0 full attention, layers 1 and 2 a 16-token sliding window."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                   sliding_window=16, max_window_layers=1, pad_token_id=PAD)
    return transformers.Qwen2ForCausalLM(cfg).eval()


MODELS = {"llama": llama, "gpt2": gpt2}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request: pytest.FixtureRequest) -> Any:
    return MODELS[request.param]()


@pytest.fixture
def store(nvme_dir: Path) -> Iterator[tierd.Store]:
    with tierd.open(small_config(nvme_dir)) as s:
        yield s


def tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(seed))


def prompt(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat(parts)[None]


def generate(model: Any, ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> torch.Tensor:
    if cache is not None:
        kwargs["cache"] = cache
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, **kwargs)


class FedTokens:
    """Counts the tokens each forward of ``model`` is fed (a forward pre-hook)."""

    def __init__(self, model: Any) -> None:
        self.per_forward: list[int] = []
        self._handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.per_forward.append(kwargs["input_ids"].shape[1])

    def remove(self) -> None:
        self._handle.remove()


@pytest.mark.parametrize("offload", [True, False])
def test_greedy_output_equals_default_cache(model: Any, store: tierd.Store, offload: bool) -> None:
    ids = prompt(tokens(40, seed=1))
    expected = generate(model, ids)
    with TierdCache(store, model, offload=offload) as cache:
        assert torch.equal(generate(model, ids, cache), expected)
    with TierdCache(store, model, prompt=ids, offload=offload) as cache:  # prompt=, nothing stored yet
        assert torch.equal(generate(model, ids, cache), expected)
        assert cache.reused_tokens == 0


@pytest.mark.parametrize("offload", [True, False])
def test_shared_prefix_is_reused_and_only_the_suffix_computed(model: Any, store: tierd.Store, offload: bool) -> None:
    common = tokens(64, seed=2)
    first, second = prompt(common, tokens(16, seed=3)), prompt(common, tokens(20, seed=4))
    with TierdCache(store, model, prompt=first, offload=offload) as cache:
        generate(model, first, cache)
    # The first request's 80 prompt tokens (5 whole blocks) were stored after its prefill.
    assert cache.prefix.lookup(first) == 80
    expected = generate(model, second)
    fed = FedTokens(model)
    try:
        with TierdCache(store, model, prompt=second, offload=offload) as cache:
            assert cache.reused_tokens == 64  # the common blocks; block 5 differs
            assert cache.get_seq_length() == 64
            out = generate(model, second, cache)
    finally:
        fed.remove()
    assert torch.equal(out, expected)
    assert fed.per_forward == [20] + [1] * (NEW - 1)  # the prefill ran on the suffix only


def test_reuse_stops_one_token_short_of_the_prompt(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(64, seed=5))  # 4 whole blocks
    with TierdCache(store, model, prompt=ids) as cache:
        expected = generate(model, ids, cache)
    with TierdCache(store, model, prompt=ids) as cache:
        assert cache.reused_tokens == 48  # at most 63 tokens, whole blocks: generate computes the rest
        assert torch.equal(generate(model, ids, cache), expected)


def test_other_salt_or_weights_reuse_nothing(store: tierd.Store) -> None:
    ids = prompt(tokens(80, seed=6))
    with TierdCache(store, llama(seed=0), prompt=ids, salt="tenant-a") as cache:
        generate(llama(seed=0), ids, cache)
    assert TierdCache(store, llama(seed=0), prompt=ids, salt="tenant-a", offload=False).reused_tokens == 64
    assert TierdCache(store, llama(seed=0), prompt=ids, salt="tenant-b", offload=False).reused_tokens == 0
    assert TierdCache(store, llama(seed=1), prompt=ids, salt="tenant-a", offload=False).reused_tokens == 0


def test_model_fingerprint_hashes_weights_not_just_config() -> None:
    assert model_fingerprint(llama(seed=0)) == model_fingerprint(llama(seed=0))
    assert model_fingerprint(llama(seed=0)) != model_fingerprint(llama(seed=1))
    assert model_fingerprint(llama(seed=0)) != model_fingerprint(llama(seed=0).to(torch.float64))
    assert model_fingerprint(llama()) != model_fingerprint(gpt2())


def test_save_stores_what_the_cache_holds(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(50, seed=7))
    with TierdCache(store, model) as cache:  # no prompt=: nothing is stored by itself
        out = generate(model, ids, cache)
        assert cache.prefix.lookup(ids) == 0
        # The last generated token has no KV yet: 61 tokens held, 48 in whole blocks.
        assert cache.save(out[0]) == 48
    with TierdCache(store, model, prompt=out[0, :55]) as cache:
        assert cache.reused_tokens == 48
        assert torch.equal(generate(model, out[:, :55], cache), generate(model, out[:, :55]))


def flushed_keys(cache: TierdCache) -> list[str]:
    cache.flush()  # puts run on the cache's worker: wait for those queued so far
    return cache.store.keys(cache.key_prefix)


def test_offload_keeps_layers_in_the_store_while_generating(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(40, seed=8))
    cache = TierdCache(store, model)
    seen: list[tuple[list[str], list[bool]]] = []
    handle = model.register_forward_pre_hook(
        lambda *_: seen.append((flushed_keys(cache), [layer.offloaded for layer in cache.layers])))
    try:
        generate(model, ids, cache)
    finally:
        handle.remove()
    layer_keys = [f"{cache.key_prefix}/{i}/{kv}" for i in range(3) for kv in "kv"]
    assert seen[0] == ([], [False] * 3)  # before the prefill
    for keys, offloaded in seen[1:]:  # before each decode step every layer is in the store, not in memory
        assert keys == layer_keys and offloaded == [True] * 3
    assert store.stats().objects >= len(layer_keys)
    cache.close()


def test_next_layer_is_fetched_while_this_one_runs(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(40, seed=8))
    cache = TierdCache(store, model)
    seen: list[list[tuple[bool, bool]]] = []  # (offloaded, prefetched) per layer, as decoder layer 1 starts
    steps: list[list[bool]] = []  # prefetched per layer, as each forward starts
    handles = [model.model.layers[1].register_forward_pre_hook(
                   lambda *_: seen.append([(layer.offloaded, layer.prefetched) for layer in cache.layers])),
               model.register_forward_pre_hook(lambda *_: steps.append([layer.prefetched for layer in cache.layers]))]
    try:
        generate(model, ids, cache)
    finally:
        for handle in handles:
            handle.remove()
    assert seen[0] == [(True, False), (False, False), (False, False)]  # prefill: layer 0 just put away
    # Decode: layer 0 put away again, layer 1's fetch started as layer 0 was updated, layer 2 not yet.
    assert seen[1:] == [[(True, False), (True, True), (True, False)]] * (NEW - 1)
    # Layer 0's fetch for the next step starts as the last layer is updated.
    assert steps == [[False] * 3] + [[True, False, False]] * (NEW - 1)
    cache.close()


def test_offloaded_layer_reads_back_what_it_put(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(40, seed=8))
    cache = TierdCache(store, model)
    out = generate(model, ids, cache)
    cache.flush()
    assert torch.equal(store.get(f"{cache.key_prefix}/1/k"), cache.layers[1].keys)  # materializes layer 1
    assert cache.get_seq_length() == out.shape[1] - 1
    cache.close()
    assert store.keys(cache.key_prefix) == []
    cache.close()  # idempotent
    with pytest.raises(tierd.StoreClosed, match="closed"):
        generate(model, ids, cache)


def test_offloaded_objects_go_with_reset_and_garbage_collection(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(40, seed=9))
    cache = TierdCache(store, model)
    generate(model, ids, cache)
    prefix = cache.key_prefix
    cache.reset()
    assert cache.get_seq_length() == 0
    cache.close()  # reset queued the deletes; close waits for them
    assert store.keys(prefix) == []
    cache = TierdCache(store, model)
    generate(model, ids, cache)
    prefix = cache.key_prefix
    assert flushed_keys(cache) != []
    del cache
    gc.collect()
    assert store.keys(prefix) == []


def test_cache_methods_materialize_offloaded_layers(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(30, seed=10))
    default, cache = DynamicCache(config=model.config), TierdCache(store, model)
    generate(model, ids, default)
    generate(model, ids, cache)

    def same() -> None:
        assert cache.get_seq_length() == default.get_seq_length()
        for (k1, v1, _), (k2, v2, _) in zip(cache, default, strict=True):
            assert torch.equal(k1, k2) and torch.equal(v1, v2)
        for i in range(3):
            cache.offload(i)  # back into the store for the next method to fetch

    same()
    for c in (cache, default):
        c.crop(-5)
    same()
    for c in (cache, default):
        c.batch_repeat_interleave(2)
    same()
    for c in (cache, default):
        c.reorder_cache(torch.tensor([1, 0]))
        c.batch_select_indices(torch.tensor([1]))
    same()
    cache.close()


def test_beam_search_with_offload(store: tierd.Store) -> None:
    model = llama()
    ids = prompt(tokens(30, seed=11))
    with TierdCache(store, model) as cache:  # beams reorder the offloaded layers every step
        assert torch.equal(generate(model, ids, cache, num_beams=2), generate(model, ids, num_beams=2))


def test_sliding_window_layers_stay_in_memory(store: tierd.Store) -> None:
    model = qwen2_sliding()
    ids = prompt(tokens(40, seed=12))
    with TierdCache(store, model) as cache:
        assert torch.equal(generate(model, ids, cache), generate(model, ids))
        assert flushed_keys(cache) == [f"{cache.key_prefix}/0/k", f"{cache.key_prefix}/0/v"]
        with pytest.raises(tierd.InvalidArgument, match="full attention"):
            cache.save(ids)
    with pytest.raises(tierd.InvalidArgument, match="every layer to be full attention.*sliding_attention"):
        TierdCache(store, model, prompt=ids)


def test_bad_input(store: tierd.Store) -> None:
    model = llama()
    batch = torch.stack([tokens(20, seed=13), tokens(20, seed=14)])
    with pytest.raises(tierd.InvalidArgument, match="batch size 1.*batch of 2"):
        TierdCache(store, model, prompt=batch)
    with TierdCache(store, model, prompt=batch[0]) as cache, pytest.raises(tierd.InvalidArgument, match="batch of 2"):
        generate(model, batch, cache)
    with pytest.raises(tierd.InvalidArgument, match="non-empty integer token ids"):
        TierdCache(store, model, prompt=torch.tensor([], dtype=torch.long))
    with pytest.raises(tierd.InvalidArgument, match="namespace must be"):
        TierdCache(store, model, namespace="kv/x")
    with pytest.raises(tierd.InvalidArgument, match="model_id="):
        TierdCache(store, model.config)
    assert TierdCache(store, model.config, model_id="llama-tiny", offload=False).get_seq_length() == 0
