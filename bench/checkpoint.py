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
* ``torch.distributed.checkpoint.save`` and its ``async_save``;

and, on a real model and AdamW, ``tierd async_save(..., optimizer=opt)``
called at the start of a training step (it copies while forward and backward
run): training blocked = the call plus what ``step()`` waited, beside the
step's time without a save and ``torch.save`` of the same state.

and loaded by ``tierd load`` beside ``torch.load``, ``safetensors`` and
``torch.distributed.checkpoint.load``. The disk's bound is the state's bytes
over fio's O_DIRECT write bandwidth in the same directory.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import GIB, BenchContext, pyplot, row, save_figure, standalone, verdict  # noqa: E402
from tierd import checkpoint  # noqa: E402


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


def run(ctx: BenchContext) -> dict[str, Any]:
    # DCP warns on every call that torch.distributed is not initialised: single-process use is the point here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        return _run(ctx)


def _run(ctx: BenchContext) -> dict[str, Any]:
    sd = _state((100 << 20) if ctx.smoke else (200 << 20) if ctx.quick else (1200 << 20))
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    rows: list[dict[str, Any]] = []
    task = ctx.progress.add_task(f"checkpoint: {nbytes / GIB:.2f} GiB state vs torch.save, safetensors, DCP", total=16)

    def record(tool: str, blocking: float, durable: float | None, note: str = "", ref_s: float | None = None) -> None:
        # ref_s: torch.save's time for this row's state, when it is not the main state's
        rows.append({"tool": tool, "blocking_s": blocking, "durable_s": durable, "note": note, "ref_s": ref_s})
        ctx.progress.advance(task)

    tmp = ctx.workdir / "checkpoint"
    tmp.mkdir()
    # The first save pages the staging pool in; later saves reuse it (Note [staging]).
    t0 = time.perf_counter()
    first = checkpoint.async_save(sd, tmp / "tierd-first")
    first.staged.result()
    blocking = time.perf_counter() - t0
    first.durable.result()
    record("tierd async_save, first save (pool paged in)", blocking, time.perf_counter() - t0)
    # The same first save in a process that called checkpoint.prepare() at start (a fresh pool here).
    checkpoint._pool = checkpoint._StagingPool()
    t_prep, _ = _timed(lambda: checkpoint.prepare(sd).result())
    t0 = time.perf_counter()
    first = checkpoint.async_save(sd, tmp / "tierd-prepared")
    first.staged.result()
    blocking = time.perf_counter() - t0
    first.durable.result()
    record("tierd async_save, first save after prepare()", blocking, time.perf_counter() - t0,
           f"prepare() faulted the pool in beforehand, in the background: {t_prep:.2f} s")
    # tierd async_save: blocking = until staged; durable = until the manifest is committed.
    t0 = time.perf_counter()
    pending = checkpoint.async_save(sd, tmp / "tierd-async")
    pending.staged.result()
    blocking = time.perf_counter() - t0
    pending.durable.result()
    record("tierd async_save", blocking, time.perf_counter() - t0, "steady state: fsync'ed, manifest committed")
    t, _ = _timed(lambda: checkpoint.save(sd, tmp / "tierd-sync"))
    record("tierd save", t, t, "blocking form")

    t, _ = _timed(lambda: torch.save(sd, tmp / "torch.pt"))
    t_sync, _ = _timed(lambda: _fsync_tree(tmp / "torch.pt"))
    record("torch.save", t, None, "no fsync: durable only when the kernel flushes")
    record("torch.save + fsync", t + t_sync, t + t_sync)
    loads: dict[str, float] = {}
    try:
        from safetensors.torch import load_file, save_file

        t, _ = _timed(lambda: save_file(sd, str(tmp / "st.safetensors")))
        t_sync, _ = _timed(lambda: _fsync_tree(tmp / "st.safetensors"))
        record("safetensors save_file (+ fsync)", t, t + t_sync)
    except ImportError:
        ctx.console.print("[yellow]safetensors not installed[/]")
        ctx.progress.advance(task)
    try:
        import torch.distributed.checkpoint as dcp

        t, _ = _timed(lambda: dcp.save(sd, checkpoint_id=str(tmp / "dcp")))
        t_sync, _ = _timed(lambda: _fsync_tree(tmp / "dcp"))
        record("torch.distributed.checkpoint.save (+ fsync)", t, t + t_sync)
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=str(tmp / "dcp-async"))
        blocking = time.perf_counter() - t0
        fut.result()
        done = time.perf_counter() - t0
        t_sync, _ = _timed(lambda: _fsync_tree(tmp / "dcp-async"))
        record("torch.distributed.checkpoint.async_save (+ fsync)", blocking, done + t_sync)
        # DCP through tierd's storage: its shards, fsync'ed, manifest committed (durable when it returns).
        t, _ = _timed(lambda: dcp.save(sd, storage_writer=checkpoint.StorageWriter(tmp / "dcp-tierd")))
        record("torch.distributed.checkpoint.save, tierd StorageWriter", t, t, "fsync'ed, manifest committed")
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, storage_writer=checkpoint.StorageWriter(tmp / "dcp-tierd-async"))
        blocking = time.perf_counter() - t0
        fut.result()
        record("torch.distributed.checkpoint.async_save, tierd StorageWriter", blocking, time.perf_counter() - t0)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run here is reported, not fatal
        ctx.console.print(f"[yellow]torch.distributed.checkpoint not measured: {exc}[/]")
        ctx.progress.advance(task, 4)

    _training_rows(ctx, tmp, record, 6 if not (ctx.quick or ctx.smoke) else 1, 4096 if not ctx.smoke else 2048)

    # Loads, from a cold page cache where the kernel allows it.
    cold = _drop_caches()
    t_ours, loaded = _timed(lambda: checkpoint.load(tmp / "tierd-sync"))
    if not all(torch.equal(loaded[k], v) for k, v in sd.items()):
        raise RuntimeError("tierd load returned different tensors")
    loads["tierd load"] = t_ours
    _drop_caches()
    loads["torch.load"] = _timed(lambda: torch.load(tmp / "torch.pt", weights_only=True))[0]
    if (tmp / "st.safetensors").exists():
        _drop_caches()
        loads["safetensors load_file"] = _timed(lambda: load_file(str(tmp / "st.safetensors")))[0]
    if (tmp / "dcp").exists():
        import torch.distributed.checkpoint as dcp

        into = {k: torch.empty_like(v) for k, v in sd.items()}
        _drop_caches()
        loads["torch.distributed.checkpoint.load (into preallocated)"] = _timed(
            lambda: dcp.load(into, checkpoint_id=str(tmp / "dcp")))[0]
    if (tmp / "dcp-tierd").exists():
        into = {k: torch.empty_like(v) for k, v in sd.items()}
        _drop_caches()
        loads["torch.distributed.checkpoint.load, tierd StorageReader"] = _timed(
            lambda: dcp.load(into, storage_reader=checkpoint.StorageReader(tmp / "dcp-tierd")))[0]
        if not all(torch.equal(into[k], v) for k, v in sd.items()):
            raise RuntimeError("DCP through tierd's reader returned different tensors")
    ctx.progress.advance(task)
    shutil.rmtree(tmp, ignore_errors=True)
    fio = ctx.fio("write")
    return {"state_bytes": nbytes, "rows": rows, "loads": loads, "cold_loads": cold,
            "torch_save_s": next(r for r in rows if r["tool"] == "torch.save")["blocking_s"],
            "disk_bound_s": nbytes / (fio * 1e9) if fio else None}


