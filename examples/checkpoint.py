"""Checkpoint a training run asynchronously, keep the last two, resume from the newest.

    python examples/checkpoint.py

Runs on a CPU-only machine. Each save is started right after a step with
``optimizer=opt``: it returns at once and copies the parameters and AdamW's
moments while the next forward and backward run; the next ``opt.step()``
waits only if that copy is not done yet (``step_wait_s``). The write, fsync
and manifest commit happen while later steps run (``durable``).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

from tierd import checkpoint


def make() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def state(model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> dict:
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": step,
            "rng": torch.get_rng_state(), "py_rng": random.getstate()}


with tempfile.TemporaryDirectory() as root:
    model, opt = make()
    pending = None
    for step in range(1, 31):
        opt.zero_grad()
        model(torch.randn(32, 512)).square().mean().backward()
        opt.step()
        if pending is not None and step % 10 == 1:
            print(f"step {step - 1}'s save: staged; the next step() waited {pending.step_wait_s * 1e3:.1f} ms for it")
        if step % 10 == 0:
            # A snapshot of the state after this step, copied while the next forward/backward run.
            pending = checkpoint.async_save(state(model, opt, step), Path(root) / f"step-{step}", step=step,
                                            keep_last=2, optimizer=opt)
    assert pending is not None
    print(f"durable: {pending.durable.result()}")
    print("kept:", sorted(p.name for p in Path(root).iterdir()))

    newest = checkpoint.latest(root)
    resumed_model, resumed_opt = make()
    # Model weights straight into the model's own tensors (only their shards are read) ...
    checkpoint.load(newest, into={"model": resumed_model.state_dict()})
    # ... and everything else as fresh objects.
    sd = checkpoint.load(newest)
    resumed_opt.load_state_dict(sd["optim"])
    torch.set_rng_state(sd["rng"])
    random.setstate(sd["py_rng"])
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True))
    print(f"resumed from {newest.name} at step {sd['step']}: weights identical: {same}")
    assert same
