"""Batched calls: many KV blocks per call, a lookup that pins, completion on a file descriptor.

    python examples/batches.py

Runs on a CPU-only machine with the embedded store; ``tierd.connect()``
offers the same calls (one frame each way per batch).
"""

import select
import tempfile

import torch

import tierd

with tempfile.TemporaryDirectory() as tmp, tierd.open({
    "tiers": {"host": {"size": "256MiB"}, "nvme": {"path": tmp, "size": "256MiB"}},
}) as store:
    # 16 KV blocks of one request, stored in one call.
    blocks = {f"kv/req1-{i}": torch.randn(2, 16, 64, dtype=torch.bfloat16) for i in range(16)}
    stored = store.put_many(blocks)
    print("stored:", sum(stored), "of", len(stored), "errors:", stored.errors)

    # A prefix cache's question: how many leading blocks are here?
    keys = list(blocks) + ["kv/req1-missing", "kv/req1-16"]
    print("prefix length:", store.prefix_length(keys))

    # Load them into the caller's own buffer (a serving engine's KV pool): one copy each.
    pool = torch.empty(16, 2, 16, 64, dtype=torch.bfloat16)
    got = store.get_many(list(blocks), outs=list(pool))
    assert all(g is not None for g in got) and torch.equal(pool[3], blocks["kv/req1-3"])
    print("loaded into the pool:", len(got), "blocks")

    # Look up and pin: what was found stays readable until released, even if deleted meanwhile.
    found = store.exists_many(["kv/req1-0", "kv/req1-1", "kv/nope"], lease=True)
    store.delete("kv/req1-0")
    with found.lease as lease:
        pinned = lease.get_many()
        print("found:", list(found), "pinned read:", [None if v is None else tuple(v.shape) for v in pinned])

    # Event loops: submit, wait on the eventfd, drain the results.
    with store.completions() as done:
        ticket = done.submit_get_many(["kv/req1-5", "kv/req1-6"])
        select.select([done.fd], [], [], 10)
        for t, result in done.drain():
            print("completion", t, "for ticket", ticket, ":", [tuple(v.shape) for v in result])

    print("deleted:", store.delete_many(list(blocks)))