def _training_rows(ctx: BenchContext, tmp: Path, record: Callable[..., None], layers: int, width: int) -> None:
    """async_save(optimizer=opt) at the start of a real training step, against the step alone and torch.save."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(64, width)

    def step() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()  # AdamW's moments exist from here on
    state = lambda: {"model": model.state_dict(), "optim": opt.state_dict()}  # noqa: E731
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    checkpoint.async_save(state(), tmp / "train-warm", optimizer=opt).result()  # the pool is sized (steady state)
    alone = min(_timed(step)[0] for _ in range(3))
    t_torch, _ = _timed(lambda: torch.save(state(), tmp / "train.pt"))
    gib = nbytes / GIB

    def trials(optimizer: Any) -> tuple[float, float, float]:
        # (training blocked, the step's wall time with the save, durable after): the median of 3 saves
        out = []
        for i in range(3):
            t0 = time.perf_counter()
            pending = checkpoint.async_save(state(), tmp / f"train-{optimizer is not None}-{i}", optimizer=optimizer)
            t_call = time.perf_counter() - t0
            step()
            t_step = time.perf_counter() - t0
            pending.result()
            out.append((t_call + pending.step_wait_s, t_step, time.perf_counter() - t0))
        return sorted(out)[1]

    for optimizer, how in ((opt, "async_save(optimizer=opt)"), (None, "async_save")):
        blocked, t_step, durable = trials(optimizer)
        what = "the call + step()'s wait" if optimizer is not None else "the call (it returns once staged)"
        record(f"tierd {how}, {gib:.2f} GiB model + AdamW, at a step's start", blocked, durable,
               f"{what}; call + step {t_step:.2f} s, the step alone {alone:.2f} s; "
               f"torch.save of this state {t_torch:.2f} s", ref_s=t_torch)
    record(f"torch.save, {nbytes / GIB:.2f} GiB model + AdamW", t_torch, None, "the reference for the row above",
           ref_s=t_torch)


def markdown(res: dict[str, Any]) -> str:
    ref = res["torch_save_s"]
    bound = f"; the disk's bound (state / fio write) is {res['disk_bound_s']:.2f} s" if res["disk_bound_s"] else ""
    lines = [f"State: {res['state_bytes'] / GIB:.2f} GiB (bf16 weights, fp32 Adam moments){bound}.\n",
             "| tool | training blocked s | / torch.save | durable after s | / torch.save | note |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rref = r.get("ref_s") or ref
        dur = f"{r['durable_s']:.2f}" if r["durable_s"] else "never (no fsync)"
        durr = f"{r['durable_s'] / rref:.2f}" if r["durable_s"] else "-"
        lines.append(f"| {r['tool']} | {r['blocking_s']:.2f} | {r['blocking_s'] / rref:.3f} | {dur} | {durr} | "
                     f"{r['note']} |")
    cache = "cold page cache" if res["cold_loads"] else "warm page cache (dropping caches needs root)"
    lines += ["", f"| load ({cache}) | s | / torch.load |", "|---|---|---|"]
    for k, v in res["loads"].items():
        lines.append(f"| {k} | {v:.2f} | {v / res['loads']['torch.load']:.2f} |")
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    by = {r["tool"]: r for r in res["rows"]}
    ref = res["torch_save_s"]
    ours = by["tierd async_save"]
    gib = res["state_bytes"] / GIB
    dcp = by.get("torch.distributed.checkpoint.async_save (+ fsync)")
    bound = f"disk bound {res['disk_bound_s']:.2f} s" if res["disk_bound_s"] else ""
    prepared = by.get("tierd async_save, first save after prepare()")
    rows = [row(f"async_save {gib:.2f} GiB: first save blocked (after prepare())",
                f"{prepared['blocking_s']:.2f} s" if prepared else "-", peer=f"torch.save {ref:.2f} s",
                vs_peer=f"{prepared['blocking_s'] / ref:.3f}" if prepared else "", issue=18,
                target="<= 0.1 x torch.save", status=verdict(prepared["blocking_s"] <= 0.1 * ref) if prepared else ""),
            row(f"async_save {gib:.2f} GiB: training blocked", f"{ours['blocking_s']:.2f} s",
                peer=f"torch.save {ref:.2f} s" + (f"; DCP async_save {dcp['blocking_s']:.2f} s" if dcp else ""),
                vs_peer=f"{ours['blocking_s'] / ref:.3f}", issue=6, target="<= 0.1 x torch.save",
                status=verdict(ours["blocking_s"] <= 0.1 * ref)),
            row(f"async_save {gib:.2f} GiB: time to durable", f"{ours['durable_s']:.2f} s", limit=bound,
                peer=f"torch.save {ref:.2f} s (no fsync)" + (f"; DCP async_save {dcp['durable_s']:.2f} s" if dcp else ""),
                vs_limit=f"{ours['durable_s'] / res['disk_bound_s']:.2f}" if res["disk_bound_s"] else "",
                vs_peer=f"{ours['durable_s'] / ref:.2f}", issue=6, target="<= torch.save's wall time",
                ratio=f"{ours['durable_s'] / ref:.2f} x torch.save",
                status=verdict(ours["durable_s"] <= ref),
                note="" if ours["durable_s"] <= ref else "fsync and the disk's write bandwidth")]
    train = next((r for r in res["rows"] if r["tool"].startswith("tierd async_save(optimizer=opt)")), None)
    if train:
        ratio = train["blocking_s"] / train["ref_s"]
        rows.append(row("async_save(optimizer=opt) at a training step's start: training blocked",
                        f"{train['blocking_s']:.3f} s", peer=f"torch.save {train['ref_s']:.2f} s", vs_peer=f"{ratio:.3f}",
                        issue=18, target="<= 0.1 x torch.save", status=verdict(ratio <= 0.1)))
    st = by.get("safetensors save_file (+ fsync)")
    if st:
        rows.append(row("blocking save, durable", f"tierd save {by['tierd save']['blocking_s']:.2f} s",
                        peer=f"safetensors + fsync {st['durable_s']:.2f} s",
                        vs_peer=f"{by['tierd save']['blocking_s'] / st['durable_s']:.2f}"))
    fs, ours_dcp = by.get("torch.distributed.checkpoint.save (+ fsync)"), by.get(
        "torch.distributed.checkpoint.save, tierd StorageWriter")
    if fs and ours_dcp:
        ratio = ours_dcp["durable_s"] / fs["durable_s"]
        rows.append(row(f"dcp.save {gib:.2f} GiB: time to durable", f"tierd StorageWriter {ours_dcp['durable_s']:.2f} s",
                        peer=f"FileSystemWriter + fsync {fs['durable_s']:.2f} s", vs_peer=f"{ratio:.2f}", issue=18,
                        target="faster than FileSystemWriter", status=verdict(ratio < 1.0)))
    loads = res["loads"]
    rows.append(row("load", f"{loads['tierd load']:.2f} s", peer=f"torch.load {loads['torch.load']:.2f} s",
                    vs_peer=f"{loads['tierd load'] / loads['torch.load']:.2f}"))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    rows = res["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["durable_s"] or 0 for r in rows], 0.4, label="durable after (s)", color="C1")
    ax.barh([y - 0.2 for y in ys], [r["blocking_s"] for r in rows], 0.4, label="training blocked (s)", color="C0")
    if res["disk_bound_s"]:
        ax.axvline(res["disk_bound_s"], color="k", ls="--", label="state / fio write (disk bound)")
    ax.set_yticks(list(ys), [r["tool"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="seconds", title=f"checkpoint of {res['state_bytes'] / GIB:.2f} GiB")
    ax.legend(fontsize=8)
    return save_figure(fig, out, "checkpoint")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "checkpoint", argv)


def _drop_caches() -> bool:
    """Drop the page cache (root only); False when loads will come from a warm cache."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
    except OSError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
