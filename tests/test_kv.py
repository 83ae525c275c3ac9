"""PrefixKVStore and the remote tier in the engine, with a real redis-server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config
from daemon import Daemon

import tierd
from tierd.testing import wait_until

L, H, D, B = 4, 2, 16, 16  # layers, kv heads, head dim, block tokens
MIB = 1 << 20


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, 2, tokens, H, D, generator=g).to(torch.bfloat16)


def _tokens(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (n,), generator=g).tolist()


@pytest.fixture
def store(nvme_dir: Path) -> Any:
    with tierd.open(small_config(nvme_dir, host="16MiB", nvme="128MiB")) as s:
        yield s


def test_put_lookup_get_round_trip(store: tierd.Store) -> None:
    kv = tierd.PrefixKVStore(store, model="llama-test", block_tokens=B)
    toks, cache = _tokens(5 * B + 7), _kv(5 * B + 7)
    assert kv.put(toks, cache) == 5 * B  # the partial tail block is not stored
    assert kv.lookup(toks) == 5 * B
    assert torch.equal(kv.get(toks), cache[:, :, : 5 * B])
    buffer = torch.zeros(L, 2, 8 * B, H, D, dtype=torch.bfloat16)  # an engine's preallocated KV memory
    got = kv.get(toks, out=buffer)
    assert got.data_ptr() == buffer.data_ptr() and torch.equal(buffer[:, :, : 5 * B], cache[:, :, : 5 * B])
    assert int(buffer[:, :, 5 * B :].count_nonzero()) == 0
    layers = list(kv.get_layers(toks))
    assert len(layers) == L and all(torch.equal(layers[i], cache[i, :, : 5 * B]) for i in range(L))


def test_divergent_suffixes_share_the_prefix_only(store: tierd.Store) -> None:
    kv = tierd.PrefixKVStore(store, model="m", block_tokens=B)
    a = _tokens(4 * B, seed=1)
    b = a[: 2 * B] + _tokens(2 * B, seed=2)  # same first two blocks, then different
    kv.put(a, _kv(4 * B, seed=1))
    assert kv.block_keys(a)[:2] == kv.block_keys(b)[:2] and kv.block_keys(a)[2] != kv.block_keys(b)[2]
    assert kv.lookup(b) == 2 * B
    assert torch.equal(kv.get(b), _kv(4 * B, seed=1)[:, :, : 2 * B])
    # A different model never shares blocks, even for the same tokens.
    assert tierd.PrefixKVStore(store, model="other", block_tokens=B).lookup(a) == 0


def test_every_part_of_the_keyspace_separates_blocks(store: tierd.Store) -> None:
    toks = _tokens(2 * B)
    tierd.PrefixKVStore(store, model="m", block_tokens=B).put(toks, _kv(2 * B))
    assert tierd.PrefixKVStore(store, model="m", block_tokens=B).lookup(toks) == 2 * B
    others = [
        dict(salt="tenant-b"), dict(tp_rank=1, tp_size=2), dict(tp_size=2), dict(dtype=torch.float16),
        dict(model="m2"),
    ]
    for change in others:
        kw = dict(model="m", block_tokens=B) | change
        other = tierd.PrefixKVStore(store, **kw)
        assert other.lookup(toks) == 0, change
        assert not set(other.block_keys(toks)) & set(tierd.PrefixKVStore(store, model="m", block_tokens=B).block_keys(toks))
    with pytest.raises(tierd.InvalidArgument, match="tp_rank"):
        tierd.PrefixKVStore(store, model="m", block_tokens=B, tp_rank=2, tp_size=2)


def test_tokens_shorter_than_a_block(store: tierd.Store) -> None:
    kv = tierd.PrefixKVStore(store, model="m", block_tokens=B)
    short = _tokens(B - 1)
    assert kv.block_keys(short) == []
    assert kv.put(short, _kv(B - 1)) == 0 and kv.lookup(short) == 0
    assert kv.get(short).shape[2] == 0 and list(kv.get_layers(short)) == []


def test_a_hole_ends_the_prefix(store: tierd.Store) -> None:
    kv = tierd.PrefixKVStore(store, model="m", block_tokens=B)
    toks = _tokens(6 * B)
    kv.put(toks, _kv(6 * B))
    store.delete(kv.block_keys(toks)[3])  # lost in the middle (evicted, expired...)
    assert kv.lookup(toks) == 3 * B
    assert kv.get(toks).shape[2] == 3 * B


def test_hash_is_stable_across_processes_and_hash_seeds(store: tierd.Store) -> None:
    toks = _tokens(3 * B)
    mine = tierd.PrefixKVStore(store, model="m", block_tokens=B).block_keys(toks)
    # block_keys needs no store: the child builds the store-less object like any user would.
    script = (
        "from tierd.clients.kv import PrefixKVStore\n"
        f"kv = PrefixKVStore(None, model='m', block_tokens={B})\n"
        f"print(' '.join(kv.block_keys({toks!r})))\n"
    )
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == mine


def test_tail_blocks_are_evicted_before_heads(nvme_dir: Path) -> None:
    # Blocks are 4 x 2 x 16 x 2 x 16 bf16 = 8 KiB, a prompt 8 blocks = 64 KiB; the host tier
    # holds 4.5 prompts, so some prompt must be split between host and nvme.
    # Watermark demotion off: only puts that need room evict, so what moves is deterministic.
    cfg = small_config(nvme_dir, host="288KiB", nvme="128MiB")
    cfg["tiers"]["host"] |= {"high_watermark": 1.0, "low_watermark": 1.0}
    with tierd.open(cfg) as s:
        kv = tierd.PrefixKVStore(s, model="m", block_tokens=B)
        prompts = [_tokens(8 * B, seed=10 + i) for i in range(6)]
        for i, p in enumerate(prompts):
            kv.put(p, _kv(8 * B, seed=10 + i))
        split = 0
        for p in prompts:
            tiers = [s.info(k).tier for k in kv.block_keys(p)]
            cut = tiers.index("nvme") if "nvme" in tiers else len(tiers)
            # Head blocks on host, tail blocks on nvme: never a head demoted before its own tail.
            assert all(t == "host" for t in tiers[:cut]) and all(t == "nvme" for t in tiers[cut:]), tiers
            split += 0 < cut < len(tiers)
        assert split >= 1  # the host tier really was too small: some prompt lost its tail, not its head
        assert torch.equal(kv.get(prompts[0]), _kv(8 * B, seed=10))  # read back from nvme, exact


def test_batched_calls(store: tierd.Store) -> None:
    kv = tierd.PrefixKVStore(store, model="m", block_tokens=B)
    reqs = [(_tokens(3 * B, seed=i), _kv(3 * B, seed=i)) for i in range(5)]
    assert kv.put_many(reqs) == [3 * B] * 5
    assert kv.lookup_many([r[0] for r in reqs]) == [3 * B] * 5
    got = kv.get_many([r[0] for r in reqs])
    assert all(torch.equal(g, r[1]) for g, r in zip(got, reqs, strict=True))


def test_two_processes_share_blocks_through_a_daemon(nvme_dir: Path) -> None:
    d = Daemon(nvme_dir, host="32MiB").start()
    try:
        toks, cache = _tokens(4 * B), _kv(4 * B)
        with d.connect() as a:
            tierd.PrefixKVStore(a, model="m", block_tokens=B).put(toks, cache)
        script = (
            "import sys, torch, tierd\n"
            f"s = tierd.connect({str(d.socket)!r})\n"
            f"kv = tierd.PrefixKVStore(s, model='m', block_tokens={B})\n"
            f"print(kv.lookup({toks!r}))\n"
            "torch.save(kv.get(" + repr(toks) + "), sys.argv[1])\n"
        )
        out = subprocess.run([sys.executable, "-c", script, str(nvme_dir / "got.pt")], capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == [str(4 * B)]
        assert torch.equal(torch.load(nvme_dir / "got.pt"), cache)
    finally:
        d.close()


# -- the remote tier in the engine ----------------------------------------------------------


def _remote_cfg(path: Path, redis: Any, **ns: Any) -> dict:
    """Small local tiers over ``redis`` (one server or a cluster), write-through for ``kv/``."""
    cfg = small_config(path, host="4MiB", nvme="8MiB")
    cfg["tiers"]["remote"] = {"url": redis.url, "cluster": redis.cluster, "size": "1GiB", "chunk_size": "256KiB",
                              "timeout_s": 1.0}
    cfg["namespaces"] = {"kv": {"write_through": True}, **ns}
    return cfg


def test_full_nvme_demotes_to_remote_and_reads_back(tmp_path: Path, redis_any: Any) -> None:
    with tierd.open(_remote_cfg(tmp_path / "a", redis_any)) as s:
        values = {f"x/{i}": torch.full((MIB,), i, dtype=torch.uint8) for i in range(20)}  # 20 MiB > 4 + 8
        for k, v in values.items():
            s.put(k, v)
        assert {s.info(k).tier for k in values} == {"host", "nvme", "remote"}
        assert s.stats()["remote"].demoted_bytes > 0
        assert all(torch.equal(s.get(k), v) for k, v in values.items())


def test_two_machines_share_blocks_through_one_redis(tmp_path: Path, redis_any: Any) -> None:
    toks, cache = _tokens(4 * B), _kv(4 * B)
    with tierd.open(_remote_cfg(tmp_path / "a", redis_any)) as a, \
            tierd.open(_remote_cfg(tmp_path / "b", redis_any)) as b:
        tierd.PrefixKVStore(a, model="m", block_tokens=B).put(toks, cache)
        kv_b = tierd.PrefixKVStore(b, model="m", block_tokens=B)
        assert kv_b.lookup(toks) == 4 * B  # found in the remote index: B has no local copy
        assert torch.equal(kv_b.get(toks), cache)
        assert b.info(kv_b.block_keys(toks)[0]).tier == "host"  # promoted on the way
        a.delete(kv_b.block_keys(toks)[1])
        assert tierd.PrefixKVStore(b, model="m", block_tokens=B).lookup(_tokens(4 * B)) == 4 * B  # B's copies


def test_redis_killed_mid_run(tmp_path: Path, redis_server: Any) -> None:
    with tierd.open(_remote_cfg(tmp_path / "a", redis_server)) as s:
        for i in range(20):
            s.put(f"x/{i}", torch.full((MIB,), i, dtype=torch.uint8))
        remote_only = [f"x/{i}" for i in range(20) if s.info(f"x/{i}").tier == "remote"]
        local = [f"x/{i}" for i in range(20) if s.info(f"x/{i}").tier != "remote"]
        assert remote_only and local
        redis_server.stop()
        with pytest.raises(tierd.MediaError, match="remote tier at .* unreachable"):
            s.get(remote_only[0])
        # Local tiers keep working: reads, writes, misses.
        assert all(torch.equal(s.get(k), torch.full((MIB,), int(k[2:]), dtype=torch.uint8)) for k in local[-2:])
        with pytest.raises(tierd.OutOfSpace):  # host and nvme full, remote dead: refused, nothing dropped
            s.put("x/more", torch.ones(2 * MIB, dtype=torch.uint8))
        for k in local[:4]:
            s.delete(k)
        s.put("kv/after", torch.ones(1000))  # write-through fails quietly; the local copy is there
        assert torch.equal(s.get("kv/after"), torch.ones(1000))
        assert not s.exists("kv/never-stored")
        kv = tierd.PrefixKVStore(s, model="m", block_tokens=B)
        assert kv.lookup(_tokens(3 * B, seed=99)) == 0
        assert wait_until(lambda: s.engine.healthy(), timeout_s=5)


def test_put_straight_to_remote(tmp_path: Path, redis_any: Any) -> None:
    with tierd.open(_remote_cfg(tmp_path / "a", redis_any)) as s:
        t = torch.randn(300, 300)
        s.put("x/r", t, tier="remote", codec="zstd")
        assert s.info("x/r").tier == "remote" and s.stats()["nvme"].used_bytes == 0
        out = torch.empty_like(t)
        assert torch.equal(s.get("x/r", out=out), t)
        with pytest.raises(tierd.InvalidArgument, match="unknown tier"):
            with tierd.open(small_config(tmp_path / "b")) as plain:
                plain.put("x/r", t, tier="remote")  # no remote configured


def test_a_block_redis_evicted_is_a_hole_not_a_hit(tmp_path: Path, redis_any: Any) -> None:
    with tierd.open(_remote_cfg(tmp_path / "a", redis_any)) as a, \
            tierd.open(_remote_cfg(tmp_path / "b", redis_any)) as b:
        toks, cache = _tokens(5 * B), _kv(5 * B)
        tierd.PrefixKVStore(a, model="m", block_tokens=B).put(toks, cache)
        kv_b = tierd.PrefixKVStore(b, model="m", block_tokens=B)
        assert kv_b.lookup(toks) == 5 * B  # B adopted every block: its only copies are remote
        a.engine.remote.drain()
        # Redis drops the chunks of block 2 (maxmemory eviction, TTL, a flush...).
        loc = b.engine.locations(kv_b.block_keys(toks)[2])["remote"]
        remote = b.engine.remote
        assert remote._redis.delete(*[remote._key(loc.oid, i) for i in range(len(loc.chunks))]) == len(loc.chunks)
        assert kv_b.lookup(toks) == 2 * B  # the hole ends the prefix; it is not reported as a hit
        assert torch.equal(kv_b.get(toks), cache[:, :, : 2 * B])
