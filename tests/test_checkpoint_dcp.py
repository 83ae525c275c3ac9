"""torch.distributed.checkpoint through tierd.checkpoint.StorageWriter / StorageReader.

Saves and loads run in real processes with a gloo process group (tests/dcp_worker.py);
DCP's planner reshards: a checkpoint written by 2 ranks loads on 1 and on 4, bitwise equal.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import tierd

WORKER = Path(__file__).with_name("dcp_worker.py")


def _ranks(role: str, path: Path, world: int) -> None:
    """Run ``role`` on ``world`` ranks (one process without a process group for world 1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
    procs = []
    for rank in range(world):
        e = dict(env, OMP_NUM_THREADS="1")
        if world > 1:
            e |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                  "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), role, str(path)], env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=240) for p in procs]
    for rank, (p, (out, err)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0 and f"ok {role} {rank if world > 1 else 0} {world}" in out, f"rank {rank}:\n{err[-3000:]}"


def test_two_ranks_save_and_one_and_four_load(tmp_path: Path) -> None:
    path = tmp_path / "ck"
    _ranks("save-async", path, 2)
    names = sorted(p.name for p in path.iterdir())
    assert "manifest.json" in names and "dcp.metadata" in names
    assert any(n.startswith("rank00000-shard") for n in names) and any(n.startswith("rank00001-shard") for n in names)
    _ranks("load", path, 1)
    _ranks("load", path, 4)


def _model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(8, 32)).square().sum().backward()
    opt.step()
    return model, opt


def test_one_process_save_load_and_tierds_own_load(tmp_path: Path) -> None:
    model, opt = _model_and_optimizer(1)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 3}
    dcp.save(state, storage_writer=tierd.checkpoint.StorageWriter(tmp_path / "ck"))
    other, other_opt = _model_and_optimizer(2)
    into = {"model": other.state_dict(), "optim": other_opt.state_dict(), "step": 0}
    dcp.load(into, storage_reader=tierd.checkpoint.StorageReader(tmp_path / "ck"))
    for name, t in model.state_dict().items():
        assert torch.equal(into["model"][name], t), name
    assert torch.equal(into["optim"]["state"][0]["exp_avg_sq"], opt.state_dict()["state"][0]["exp_avg_sq"])
    assert into["step"] == 3
    # tierd's own load reads it too: whole tensors, in the state dict's own nesting.
    whole = tierd.checkpoint.load(tmp_path / "ck")
    assert whole["step"] == 3 and torch.equal(whole["model"]["2.weight"], model.state_dict()["2.weight"])
    assert tierd.checkpoint.latest(tmp_path) == tmp_path / "ck"


def test_a_corrupt_shard_is_reported_and_an_uncommitted_one_is_not_a_checkpoint(tmp_path: Path) -> None:
    model, _ = _model_and_optimizer(3)
    path = tmp_path / "ck"
    dcp.save({"model": model.state_dict()}, storage_writer=tierd.checkpoint.StorageWriter(path))
    shard = next(path.glob("rank*-shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10  # the last tensor's bytes
    shard.write_bytes(bytes(data))
    fresh, _ = _model_and_optimizer(4)
    # DCP wraps its storage's errors (CheckpointException, per rank); tierd's message names the tensor.
    with pytest.raises(CheckpointException, match="CorruptObject.*fails its checksum"):
        dcp.load({"model": fresh.state_dict()}, storage_reader=tierd.checkpoint.StorageReader(path))
    with pytest.raises(tierd.CorruptObject, match="fails its checksum"):
        tierd.checkpoint.load(path)
    (path / "manifest.json").unlink()  # as after a crash before the commit
    with pytest.raises((tierd.NotFound, CheckpointException), match="not a complete checkpoint"):
        dcp.load({"model": fresh.state_dict()}, storage_reader=tierd.checkpoint.StorageReader(path))
    with pytest.raises(CheckpointException, match="holds a checkpoint already"):
        dcp.save({"model": model.state_dict()}, storage_writer=tierd.checkpoint.StorageWriter(tmp_path / "ck2"))
        dcp.save({"model": model.state_dict()}, storage_writer=tierd.checkpoint.StorageWriter(tmp_path / "ck2"))
