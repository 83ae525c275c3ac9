"""Checkpoint benchmark: how long training is blocked, and how long until the save is durable.

    python bench/checkpoint.py [--quick] [--out DIR] [--dir DIR]

One state dict (>= 1 GiB of bf16 and fp32 tensors, as a model plus AdamW
states would be), saved in one run by:

* ``tierd async_save``: blocking time (until ``staged``) and time to durable
  (shards fsync'ed, manifest committed);
* ``tierd save`` (blocking, durable);
* ``torch.save`` (no fsync: it returns once the page cache has the bytes) and
  ``torch.save`` + ``os.fsync``;
* ``safetensors.torch.save_file``;
* ``torch.distributed.checkpoint.save`` and its ``async_save``.

and loaded by ``tierd load`` beside ``torch.load``. Writes checkpoint.json
and checkpoint.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tierd import checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_args  # noqa: E402

console = Console(width=132)
GIB = 1 << 30


def _state(total_bytes: int) -> dict[str, torch.Tensor]:
    """Layers of bf16 weights with fp32 Adam moments, ``total_bytes`` in all."""
    sd: dict[str, torch.Tensor] = {}
    per_layer = 3 * 4096 * 4096 * 2  # weight bf16 + two fp32 moments of a 4096x4096 layer = 160 MiB
    layers = max(1, total_bytes // per_layer)
    g = torch.Generator().manual_seed(0)
    for i in range(layers):
        sd[f"layers.{i}.weight"] = (torch.randn(4096, 4096, generator=g) * 0.02).to(torch.bfloat16)
        sd[f"optim.{i}.exp_avg"] = torch.randn(4096, 4096, generator=g) * 1e-3
        sd[f"optim.{i}.exp_avg_sq"] = torch.rand(4096, 4096, generator=g) * 1e-6
    return sd


def _fsync_tree(path: Path) -> None:
    for p in [path] if path.is_file() else sorted(path.rglob("*")):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    args, out = bench_args(__doc__, argv, dir={
        "default": None, "help": "where checkpoints are written (default: a temp dir under ~/.cache)"})
    sd = _state((320 << 20) if args.quick else (1200 << 20))
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    base = Path(args.dir) if args.dir else Path.home() / ".cache"
    base.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []

    def row(tool: str, blocking: float, durable: float | None, note: str = "") -> None:
        rows.append({"tool": tool, "blocking_s": blocking, "durable_s": durable, "note": note})
        console.print(f"{tool}: blocking {blocking:.2f} s" + (f", durable {durable:.2f} s" if durable else ""))

    with tempfile.TemporaryDirectory(prefix="tierd-ckpt-bench-", dir=base) as tmp_s:
        tmp = Path(tmp_s)
        # The first save pages the staging pool in; later saves reuse it (Note [staging]).
        t0 = time.perf_counter()
        first = checkpoint.async_save(sd, tmp / "tierd-first")
        first.staged.result()
        blocking = time.perf_counter() - t0
        first.durable.result()
        row("tierd async_save, first save (pool paged in)", blocking, time.perf_counter() - t0)
        # tierd async_save: blocking = until staged; durable = until the manifest is committed.
        t0 = time.perf_counter()
        pending = checkpoint.async_save(sd, tmp / "tierd-async")
        pending.staged.result()
        blocking = time.perf_counter() - t0
        pending.durable.result()
        row("tierd async_save", blocking, time.perf_counter() - t0, "steady state: fsync'ed, manifest committed")
        t, _ = _timed(lambda: checkpoint.save(sd, tmp / "tierd-sync"))
        row("tierd save", t, t, "blocking form")

        t, _ = _timed(lambda: torch.save(sd, tmp / "torch.pt"))
        t_sync, _ = _timed(lambda: _fsync_tree(tmp / "torch.pt"))
        row("torch.save", t, None, "no fsync: durable only when the kernel flushes")
        row("torch.save + fsync", t + t_sync, t + t_sync)
        try:
            from safetensors.torch import save_file

            t, _ = _timed(lambda: save_file(sd, str(tmp / "st.safetensors")))
            t_sync, _ = _timed(lambda: _fsync_tree(tmp / "st.safetensors"))
            row("safetensors save_file (+ fsync)", t, t + t_sync)
        except ImportError:
            console.print("[yellow]safetensors not installed[/]")
        try:
            import torch.distributed.checkpoint as dcp

            t, _ = _timed(lambda: dcp.save(sd, checkpoint_id=str(tmp / "dcp")))
            t_sync, _ = _timed(lambda: _fsync_tree(tmp / "dcp"))
            row("torch.distributed.checkpoint.save (+ fsync)", t, t + t_sync)
            t0 = time.perf_counter()
            fut = dcp.async_save(sd, checkpoint_id=str(tmp / "dcp-async"))
            blocking = time.perf_counter() - t0
            fut.result()
            done = time.perf_counter() - t0
            t_sync, _ = _timed(lambda: _fsync_tree(tmp / "dcp-async"))
            row("torch.distributed.checkpoint.async_save (+ fsync)", blocking, done + t_sync)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
            console.print(f"[yellow]torch.distributed.checkpoint not measured: {exc}[/]")

        # Loads, from a cold page cache where the kernel allows it.
        _drop_caches()
        t_ours, loaded = _timed(lambda: checkpoint.load(tmp / "tierd-sync"))
        assert all(torch.equal(loaded[k], v) for k, v in sd.items())
        _drop_caches()
        t_torch, _ = _timed(lambda: torch.load(tmp / "torch.pt", weights_only=True))
        loads = {"tierd load": t_ours, "torch.load": t_torch}
        for p in tmp.iterdir():
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    ref = next(r for r in rows if r["tool"] == "torch.save")["blocking_s"]
    res = {"command": " ".join(["python", "bench/checkpoint.py", *(argv if argv is not None else sys.argv[1:])]),
           "state_bytes": nbytes, "rows": rows, "loads": loads, "torch_save_s": ref}
    (out / "checkpoint.json").write_text(json.dumps(res, indent=2))
    lines = [f"# tierd checkpoint benchmark\n\nState: {nbytes / GIB:.2f} GiB (bf16 weights, fp32 moments). "
             f"Command: `{res['command']}`.\n",
             "| tool | training blocked s | / torch.save | durable after s | / torch.save | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        dur = f"{r['durable_s']:.2f}" if r["durable_s"] else "never (no fsync)"
        durr = f"{r['durable_s'] / ref:.2f}" if r["durable_s"] else "-"
        lines.append(f"| {r['tool']} | {r['blocking_s']:.2f} | {r['blocking_s'] / ref:.3f} | {dur} | {durr} | {r['note']} |")
    lines += ["", "| load | s | / torch.load |", "|---|---|---|"]
    for k, v in loads.items():
        lines.append(f"| {k} | {v:.2f} | {v / loads['torch.load']:.2f} |")
    md = "\n".join(lines) + "\n"
    (out / "checkpoint.md").write_text(md)
    console.print(md)
    return 0


def _drop_caches() -> None:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
    except OSError:
        pass  # not root, or not allowed: loads come from a warm cache


if __name__ == "__main__":
    sys.exit(main())
