"""Physical limits, measured in the same run as everything they are compared with.

    python bench/limits.py [--quick] [--out DIR] [--dir DIR]

* memcpy on one thread (``np.copyto``) and on all cores (one ``np.copyto``
  slice a thread; numpy releases the GIL), beside torch's own ``copy_``;
* fio sequential O_DIRECT write and read (bs=4M, iodepth=16, libaio) in the
  scratch directory, i.e. on the filesystem of the nvme tier;
* raw pinned ``cudaMemcpy`` host-to-device and device-to-host (``copy_`` between
  a pinned host tensor and a device tensor, timed with CUDA events), when a
  CUDA device is present; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import GIB, MIB, BenchContext, median_gbs, no_cuda_reason, row, size_label, standalone  # noqa: E402


def _memcpy(n: int, threads: int, reps: int) -> dict[str, float]:
    a = np.random.randint(0, 255, n, dtype=np.uint8)
    b = np.empty_like(a)
    one = median_gbs(lambda: np.copyto(b, a), n, reps)
    step = -(-n // threads)
    with ThreadPoolExecutor(threads) as pool:

        def all_cores() -> None:
            list(pool.map(lambda i: np.copyto(b[i : i + step], a[i : i + step]), range(0, n, step)))

        many = median_gbs(all_cores, n, reps)
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    torch_copy = median_gbs(lambda: tb.copy_(ta), n, reps)
    return {"size": n, "memcpy_1t_gbs": one, "memcpy_all_cores_gbs": many, "torch_copy_gbs": torch_copy}


def _cuda(n: int, reps: int) -> dict[str, float]:
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    res = {"size": n}
    for name, dst, src in (("h2d_gbs", dev, host), ("d2h_gbs", host, dev)):
        times = []
        for i in range(reps + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            if i:  # the first copy is a warm-up
                times.append(start.elapsed_time(end) / 1e3)
        res[name] = n / sorted(times)[len(times) // 2] / 1e9
    return res


def run(ctx: BenchContext) -> dict[str, Any]:
    sizes = [4 * MIB] if ctx.smoke else [64 * MIB] if ctx.quick else [64 * MIB, GIB]
    task = ctx.progress.add_task("limits: memcpy, fio, cudaMemcpy", total=len(sizes) + 3)
    threads = os.cpu_count() or 1
    rows = []
    for n in sizes:
        rows.append(_memcpy(n, threads, 3 if ctx.quick else 7))
        ctx.progress.advance(task)
    ctx.limits["memcpy_1t_gbs"] = rows[0]["memcpy_1t_gbs"]
    ctx.limits["memcpy_all_cores_gbs"] = rows[0]["memcpy_all_cores_gbs"]
    fio_write = ctx.fio("write")
    ctx.progress.advance(task)
    fio_read = ctx.fio("read")
    ctx.progress.advance(task)
    reason = no_cuda_reason()
    cuda: dict[str, Any] = {"skipped": reason} if reason else {"rows": [_cuda(n, 5) for n in sizes]}
    if not reason:
        ctx.limits["cuda_h2d_gbs"] = cuda["rows"][-1]["h2d_gbs"]
        ctx.limits["cuda_d2h_gbs"] = cuda["rows"][-1]["d2h_gbs"]
    ctx.progress.advance(task)
    return {"threads": threads, "memcpy": rows, "fio_write_gbs": fio_write, "fio_read_gbs": fio_read,
            "fio": "fio --rw=write|read --bs=4M --iodepth=16 --direct=1 --ioengine=libaio --numjobs=1",
            "cuda": cuda}


def _gbs(x: float | None) -> str:
    return f"{x:.2f} GB/s" if x else "- (fio not installed)"


def markdown(res: dict[str, Any]) -> str:
    lines = [f"#### memcpy ({res['threads']} threads for all cores)\n",
             "| size | 1 thread GB/s | all cores GB/s | torch copy_ GB/s |", "|---|---|---|---|"]
    for r in res["memcpy"]:
        lines.append(f"| {size_label(r['size'])} | {r['memcpy_1t_gbs']:.2f} | {r['memcpy_all_cores_gbs']:.2f} "
                     f"| {r['torch_copy_gbs']:.2f} |")
    lines += ["", f"#### disk: `{res['fio']}`\n", f"write {_gbs(res['fio_write_gbs'])}, read {_gbs(res['fio_read_gbs'])}.",
              "", "#### pinned cudaMemcpy\n"]
    if "skipped" in res["cuda"]:
        lines.append(f"not run: {res['cuda']['skipped']}.")
    else:
        lines += ["| size | host to device GB/s | device to host GB/s |", "|---|---|---|"]
        lines += [f"| {size_label(r['size'])} | {r['h2d_gbs']:.2f} | {r['d2h_gbs']:.2f} |" for r in res["cuda"]["rows"]]
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    m = res["memcpy"][-1]
    rows = [row(f"memcpy {size_label(m['size'])}, 1 thread / all cores", "",
                limit=f"{m['memcpy_1t_gbs']:.2f} / {m['memcpy_all_cores_gbs']:.2f} GB/s"),
            row("fio O_DIRECT sequential write / read", "",
                limit=f"{_gbs(res['fio_write_gbs'])} / {_gbs(res['fio_read_gbs'])}")]
    if "skipped" in res["cuda"]:
        rows.append(row("pinned cudaMemcpy H2D / D2H", "", limit=f"not run: {res['cuda']['skipped']}"))
    else:
        c = res["cuda"]["rows"][-1]
        rows.append(row(f"pinned cudaMemcpy {size_label(c['size'])} H2D / D2H", "",
                        limit=f"{c['h2d_gbs']:.2f} / {c['d2h_gbs']:.2f} GB/s"))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    return []  # the limits appear as reference lines in the other suites' plots


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "limits", argv)


if __name__ == "__main__":
    sys.exit(main())
