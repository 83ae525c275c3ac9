"""Two machines share KV-cache blocks through a Redis Cluster, and a primary dies.

    python examples/redis_cluster.py                       # starts a local 3 + 3 cluster
    TIERD_REDIS_CLUSTER=redis://10.0.0.5:7000,redis://10.0.0.6:7000 python examples/redis_cluster.py

Without TIERD_REDIS_CLUSTER it starts a real cluster on loopback (6
redis-server processes: 3 primaries, 3 replicas, node timeout 2 s; needs
redis-server and redis-cli) and, at the end, SIGKILLs one primary to show
what a failover looks like from tierd: blocks in that shard's slots miss
for a few seconds, every other block is served, no byte is wrong, and then
the promoted replica serves them again.

"Machine A" and "machine B" are two stores with their own local tiers and
directories; only the cluster joins them, as with two nodes of a serving
fleet. Each runs in this process for brevity: two `tierd serve` daemons
with the same `[tiers.remote]` share the same way.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

import tierd

LAYERS, HEADS, DIM, BLOCK = 4, 2, 64, 64


def machine(workdir: Path, seeds: str) -> tierd.Store:
    return tierd.open({
        "tiers": {"host": {"size": "64MiB"}, "nvme": {"path": str(workdir), "size": "256MiB"},
                  "remote": {"url": seeds, "cluster": True, "timeout_s": 1.0}},
        "namespaces": {"kv": {"write_through": True}},  # every KV block also goes to the cluster
    })


def prefill(tokens: list[int]) -> torch.Tensor:
    """Stand-in for a model's prefill: like a causal model's, a block's KV depends only on the tokens up
    to it, so conversations sharing the system prompt share its blocks exactly."""
    blocks = []
    for end in range(BLOCK, len(tokens) + 1, BLOCK):
        g = torch.Generator().manual_seed(hash(tuple(tokens[:end])) % (2**31))
        blocks.append(torch.randn(LAYERS, 2, BLOCK, HEADS, DIM, generator=g))
    return torch.cat(blocks, dim=2).to(torch.bfloat16)


def conversation(n: int) -> tuple[list[int], torch.Tensor]:
    tokens = list(range(1000, 1000 + 2 * BLOCK)) + [n] * (6 * BLOCK)  # a shared system prompt, then a chat
    return tokens, prefill(tokens)


def main() -> int:
    seeds = os.environ.get("TIERD_REDIS_CLUSTER")
    cluster = None
    with tempfile.TemporaryDirectory() as tmp:
        if not seeds:
            if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
                print("this example starts a local Redis Cluster: apt-get install redis-server "
                      "(or set TIERD_REDIS_CLUSTER to a cluster's seed URLs)")
                return 0
            from tierd.testing.redis import RedisCluster

            print("starting a Redis Cluster on loopback: 3 primaries, 3 replicas ...")
            cluster = RedisCluster(Path(tmp) / "cluster", node_timeout_ms=2000)
            seeds = cluster.seeds
        try:
            with machine(Path(tmp) / "a", seeds) as a, machine(Path(tmp) / "b", seeds) as b:
                kv_a = tierd.PrefixKVStore(a, model="toy-model", block_tokens=BLOCK)
                kv_b = tierd.PrefixKVStore(b, model="toy-model", block_tokens=BLOCK)
                chats = [conversation(n) for n in range(8)]
                for tokens, kv in chats:
                    kv_a.put(tokens, kv)  # machine A prefilled these
                hits = [kv_b.lookup(tokens) for tokens, _ in chats]  # machine B never saw them
                assert all(torch.equal(kv_b.get(t), kv) for t, kv in chats)  # read from the cluster, exact
                first = kv_b.block_keys(chats[0][0])[0]
                print(f"machine B found {sum(hits)} of {sum(len(t) for t, _ in chats)} tokens in the cluster; "
                      f"its copy of the first block is now on its {b.info(first).tier} tier")
                if cluster is not None:
                    failover(cluster, b, kv_b, chats)
        finally:
            if cluster is not None:
                cluster.stop()
    return 0


def failover(cluster: object, b: tierd.Store, kv_b: tierd.PrefixKVStore, chats: list) -> None:
    """Kill the primary that holds the most blocks; read every block from the cluster until all are back."""
    from tierd.testing.redis import read_through_failover

    remote = b.engine.remote  # read the tier itself: a store's get would promote, then read locally
    locations = {key: b.engine.locations(key)["remote"] for tokens, _ in chats for key in kv_b.block_keys(tokens)}
    before = {}
    for key, loc in locations.items():
        before[key] = torch.empty(sum(c.raw for c in loc.chunks), dtype=torch.uint8)
        remote.read_into(loc, before[key], itemsize=1)
    owner = {key: cluster.primary_of(remote._key(loc.oid, 0)) for key, loc in locations.items()}
    victim = max(set(owner.values()), key=list(owner.values()).count)

    def reader(key: str) -> object:
        def read() -> bool:
            out = torch.zeros_like(before[key])
            remote.read_into(locations[key], out, itemsize=1)
            return torch.equal(out, before[key])
        return read

    print(f"killing the primary on port {victim} ({sum(p == victim for p in owner.values())} of {len(owner)} "
          "blocks are in its slots) ...")
    report = read_through_failover(cluster, victim, {k: reader(k) for k in locations},
                                   {k for k, p in owner.items() if p == victim})
    print(f"  reads failed on the dead shard: {report.victim_failures} (in {report.rounds} rounds of "
          f"{len(locations)} reads); on the other shards: {report.healthy_failures}; wrong bytes: {report.wrong}")
    print(f"  every block read again {report.recovered_s:.1f} s after the kill (node timeout 2 s)")


if __name__ == "__main__":
    sys.exit(main())
