"""torch.distributed.checkpoint in tierd's format: save, load elsewhere, read with tierd's own load.

    python examples/dcp_checkpoint.py

One process (DCP's no-process-group mode) on a CPU-only machine; on several ranks
the same calls write one set of shards per rank and load on any world size.
"""

import tempfile
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from tierd import checkpoint


def model_and_optimizer(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(16, 256)).square().mean().backward()
    opt.step()
    return model, opt


with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "step-100"
    model, opt = model_and_optimizer(0)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "step": 100}
    dcp.async_save(state, storage_writer=checkpoint.StorageWriter(path)).result()  # durable when done
    print("files:", sorted(p.name for p in path.iterdir()))
    print("latest complete checkpoint:", checkpoint.latest(tmp).name)

    # Resume into another model: DCP's planner fills its tensors in place.
    other, other_opt = model_and_optimizer(1)
    resume = {"model": other.state_dict(), "optim": other_opt.state_dict(), "step": 0}
    dcp.load(resume, storage_reader=checkpoint.StorageReader(path))
    same = all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values(), strict=True))
    print("resumed at step", resume["step"], "weights equal:", same)

    # tierd's own load reads it too, without DCP's planner: whole tensors.
    whole = checkpoint.load(path)
    print("tierd load:", list(whole), tuple(whole["model"]["0.weight"].shape))
    assert same and resume["step"] == 100
