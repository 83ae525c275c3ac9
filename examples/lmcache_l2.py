"""tierd as LMCache's L2: two LMCache workers share KV chunks through one tierd daemon.

    bash .ci/engines            # LMCache's CPU install (../shared/INTEGRATIONS.md)
    python examples/lmcache_l2.py

Starts a private ``tierd serve``; then builds LMCache's L2 adapter twice,
the way LMCache's server does from
``--l2-adapter '{"type": "native_plugin", "module_path": "tierd.integrations.lmcache",
"class_name": "TierdConnector", "adapter_params": {"socket": ...}}'``: one
worker stores 256-token chunks (a toy model's KV), the other looks them up
and loads them into its own L1 memory objects. Runs on a CPU-only machine.
"""
# requires: lmcache

from __future__ import annotations

import argparse
import json
import os
import select
import tempfile
from pathlib import Path

import torch
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.l2_adapters import create_l2_adapter
from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config
from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj

from tierd.daemon.launch import spawn

SHAPE = (2, 256, 8, 128)  # [k/v, tokens, kv heads, head dim] of one layer group: 1 MiB in bf16


def l2_adapter(sock: str):
    spec = {"type": "native_plugin", "module_path": "tierd.integrations.lmcache",
            "class_name": "TierdConnector", "adapter_params": {"socket": sock}}
    args = add_l2_adapters_args(argparse.ArgumentParser()).parse_args(["--l2-adapter", json.dumps(spec)])
    return create_l2_adapter(parse_args_to_l2_adapters_config(args).adapters[0])


def memory_obj(data: torch.Tensor) -> TensorMemoryObj:
    meta = MemoryObjMetadata(shape=torch.Size(SHAPE), dtype=torch.bfloat16, address=0,
                             phy_size=data.numel() * 2, ref_count=1)
    return TensorMemoryObj(data.view(torch.uint8).reshape(-1), meta, None)


def wait(fd: int, poll):
    while (result := poll()) is None:
        select.select([fd], [], [], 1.0)
    return result


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="tierd-ex-", dir="/tmp") as tmp:
        sock = str(Path(tmp) / "tierd.sock")
        config = Path(tmp) / "tierd.toml"
        config.write_text(f'[tiers.host]\nsize = "128MiB"\n[tiers.nvme]\npath = "{tmp}/nvme"\nsize = "1GiB"\n'
                          f'[daemon]\nsocket = "{sock}"\nmetrics = ""\n')
        daemon = spawn(config, env={k: v for k, v in os.environ.items() if not k.startswith("TIERD_")})
        writer, reader = l2_adapter(sock), l2_adapter(sock)
        try:
            keys = [ObjectKey(chunk_hash=i.to_bytes(16, "little"), model_name="meta-llama/Llama-3.1-8B", kv_rank=0)
                    for i in range(16)]
            chunks = [torch.randn(SHAPE).to(torch.bfloat16) for _ in keys]
            task = writer.submit_store_task(keys, [memory_obj(c) for c in chunks])
            stored = wait(writer.get_store_event_fd(), lambda: writer.pop_completed_store_tasks().get(task))
            print(f"worker 1 stored {len(keys)} chunks: {stored >> 20} MiB")

            task = reader.submit_lookup_and_lock_task(keys, {})
            found = wait(reader.get_lookup_and_lock_event_fd(), lambda: reader.query_lookup_and_lock_result(task))
            print(f"worker 2 found {found.popcount()} of {len(keys)}")
            l1 = [memory_obj(torch.empty(SHAPE, dtype=torch.bfloat16)) for _ in keys]
            task = reader.submit_load_task(keys, l1)
            loaded = wait(reader.get_load_event_fd(), lambda: reader.query_load_result(task))
            same = all(torch.equal(o.raw_data, memory_obj(c).raw_data) for o, c in zip(l1, chunks, strict=True))
            print(f"worker 2 loaded {loaded.popcount()} chunks, equal to what worker 1 stored: {same}")
            reader.submit_unlock(keys)
            assert same and loaded.popcount() == len(keys)
        finally:
            writer.close()
            reader.close()
            daemon.terminate()
            daemon.wait(timeout=60)
