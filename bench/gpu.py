"""GPU benchmark: copies through the pinned host arena beside raw pinned cudaMemcpy, nvme -> GPU.

    python bench/gpu.py [--quick] [--out DIR] [--nvme-dir DIR]

Measured side by side in one run, same bytes, same device:

* device-to-host: ``store.put(cuda_tensor)`` (one DMA into the registered
  arena on tierd's copy stream, plus the put's bookkeeping) vs the limit, a
  raw ``copy_`` into a ``pin_memory`` tensor (cudaMemcpyAsync from pinned
  memory), vs the peer a user would write, ``tensor.cpu()`` (pageable);
* host-to-device: ``store.get(key, device="cuda")`` vs the pinned copy back;
* both through ``tierd.open()`` and a daemon (``tierd.connect()``), 1 MiB .. 1 GiB;
* nvme -> GPU: ``get(device="cuda")`` of an nvme object through kvikio
  (GDS, or its compatibility mode) vs POSIX read into host memory plus a
  pinned copy, beside fio's O_DIRECT read of the same directory.

Target (issue 8): arena copies >= 0.9 x raw pinned cudaMemcpy. Writes
gpu.json and gpu.md (and gpu.png) into --out; without CUDA it says so
and writes only the reason.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

import tierd

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_args, fio_gbs, pyplot  # noqa: E402

console = Console(width=132)
MIB, GIB = 1 << 20, 1 << 30


def _gbs(fn: Callable[[], Any], nbytes: int, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def bench_copies(store: tierd.Store, label: str, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for n in sizes:
        src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        back = torch.empty_like(src)
        key = f"bench/{label}-{n}"
        d2h_raw = _gbs(lambda: pinned.copy_(src, non_blocking=True), n, reps)
        d2h_peer = _gbs(lambda: src.cpu(), n, reps)
        d2h = _gbs(lambda: store.put(key, src), n, reps)
        h2d_raw = _gbs(lambda: back.copy_(pinned, non_blocking=True), n, reps)
        h2d = _gbs(lambda: store.get(key, out=back), n, reps)
        assert torch.equal(back, src), f"{label}: bytes differ after the round trip"
        store.delete(key)
        rows.append({"store": label, "bytes": n, "d2h_gbs": d2h, "d2h_pinned_gbs": d2h_raw,
                     "d2h_cpu_gbs": d2h_peer, "h2d_gbs": h2d, "h2d_pinned_gbs": h2d_raw,
                     "d2h_vs_pinned": d2h / d2h_raw, "h2d_vs_pinned": h2d / h2d_raw})
        console.print(f"{label} {n / MIB:7.1f} MiB: d2h {d2h:6.2f} GB/s ({d2h / d2h_raw:.2f} x pinned, "
                      f"{d2h / d2h_peer:.2f} x .cpu())  h2d {h2d:6.2f} GB/s ({h2d / h2d_raw:.2f} x pinned)")
    return rows


def bench_nvme(nvme_dir: Path, sizes: list[int], reps: int) -> list[dict[str, Any]]:
    rows = []
    for gds in ("auto", "off"):
        cfg = {"tiers": {"host": {"size": "256MiB"},
                         "nvme": {"path": str(nvme_dir / gds), "size": f"{2 * max(sizes) // MIB + 64}MiB",
                                  "gds": gds}}}
        with tierd.open(cfg) as store:
            path = "kvikio" if store.engine.nvme.gds else "posix + pinned copy"
            for n in sizes:
                src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
                store.put("bench/nvme", src, tier="nvme")
                out = torch.empty_like(src)
                gbs = _gbs(lambda: store.get("bench/nvme", out=out), n, reps)
                assert torch.equal(out, src)
                rows.append({"path": path, "gds": gds, "bytes": n, "gbs": gbs,
                             "why": store.engine.nvme.gds_reason})
                console.print(f"nvme -> GPU {path:>20} {n / MIB:7.1f} MiB: {gbs:6.2f} GB/s")
                store.delete("bench/nvme")
    return rows


def main(argv: list[str] | None = None) -> int:
    args, out = bench_args(__doc__, argv, nvme_dir={"default": None, "help": "directory on the disk to measure"})
    command = " ".join(["python", "bench/gpu.py", *(argv if argv is not None else sys.argv[1:])])
    if not torch.cuda.is_available():
        res = {"command": command, "skipped": f"no CUDA device (torch {torch.__version__})"}
        (out / "gpu.json").write_text(json.dumps(res, indent=2))
        console.print(f"gpu benchmark skipped: {res['skipped']}")
        return 0
    sizes = [MIB, 16 * MIB, 256 * MIB] if args.quick else [MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB]
    reps = 3 if args.quick else 7
    base = Path(args.nvme_dir) if args.nvme_dir else tierd.config.default_nvme_path().parent
    base.mkdir(parents=True, exist_ok=True)
    from tierd.daemon.launch import spawn

    with tempfile.TemporaryDirectory(prefix="tierd-gpu-", dir=base) as tmp:
        work = Path(tmp)
        host = f"{4 * max(sizes) // MIB}MiB"
        embedded_cfg = {"tiers": {"host": {"size": host}, "nvme": {"path": str(work / "e"), "size": "1GiB"}}}
        with tierd.open(embedded_cfg) as store:
            rows = bench_copies(store, "open", sizes, reps)
        sock = work / "tierd.sock"
        (work / "tierd.toml").write_text(
            f'[tiers.host]\nsize = "{host}"\n[tiers.nvme]\npath = "{work / "d"}"\nsize = "1GiB"\n'
            f'[daemon]\nsocket = "{sock}"\nmetrics = ""\n')
        daemon = spawn(work / "tierd.toml")
        try:
            with tierd.connect(sock) as store:
                rows += bench_copies(store, "connect", sizes, reps)
        finally:
            daemon.terminate()
            daemon.wait(60)
        nvme_sizes = [16 * MIB, 256 * MIB] if args.quick else [16 * MIB, 256 * MIB, GIB]
        nvme_rows = bench_nvme(work, nvme_sizes, reps)
        fio = fio_gbs(work, "read", max(nvme_sizes))
    res = {"command": command, "device": torch.cuda.get_device_name(), "copies": rows, "nvme": nvme_rows,
           "fio_read_gbs": fio}
    (out / "gpu.json").write_text(json.dumps(res, indent=2))
    lines = [f"# tierd GPU benchmark\n\nDevice: {res['device']}. Command: `{command}`. Target: arena copies "
             ">= 0.9 x raw pinned cudaMemcpy.\n",
             "| store | MiB | d2h GB/s | / pinned | / .cpu() | h2d GB/s | / pinned | target |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "met" if min(r["d2h_vs_pinned"], r["h2d_vs_pinned"]) >= 0.9 else "missed"
        lines.append(f"| {r['store']} | {r['bytes'] / MIB:.0f} | {r['d2h_gbs']:.2f} | {r['d2h_vs_pinned']:.2f} | "
                     f"{r['d2h_gbs'] / r['d2h_cpu_gbs']:.2f} | {r['h2d_gbs']:.2f} | {r['h2d_vs_pinned']:.2f} | {met} |")
    lines += ["", f"nvme -> GPU (fio O_DIRECT read in the same directory: {fio or float('nan'):.2f} GB/s):", "",
              "| path | MiB | GB/s | / fio | why |", "|---|---|---|---|---|"]
    for r in nvme_rows:
        ratio = f"{r['gbs'] / fio:.2f}" if fio else "n/a"
        lines.append(f"| {r['path']} | {r['bytes'] / MIB:.0f} | {r['gbs']:.2f} | {ratio} | {r['why']} |")
    md = "\n".join(lines) + "\n"
    (out / "gpu.md").write_text(md)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label in ("open", "connect"):
            mine = [r for r in rows if r["store"] == label]
            ax.plot([r["bytes"] / MIB for r in mine], [r["h2d_gbs"] for r in mine], marker="o", label=f"{label} h2d")
            ax.plot([r["bytes"] / MIB for r in mine], [r["d2h_gbs"] for r in mine], marker="s", label=f"{label} d2h")
        pinned = [r for r in rows if r["store"] == "open"]
        ax.plot([r["bytes"] / MIB for r in pinned], [r["h2d_pinned_gbs"] for r in pinned], "k--", label="pinned h2d")
        ax.plot([r["bytes"] / MIB for r in pinned], [r["d2h_pinned_gbs"] for r in pinned], "k:", label="pinned d2h")
        ax.set_xscale("log")
        ax.set_xlabel("object MiB")
        ax.set_ylabel("GB/s")
        ax.set_title(res["device"])
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "gpu.png", dpi=120)
    console.print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
