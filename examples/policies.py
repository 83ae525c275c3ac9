"""A training-like loop whose optimizer states do not fit the host tier.

    python examples/policies.py

Cycles over 24 "parameters" (2 MiB of state each, 48 MiB in all) with a
32 MiB host tier, once with LRU and once with a namespace marked
``access = "cyclic"``: tierd learns the order of one step and then evicts
what is needed last and prefetches what comes next. Prints host hit ratios
per step. Runs on a CPU-only machine.
"""

from __future__ import annotations

import tempfile

import torch

import tierd


def run(namespace: dict[str, object], steps: int = 6) -> list[float]:
    with tempfile.TemporaryDirectory() as nvme:
        cfg = {"tiers": {"host": {"size": "32MiB"}, "nvme": {"path": nvme, "size": "512MiB"}},
               "namespaces": {"opt": namespace}}
        with tierd.open(cfg) as store:
            keys = [f"opt/p{i}" for i in range(24)]
            for k in keys:
                store.put(k, torch.zeros(512 * 1024))  # 2 MiB each
            ratios = []
            for _ in range(steps):
                before = store.stats()["host"]
                for k in keys:  # the optimizer step: read the state, update, write back
                    state = store.get(k)
                    state += 1
                    store.put(k, state)
                after = store.stats()["host"]
                hits, misses = after.hits - before.hits, after.misses - before.misses
                ratios.append(hits / (hits + misses))
            assert torch.equal(store.get("opt/p0"), torch.full((512 * 1024,), float(steps)))
            return ratios


lru = run({"policy": "lru"})
cyclic = run({"access": "cyclic", "prefetch_depth": 2})
print("host hit ratio per step")
print("  lru            ", " ".join(f"{r:.2f}" for r in lru))
print('  access="cyclic"', " ".join(f"{r:.2f}" for r in cyclic))
