"""Stash tensors in tierd's embedded store and fetch them back from wherever they went.

    python examples/quickstart.py

Runs on a CPU-only machine: a 64 MiB host tier (so that overflow to the
nvme tier shows at once) and an nvme tier in a temporary directory.
"""

from __future__ import annotations

import tempfile

import torch

import tierd

with tempfile.TemporaryDirectory() as nvme_dir:
    config = {
        "tiers": {"host": {"size": "64MiB"}, "nvme": {"path": nvme_dir, "size": "1GiB"}},
        "namespaces": {"ckpt": {"durable": True, "codec": "bytegroup"}},
    }
    with tierd.open(config) as store:
        # Activations of a few layers: 24 MiB each, more than the host tier holds.
        acts = {f"acts/layer{i}": torch.randn(6, 1024, 1024) for i in range(5)}
        for key, t in acts.items():
            store.put(key, t)
        for key in acts:
            print(f"{key:14} -> {store.info(key).tier}")  # the oldest were demoted to nvme

        # Weights in a durable namespace: fsync'ed to nvme, compressed there.
        w = (torch.randn(2048, 2048) * 0.02).to(torch.bfloat16)
        store.put("ckpt/w", w)
        info = store.info("ckpt/w")
        print(f"ckpt/w: {info.nbytes} bytes, {info.stored_nbytes} on nvme with {info.codec}")

        # Bring layer0 back ahead of time, then read everything in backward order.
        store.prefetch(["acts/layer0", "acts/layer1"])
        for key in reversed(list(acts)):
            assert torch.equal(store.get(key), acts[key])
        out = torch.empty_like(w)
        store.get("ckpt/w", out=out)  # fills a preallocated tensor in place
        assert torch.equal(out, w)

        host = store.stats()["host"]
        print(f"host tier: {host.used_bytes >> 20} MiB used of {host.capacity_bytes >> 20} MiB, "
              f"{host.hits} hits, {host.misses} misses, fragmentation {host.fragmentation:.2f}")
        try:
            store.get("acts/missing")
        except tierd.NotFound as exc:
            print(f"NotFound: {exc}")
