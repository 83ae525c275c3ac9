"""The remote tier on a real Redis Cluster while a primary dies, and two daemons sharing KV blocks
through one cluster.

Each failover test starts a cluster of its own (3 primaries, 3 replicas, node
timeout 2 s), fills it through a store, SIGKILLs one primary and looks every
object up by key every 50 ms until the cluster has promoted the dead primary's
replica and every object reads again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config
from daemon import Daemon

import tierd
from tierd.testing import wait_until
from tierd.engine.remote_index import RemoteIndex
from tierd.testing.redis import RedisCluster, free_cluster_ports, read_through_failover
from tierd.tiers.remote import RemoteTier

MIB = 1 << 20


@pytest.fixture
def own_cluster(tmp_path: Path) -> Any:
    cluster = RedisCluster(tmp_path / "cluster", node_timeout_ms=2000)
    yield cluster
    cluster.stop()


def _cluster_cfg(path: Path, url: str, **remote: Any) -> dict[str, Any]:
    cfg = small_config(path, host="16MiB", nvme="16MiB")
    cfg["tiers"]["remote"] = {"url": url, "cluster": True, "size": "1GiB", "chunk_size": "64KiB", "timeout_s": 1.0,
                              **remote}
    return cfg


def _value(i: int) -> torch.Tensor:
    return torch.arange(256 << 10, dtype=torch.int64).add_(i * 7919).to(torch.uint8)


@pytest.mark.parametrize("seeds", ["the dead primary only", "every node"])
def test_a_primary_fails_over(tmp_path: Path, own_cluster: RedisCluster, seeds: str) -> None:
    """Objects are found by key alone, as another machine finds them on a miss (index entry, then
    chunks), through two readers: one that waits for the promotion, one that reads a replica
    meanwhile. Only the dead shard's objects may fail, each of them does for the first, and the
    second reads everything throughout."""
    cluster = own_cluster
    victim = cluster.primaries()[0]
    url = f"redis://127.0.0.1:{victim}" if seeds == "the dead primary only" else cluster.seeds
    with tierd.open(_cluster_cfg(tmp_path / "a", url)) as s:
        remote = s.engine.remote
        keys = [f"r/{i}" for i in range(48)]
        for i, key in enumerate(keys):
            s.put(key, _value(i), tier="remote")
        local = {f"l/{i}": torch.full((MIB,), i, dtype=torch.uint8) for i in range(4)}
        for key, value in local.items():
            s.put(key, value)
        assert {s.info(k).tier for k in keys} == {"remote"} and {s.info(k).tier for k in local} == {"host"}
        locs = {k: s.engine.locations(k)["remote"] for k in keys}
        on_victim = {k for k, loc in locs.items() if cluster.primary_of(remote._key(loc.oid, 0)) == victim}
        assert 0 < len(on_victim) < len(keys)  # the objects spread over the shards
        readers = {"waits": RemoteTier(url, 1 << 30, cluster=True, timeout_s=1.0, replica_reads=False),
                   "replica": RemoteTier(url, 1 << 30, cluster=True, timeout_s=1.0)}

        def remote_read(tier: RemoteTier, i: int, key: str) -> Any:
            def read() -> bool:
                entry = RemoteIndex(tier).lookup(key)  # raises while the key's shard does not answer
                if entry is None:
                    return False
                out = torch.zeros(256 << 10, dtype=torch.uint8)
                tier.read_into(entry.location, out, itemsize=1)
                return torch.equal(out, _value(i))
            return read

        reads = {f"{name} {key}": remote_read(tier, i, key) for name, tier in readers.items()
                 for i, key in enumerate(keys)}
        for key, value in local.items():  # local tiers are never affected
            reads[key] = lambda key=key, value=value: torch.equal(s.get(key), value)
        try:
            report = read_through_failover(cluster, victim, reads, {f"waits {k}" for k in on_victim},
                                           timeout_s=60, through_promotion=True)
            print(f"\nfailover ({seeds} as seed): {report}; replica reads: {readers['replica'].replica_hits}")
            assert report.wrong == 0  # never other bytes, never a stale index entry
            # Exactly the dead shard's objects failed, each of them, for the reader that waits for the
            # promotion: a key's index entry lies in its chunks' slot (in different slots, killing one
            # of 3 primaries failed about 5/9 of the keys, not 1/3).
            assert set(report.failed) == {f"waits {k}" for k in on_victim}
            assert report.healthy_failures == 0  # the healthy shards and the local tiers served throughout
            # The other reader asked the dead primary's replica and read everything throughout.
            assert readers["replica"].replica_hits > 0
            assert report.recovered_s is not None and report.promoted_s is not None
        finally:
            for tier in readers.values():
                tier.close()
        cluster.wait_failover(victim)
        # After the failover the tier takes writes and finds everything through the new topology.
        s.put("r/after", _value(99), tier="remote")
        assert torch.equal(s.get("r/after"), _value(99))
        assert all(torch.equal(s.get(k), _value(i)) for i, k in enumerate(keys))


def test_a_store_starts_while_the_cluster_is_down_and_uses_it_once_up(tmp_path: Path) -> None:
    ports = free_cluster_ports(6)
    url = ",".join(f"redis://127.0.0.1:{p}" for p in ports)
    with tierd.open(_cluster_cfg(tmp_path / "a", url)) as s:  # no seed answers: the store starts anyway
        with pytest.raises(tierd.MediaError, match="remote tier at .* unreachable while writing"):
            s.put("r/0", _value(0), tier="remote")
        with pytest.raises(tierd.MediaError, match="no seed answered"):  # asked again at most once a second
            s.put("r/1", _value(1), tier="remote")
        s.put("l/0", _value(0))  # local tiers work
        assert torch.equal(s.get("l/0"), _value(0))
        cluster = RedisCluster(tmp_path / "cluster", ports=ports)  # the cluster comes up
        try:
            s.put("r/0", _value(0), tier="remote")
            assert s.info("r/0").tier == "remote"
            assert torch.equal(s.get("r/0"), _value(0))
        finally:
            cluster.stop()


def test_two_daemons_share_kv_blocks_through_the_cluster(tmp_path: Path, redis_cluster: RedisCluster) -> None:
    B = 16
    remote = {"url": redis_cluster.seeds, "cluster": True, "size": "1GiB", "chunk_size": "256KiB"}
    kv = {"kv": {"write_through": True}}
    node_a = Daemon(tmp_path / "a", tiers={"remote": remote}, namespaces=kv)
    node_b = Daemon(tmp_path / "b", tiers={"remote": remote}, namespaces=kv)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    try:
        node_a.start()
        node_b.start()
        tokens = list(range(8 * B))
        cache = torch.randn(2, 2, 8 * B, 4, 16).to(torch.bfloat16)
        with node_a.connect() as a, node_b.connect() as b:
            kv_a = tierd.PrefixKVStore(a, model="m", block_tokens=B)
            kv_a.put(tokens, cache)
            kv_b = tierd.PrefixKVStore(b, model="m", block_tokens=B)
            assert kv_b.lookup(tokens) == 8 * B  # node B has no local copy: found in the cluster's index
            assert torch.equal(kv_b.get(tokens), cache)
            first = kv_b.block_keys(tokens)[0]
            assert wait_until(lambda: b.info(first).tier == "host", timeout_s=10)  # B promoted it
            assert a.info(first).tier == "host"  # A's own copy is A's
            # A block only A has now (B never saw these tokens): B finds it too.
            more = tokens + list(range(10_000, 10_000 + B))
            kv_a.put(more, torch.randn(2, 2, 9 * B, 4, 16).to(torch.bfloat16))
            assert kv_b.lookup(more) == 9 * B
    finally:
        node_a.close()
        node_b.close()


def test_reads_go_straight_into_the_destination_and_follow_a_resharding(tmp_path: Path,
                                                                        redis_cluster: RedisCluster) -> None:
    with tierd.open(_cluster_cfg(tmp_path / "a", redis_cluster.url)) as s:
        remote = s.engine.remote
        for i in range(6):
            s.put(f"r/{i}", _value(i), tier="remote")
            s.put(f"z/{i}", _value(i).float(), tier="remote", codec="zstd")  # compressed: decoded from scratch
        out = torch.empty(256 << 10, dtype=torch.uint8)
        loc = s.engine.locations("r/0")["remote"]
        remote.read_into(loc, out, itemsize=1)
        assert torch.equal(out, _value(0)) and remote.slow_reads == 0  # no fallback to redis-py's parser
        assert all(torch.equal(s.get(f"z/{i}", out=torch.empty(256 << 10)), _value(i).float()) for i in range(6))
        assert remote.slow_reads == 0
        # The object's slot moves to another primary: the first read meets MOVED, goes through
        # redis-py (which learns the new owner), and the next is direct again, from the new node.
        key = remote._key(loc.oid, 0)
        before = redis_cluster.primary_of(key)
        after = next(p for p in redis_cluster.primaries() if p != before)
        redis_cluster.move_slot(remote._redis.keyslot(key), after)
        assert redis_cluster.primary_of(key) == after
        out.zero_()
        remote.read_into(loc, out, itemsize=1)
        assert torch.equal(out, _value(0)) and remote.slow_reads == 1
        out.zero_()
        remote.read_into(loc, out, itemsize=1)
        assert torch.equal(out, _value(0)) and remote.slow_reads == 1
