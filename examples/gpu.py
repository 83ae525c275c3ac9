"""GPU tensors in and out of tierd: the pinned arena, get(device=), the gpu tier.

    python examples/gpu.py

With CUDA: tensors go to the host arena by DMA and come back straight into
device memory; a 2 MiB gpu tier keeps the hottest ones on the device and
writes the others down. Without CUDA it runs the same calls on the CPU and
says what `tierd doctor` would: the gpu tier is off.
"""

from __future__ import annotations

import tempfile

import torch

import tierd

device = "cuda" if torch.cuda.is_available() else "cpu"
with tempfile.TemporaryDirectory() as nvme_dir:
    config = {"tiers": {"host": {"size": "64MiB"}, "nvme": {"path": nvme_dir, "size": "256MiB"},
                        "gpu": {"budget": "2MiB"}}}
    with tierd.open(config) as store:
        x = torch.randn(1024, 1024, device=device)  # 4 MiB
        store.put("acts/x", x)  # on a GPU: one DMA into the pinned arena
        y = store.get("acts/x", device=device)
        assert torch.equal(x, y)
        buf = torch.empty_like(x)
        store.get("acts/x", out=buf)  # straight into an existing buffer
        assert torch.equal(buf, x)
        print(f"acts/x: {store.info('acts/x').tier}, back on {y.device}")

        if "gpu" in store.stats().tiers:
            for i in range(3):  # 1 MiB each: the third pushes the first down to host
                store.put(f"hot/kv{i}", torch.full((512, 512), float(i), device=device), tier="gpu")
            for i in range(3):
                print(f"hot/kv{i}: {store.info(f'hot/kv{i}').tier}")
            assert torch.equal(store.get("hot/kv0", device=device), torch.zeros(512, 512, device=device))
        else:
            print("gpu tier: off (no CUDA device); `tierd doctor` says which GPU paths this machine has")
