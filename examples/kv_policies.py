"""A prefix cache whose sessions share a small host tier with a flood of one-shot documents.

    python examples/kv_policies.py

Three chat sessions come back every round and read their whole history
(``PrefixKVStore.get``), then store what the turn adds; between rounds, long
documents are stored once and never read again. The host tier holds 64
blocks; each round's documents alone would fill it. Once with the default
(LRU, admit all) and once with the namespace marked ``access = "prefix"``:
tierd learns that documents are not read again and sends them straight to
nvme, and evicts a chain from its tail, never a block whose children are
cached. A third run also says when each document is done with
(``PrefixKVStore.finish``: a batch job knows its request is one-shot), so
what of it did land in host goes first. Prints the share of the sessions'
blocks read from host and the bytes that passed through host on their way to
nvme. Runs on a CPU-only machine.
"""

from __future__ import annotations

import random
import tempfile

import torch

import tierd

BLOCK = 32  # tokens a block: [2 layers, 2, 32 tokens, 2 heads, 64] float32 = 64 KiB


def kv_of(tokens: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 2, tokens, 2, 64, generator=torch.Generator().manual_seed(seed))


def run(namespace: dict[str, object], rounds: int = 10, finish_documents: bool = False) -> tuple[float, int]:
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as nvme:
        cfg = {"tiers": {"host": {"size": "4MiB"}, "nvme": {"path": nvme, "size": "256MiB"}},
               "namespaces": {"kv": namespace}}
        with tierd.open(cfg) as store:
            kv = tierd.PrefixKVStore(store, model="demo", block_tokens=BLOCK, dtype=torch.float32)
            system = [rng.randrange(32000) for _ in range(BLOCK)]
            sessions = [system + [rng.randrange(32000) for _ in range(2 * BLOCK)] for _ in range(3)]
            full = [kv_of(len(s) + rounds * BLOCK, i) for i, s in enumerate(sessions)]
            for i, history in enumerate(sessions):  # each session's first turn
                kv.put(history, full[i][:, :, : len(history)])
            hits = reads = 0
            for _ in range(rounds):
                for i, history in enumerate(sessions):
                    where = [store.info(k).tier for k in kv.block_keys(history)]
                    hits, reads = hits + where.count("host"), reads + len(where)
                    got = kv.get(history)  # the turn reads its whole history ...
                    assert got.shape[2] == len(history)
                    history += [rng.randrange(32000) for _ in range(BLOCK)]
                    kv.put(history, full[i][:, :, : len(history)])  # ... and stores what it adds
                for d in range(16):  # one-shot documents: a host tier's worth a round
                    doc = system + [rng.randrange(32000) for _ in range(4 * BLOCK)]
                    kv.get(doc)
                    kv.put(doc, kv_of(len(doc), 1000 + d))
                    if finish_documents:
                        kv.finish(doc)  # one-shot: not coming back
            assert torch.equal(kv.get(sessions[0])[:, :, BLOCK:], full[0][:, :, BLOCK : len(sessions[0])])
            return hits / reads, store.stats()["nvme"].demoted_bytes


for label, ns, finish in (("lru, admit all                   ", {}, False),
                          ('access = "prefix"                ', {"access": "prefix"}, False),
                          ('access = "prefix", documents done', {"access": "prefix"}, True)):
    ratio, demoted = run(ns, finish_documents=finish)
    print(f"{label}: sessions' blocks read from host {ratio:.2f}, "
          f"demoted to nvme through host {demoted / 2**20:.0f} MiB")
