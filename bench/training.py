"""Training benchmark: activation and optimizer-state offload beside the alternatives.

    python bench/training.py [--quick] [--out DIR] [--device cuda|cpu]

Activations, one training step each, same model and batch:

* ``none``: autograd keeps every activation on the device;
* ``tierd``: ``tierd.offload_activations`` (embedded store);
* ``save_on_cpu``: ``torch.autograd.graph.save_on_cpu(pin_memory=True)``;
* ``checkpoint``: ``torch.utils.checkpoint`` on every block (recompute).

Optimizer: AdamW states on the device beside ``tierd.offload_optimizer``.

On a GPU it reports peak device memory (``torch.cuda.max_memory_allocated``)
above the model's own, and the median step time. On a CPU there is no
device memory to measure; it reports step times (the overhead of the copies)
and the bytes tierd stashed. Writes training.json and training.md.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.checkpoint import checkpoint

import tierd

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_args  # noqa: E402

console = Console(width=132)
MIB = 1 << 20


class Block(torch.nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False, is_causal=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(torch.nn.Module):
    """GPT-2-shaped: 12 x 768 is the 124M model."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, recompute: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.recompute = recompute

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        logits = self.head(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(step: Callable[[], None], device: torch.device, steps: int) -> tuple[float, int]:
    step()  # warm
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> int:
    args, out = bench_args(__doc__, argv, device={"default": "cuda" if torch.cuda.is_available() else "cpu"})
    device = torch.device(args.device)
    if device.type == "cuda":
        shape = {"vocab": 50257, "d": 768, "layers": 12, "heads": 12}
        batch, seq, steps = (4, 512, 3) if args.quick else (8, 1024, 5)
    else:
        shape = {"vocab": 8000, "d": 256, "layers": 4, "heads": 4}
        batch, seq, steps = (4, 128, 2) if args.quick else (8, 256, 3)
    tokens = torch.randint(0, shape["vocab"], (batch, seq), device=device)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as nvme, tierd.open(
        {"tiers": {"host": {"size": "16GiB" if device.type == "cuda" else "2GiB"}, "nvme": {"path": nvme, "size": "8GiB"}}}
    ) as store:
        torch.manual_seed(0)
        model = GPT(**shape).to(device)
        params = sum(p.numel() for p in model.parameters())
        _sync(device)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

        def act_step(ctx: Callable[[], AbstractContextManager[Any]], recompute: bool = False) -> Callable[[], None]:
            def run() -> None:
                model.recompute = recompute
                model.zero_grad(set_to_none=True)
                with ctx():
                    loss = model(tokens)
                loss.backward()
            return run

        modes: dict[str, Callable[[], None]] = {
            "none": act_step(nullcontext),
            "tierd": act_step(lambda: tierd.offload_activations(store, min_bytes=1 << 20)),
            "save_on_cpu": act_step(lambda: torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")),
            "checkpoint": act_step(nullcontext, recompute=True),
        }
        for name, fn in modes.items():
            t, peak = _measure(fn, device, steps)
            rows.append({"part": "activations", "mode": name, "step_s": t, "peak_bytes": peak - base if peak else None})
            console.print(f"activations {name}: {t * 1e3:.0f} ms" + (f", peak +{(peak - base) / MIB:.0f} MiB" if peak else ""))

        model.recompute = False
        for name in ("on device", "tierd"):
            torch.manual_seed(0)
            opt_model = GPT(**shape).to(device)
            inner = torch.optim.AdamW(opt_model.parameters(), lr=1e-4)
            opt: Any = tierd.offload_optimizer(inner, store) if name == "tierd" else inner

            def opt_step(m: GPT = opt_model, o: Any = opt) -> None:
                o.zero_grad(set_to_none=True)
                m(tokens).backward()
                o.step()

            t, peak = _measure(opt_step, device, steps)
            rows.append({"part": "optimizer", "mode": name, "step_s": t, "peak_bytes": peak or None})
            console.print(f"optimizer {name}: {t * 1e3:.0f} ms" + (f", peak {peak / MIB:.0f} MiB" if peak else ""))
            if name == "tierd":
                opt.close()
            del opt_model, inner, opt
    ref = {r["part"]: r for r in rows if r["mode"] in ("none", "on device")}
    for r in rows:
        r["time_vs_ref"] = r["step_s"] / ref[r["part"]]["step_s"]
        rp = ref[r["part"]]["peak_bytes"]
        r["peak_vs_ref"] = r["peak_bytes"] / rp if r["peak_bytes"] and rp else None
    res = {"command": " ".join(["python", "bench/training.py", *(argv if argv is not None else sys.argv[1:])]),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "params": params,
           "batch": batch, "seq": seq, "rows": rows}
    (out / "training.json").write_text(json.dumps(res, indent=2))
    lines = [f"# tierd training benchmark\n\nDevice: {res['device']}; model {params / 1e6:.0f} M parameters, "
             f"batch {batch} x {seq}. Command: `{res['command']}`.\n",
             "| part | mode | step ms | / reference | peak memory above model MiB | / reference |", "|---|---|---|---|---|---|"]
    for r in rows:
        pk = f"{r['peak_bytes'] / MIB:.0f}" if r["peak_bytes"] else "n/a (cpu)"
        pr = f"{r['peak_vs_ref']:.2f}" if r["peak_vs_ref"] else "n/a"
        lines.append(f"| {r['part']} | {r['mode']} | {r['step_s'] * 1e3:.0f} | {r['time_vs_ref']:.2f} | {pk} | {pr} |")
    md = "\n".join(lines) + "\n"
    (out / "training.md").write_text(md)
    console.print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
