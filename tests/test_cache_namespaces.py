"""Cache namespaces: full tiers drop volatile cache objects to admit new ones; nothing else is lost.

Tiers of 16 MiB host and 64 MiB nvme, objects of 1 MiB: writing 8x the total
capacity into a cache namespace must keep succeeding, while a non-cache
namespace keeps today's contract (OutOfSpace, nothing lost).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import tierd
from conftest import small_config

MiB = 1 << 20
HOST, NVME = 16 * MiB, 64 * MiB
TOTAL = HOST + NVME


def block(i: int) -> torch.Tensor:
    """1 MiB whose contents say which block it is."""
    return torch.full((MiB // 4,), float(i))


def open_small(nvme_dir: Path, **namespaces: dict[str, Any]) -> tierd.Store:
    cfg = small_config(nvme_dir, host="16MiB", nvme="64MiB", namespaces=namespaces)
    return tierd.open(cfg)


@pytest.fixture
def store(nvme_dir: Path) -> Iterator[tierd.Store]:
    with open_small(nvme_dir) as s:
        yield s


def fill(store: tierd.Store, ns: str, n: int, start: int = 0, **options: Any) -> list[str]:
    keys = []
    for i in range(start, start + n):
        store.put(f"{ns}/b{i}", block(i), **options)
        keys.append(f"{ns}/b{i}")
    return keys


def readable(store: tierd.Store, keys: list[str]) -> list[str]:
    """The keys that read back with their own contents (an evicted one is a miss, never other bytes)."""
    out = []
    for key in keys:
        try:
            value = store.get(key)
        except tierd.NotFound:
            continue
        assert torch.equal(value, block(int(key.rsplit("b", 1)[1]))), key
        out.append(key)
    return out


def nvme_bytes(store: tierd.Store, keys: list[str]) -> int:
    return sum(store.info(k).nbytes for k in keys if store.exists(k) and "nvme" in store.info(k).tiers)


def test_a_cache_namespace_written_at_8x_its_tiers_never_fails(store: tierd.Store) -> None:
    keys = fill(store, "kv", 8 * TOTAL // MiB)  # raises OutOfSpace if room is never made
    kept = readable(store, keys)
    assert keys[-1] in kept and keys[0] not in kept
    assert len(kept) >= (TOTAL // MiB) // 2  # the tiers stay in use, not emptied
    with pytest.raises(tierd.NotFound):
        store.get(keys[0])
    assert not store.exists(keys[0])
    evicted = sum(t.evicted for t in store.stats().tiers.values())
    assert evicted >= len(keys) - len(kept)  # every dropped object counted


def test_a_non_cache_namespace_gets_out_of_space_and_loses_nothing(store: tierd.Store) -> None:
    keys: list[str] = []
    with pytest.raises(tierd.OutOfSpace, match="acts") as err:
        for i in range(2 * TOTAL // MiB):
            store.put(f"acts/b{i}", block(i))
            keys.append(f"acts/b{i}")
    assert "cache = true" in str(err.value)
    assert readable(store, keys) == keys
    assert sum(t.evicted for t in store.stats().tiers.values()) == 0


def test_cache_objects_give_way_to_a_non_cache_namespace(store: tierd.Store) -> None:
    fill(store, "kv", 2 * TOTAL // MiB)
    acts = fill(store, "acts", (TOTAL // MiB) // 2)  # the kv blocks holding the room are dropped for these
    assert readable(store, acts) == acts


def test_durable_and_pinned_cache_objects_are_never_dropped(store: tierd.Store) -> None:
    durable = fill(store, "kv", 8, durable=True)
    pinned = fill(store, "kv", 4, start=100, pin=True)
    fill(store, "kv", 4 * TOTAL // MiB, start=1000)
    assert readable(store, durable) == durable
    assert readable(store, pinned) == pinned


def test_full_tiers_holding_only_durable_data_refuse_with_a_clear_error(store: tierd.Store) -> None:
    durable: list[str] = []
    with pytest.raises(tierd.OutOfSpace) as err:
        for i in range(2 * TOTAL // MiB):
            store.put(f"ckpt/b{i}", block(i), durable=True)
            durable.append(f"ckpt/b{i}")
    assert "ckpt" in str(err.value)
    # A cache namespace still works in what durable objects leave (host), dropping its own blocks.
    kv = fill(store, "kv", 2 * HOST // MiB)
    assert readable(store, kv[-1:]) == kv[-1:]  # first: reading older blocks reorders their recency
    assert readable(store, durable) == durable


def test_two_cache_namespaces_share_the_lowest_tier(store: tierd.Store) -> None:
    """The engine filling everything first keeps about half of nvme while another writes 4x the tiers."""
    first = fill(store, "lmcache", 2 * TOTAL // MiB)
    second = fill(store, "sglang", 4 * TOTAL // MiB)
    held_first, held_second = nvme_bytes(store, first), nvme_bytes(store, second)
    assert held_first >= 0.4 * NVME, (held_first, held_second)  # LRU alone would leave it none
    assert held_second >= 0.4 * NVME, (held_first, held_second)


def test_a_configured_share_bounds_what_a_namespace_keeps(nvme_dir: Path) -> None:
    with open_small(nvme_dir, lmcache={"share": 0.25}) as store:
        first = fill(store, "lmcache", 2 * TOTAL // MiB)
        second = fill(store, "sglang", 4 * TOTAL // MiB)
        held_first, held_second = nvme_bytes(store, first), nvme_bytes(store, second)
        assert 0.15 * NVME <= held_first <= 0.35 * NVME, (held_first, held_second)


def test_cache_can_be_switched_off_and_on(nvme_dir: Path) -> None:
    with open_small(nvme_dir, kv={"cache": False}, mine={"cache": True}) as store:
        fill(store, "mine", 2 * TOTAL // MiB)
        with pytest.raises(tierd.OutOfSpace):
            fill(store, "kv", 2 * TOTAL // MiB)


def test_a_cache_namespace_cannot_be_durable(nvme_dir: Path) -> None:
    with pytest.raises(tierd.ConfigError, match="cache = true and durable = true"):
        open_small(nvme_dir, kv={"cache": True, "durable": True})


def test_a_daemon_serves_a_cache_namespace_past_its_tiers(daemon: Any) -> None:
    """Through ``tierd serve`` (32 MiB host, 256 MiB nvme): 2x the tiers of 1 MiB blocks, every put stored."""
    with daemon.connect() as store:
        keys = fill(store, "kv", 2 * (32 + 256))
        assert keys[-1] in readable(store, keys[-8:])
        assert store.stats().tiers["nvme"].evicted > 0
        status = store.status()
        assert "kv" in str(status)


@pytest.mark.parametrize("policy", ["prefix", "s3fifo", "gdsf", "schedule"])
def test_every_eviction_policy_makes_room_in_a_full_cache(nvme_dir: Path, policy: str) -> None:
    """Drops follow the namespace's own policy on nvme; each must offer victims there (the prefix
    policy, told each conversation's chain by PrefixKVStore, offers chains' tails)."""
    ns = {"access": "prefix"} if policy == "prefix" else {"policy": policy}
    with open_small(nvme_dir, kv=ns) as store:
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=16)
        for conv in range(2 * TOTAL // (2 * MiB)):  # 2x the tiers, 2 MiB conversations of 8 blocks
            tokens = list(range(conv * 1000, conv * 1000 + 128))
            kv.put(tokens, torch.full((4, 2, 128, 8, 128), float(conv), dtype=torch.bfloat16))
        assert torch.equal(kv.get(tokens), torch.full((4, 2, 128, 8, 128), float(conv), dtype=torch.bfloat16))
        assert store.stats().tiers["nvme"].evicted > 0
