"""Train a small transformer with activations and optimizer states offloaded to tierd.

    python examples/train.py

Runs on a CPU-only machine (a 3M-parameter model, 30 steps). The same loop
runs twice, with and without offloading, and the parameters come out
bitwise identical. On a GPU, pass tensors on "cuda": the stashes free
device memory between forward and backward, and between steps.
"""

from __future__ import annotations

import tempfile

import torch

import tierd


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Embedding(1000, 256),
        *[torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True) for _ in range(4)],
        torch.nn.Linear(256, 1000),
    )


def train(model: torch.nn.Module, opt: torch.optim.Optimizer | tierd.OffloadedOptimizer,
          store: tierd.Store | None, steps: int = 30) -> list[float]:
    losses = []
    for step in range(steps):
        tokens = torch.randint(0, 1000, (8, 128), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        if store is not None:
            # Activations of 1 MiB or more leave autograd's hands until backward needs them.
            with tierd.offload_activations(store, min_bytes=1 << 20):
                logits = model(tokens)
        else:
            logits = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


with tempfile.TemporaryDirectory() as nvme:
    with tierd.open({"tiers": {"host": {"size": "512MiB"}, "nvme": {"path": nvme, "size": "2GiB"}}}) as store:
        plain_model, offload_model = make_model(), make_model()
        plain = train(plain_model, torch.optim.AdamW(plain_model.parameters(), lr=3e-4), None)
        opt = tierd.offload_optimizer(torch.optim.AdamW(offload_model.parameters(), lr=3e-4), store)
        offloaded = train(offload_model, opt, store)
        print(f"loss: {plain[0]:.3f} -> {plain[-1]:.3f} (plain), {offloaded[0]:.3f} -> {offloaded[-1]:.3f} (offloaded)")
        same = all(torch.equal(a, b) for a, b in zip(plain_model.parameters(), offload_model.parameters(), strict=True))
        print(f"parameters bitwise identical: {same}")
        print(f"optimizer state in the store between steps: {opt.offloaded_bytes() >> 20} MiB")
        opt.close()
        assert same
