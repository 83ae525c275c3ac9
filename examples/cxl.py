"""A cxl tier between host and nvme: objects overflow host -> cxl -> nvme and come back equal.

    python examples/cxl.py              # the first CPU-less NUMA node, else node 0
    CXL_NODE=2 python examples/cxl.py   # a node of your choice

On a machine without CXL memory (like CI) the tier is bound to node 0, which
has CPUs: tierd allows it with a warning, and the code path is the one a
CXL node takes (a memfd bound with mbind, prefaulted with fallocate).
"""

from __future__ import annotations

import os
import tempfile

import torch

import tierd
from tierd.tiers.cxl import cpuless_nodes

cpuless = [n.id for n in cpuless_nodes()]
node = int(os.environ.get("CXL_NODE", cpuless[0] if cpuless else 0))

with tempfile.TemporaryDirectory() as nvme_dir:
    config = {
        "tiers": {
            "host": {"size": "32MiB"},
            "cxl": {"node": node, "size": "64MiB"},
            "nvme": {"path": nvme_dir, "size": "1GiB"},
        }
    }
    with tierd.open(config) as store:
        # 160 MiB of activations through 32 MiB of host and 64 MiB of cxl memory.
        acts = {f"acts/layer{i}": torch.randn(4, 1024, 1024) for i in range(10)}
        for key, t in acts.items():
            store.put(key, t)
        for key in acts:
            print(f"{key:14} -> {store.info(key).tier}")  # oldest on nvme, then cxl, newest on host

        for key in reversed(list(acts)):
            assert torch.equal(store.get(key), acts[key])  # a get from cxl promotes into host

        for name, tier in store.stats().tiers.items():
            print(f"{name:5} {tier.used_bytes >> 20:4} MiB of {tier.capacity_bytes >> 20:5} MiB, "
                  f"{tier.objects} objects, {tier.demoted_bytes >> 20} MiB demoted into it, {tier.hits} hits")

        # Where the cxl arena's pages really are, as the kernel says (/proc/self/numa_maps).
        cxl = store.engine.cxl
        assert cxl is not None
        placement = cxl.placement()
        assert placement is not None
        print(f"cxl arena: policy {placement.policy}, pages per node {placement.pages}")
        assert placement.nodes == (node,)
