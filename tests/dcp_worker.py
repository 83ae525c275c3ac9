"""One rank of a DCP save or load through tierd's storage (run by tests/test_checkpoint_dcp.py).

    python tests/dcp_worker.py save|load|load-async PATH    (RANK, WORLD_SIZE, MASTER_* in the environment)

Every rank builds the same full tensors from fixed seeds; a save shards them over the ranks
(DTensor, Shard(0)) and a load fills tensors sharded over however many ranks load, then checks
each rank's shards bitwise against the full tensors. Without WORLD_SIZE, one process, no
process group, plain tensors.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import tierd


def full_state() -> dict[str, object]:
    g = torch.Generator().manual_seed(11)
    return {
        "model": {"w": torch.randn(24, 8, generator=g), "b": torch.randn(24, generator=g).to(torch.bfloat16)},
        "optim": {"exp_avg": torch.randn(24, 8, generator=g), "step": 5},
        "ids": torch.arange(12, dtype=torch.int64),  # 12 rows: uneven over 5 ranks, even over 2 and 4
    }


def main(role: str, path: str) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    full = full_state()
    if world > 1:
        from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (world,))

        def shard(t: torch.Tensor) -> torch.Tensor:
            return distribute_tensor(t, mesh, [Shard(0)])
    else:
        def shard(t: torch.Tensor) -> torch.Tensor:
            return t

    def tree(fill: bool) -> dict[str, object]:
        return torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: shard(t if fill else torch.zeros_like(t)), full)

    if role == "save":
        dcp.save(tree(True), storage_writer=tierd.checkpoint.StorageWriter(path))
    elif role == "save-async":
        dcp.async_save(tree(True), storage_writer=tierd.checkpoint.StorageWriter(path)).result()
    else:
        state = tree(False)
        state["optim"]["step"] = 0
        dcp.load(state, storage_reader=tierd.checkpoint.StorageReader(path))
        assert state["optim"]["step"] == 5, state["optim"]["step"]
        got = torch.utils._pytree.tree_leaves(state)
        want = torch.utils._pytree.tree_leaves(full)
        for g, w in zip(got, want, strict=True):
            if isinstance(w, torch.Tensor):
                local = g.to_local() if hasattr(g, "to_local") else g
                expected = shard(w).to_local() if world > 1 else w
                assert local.dtype == expected.dtype and torch.equal(local.view(torch.uint8), expected.view(torch.uint8))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    print("ok", role, os.environ.get("RANK", "0"), world)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
