"""GPU suite: copies through the pinned host arena beside raw pinned cudaMemcpy, nvme -> GPU (issue 8).

    tierd bench gpu [--quick]        or        python bench/gpu.py [--quick] [--out DIR]

Measured side by side in one run, same bytes, same device:

* device-to-host: ``store.put(cuda_tensor)`` (one DMA into the registered
  arena on tierd's copy stream, plus the put's bookkeeping) vs the limit, a
  raw ``copy_`` into a ``pin_memory`` tensor (pinned cudaMemcpy), and vs the
  peer a user would write, ``tensor.cpu()`` (pageable);
* host-to-device: ``store.get(key, out=cuda_tensor)`` vs the pinned copy back;
* both through ``tierd.open()`` and a daemon (``tierd.connect()``), 1 MiB .. 1 GiB;
* nvme -> GPU: ``get(out=cuda_tensor)`` of an nvme object through kvikio (GDS,
  or its compatibility mode) vs POSIX read into host memory plus a copy,
  beside fio's O_DIRECT read of the same directory.

Target (issue 8): arena copies >= 0.9 x raw pinned cudaMemcpy. Without CUDA
every row says why it did not run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import tierd  # noqa: E402
from bench._common import (  # noqa: E402
    GIB,
    MIB,
    BenchContext,
    no_cuda_reason,
    private_daemon,
    pyplot,
    row,
    save_figure,
    size_label,
    span,
    standalone,
    timeit_gbs,
    verdict,
)


def _synced(fn: Any) -> Any:
    def run() -> None:
        fn()
        torch.cuda.synchronize()
    return run


def bench_copies(ctx: BenchContext, store: tierd.Store, label: str, sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    task = ctx.progress.add_task(f"gpu: arena copies ({label})", total=len(sizes))
    for n in sizes:
        src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
        pinned = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        back = torch.empty_like(src)
        key = f"bench/gpu-{label}-{n}"
        d2h_raw = timeit_gbs(_synced(lambda: pinned.copy_(src, non_blocking=True)), nbytes=n)
        d2h_cpu = timeit_gbs(_synced(lambda: src.cpu()), nbytes=n)
        d2h = timeit_gbs(_synced(lambda: store.put(key, src)), nbytes=n)
        h2d_raw = timeit_gbs(_synced(lambda: back.copy_(pinned, non_blocking=True)), nbytes=n)
        h2d = timeit_gbs(_synced(lambda: store.get(key, out=back)), nbytes=n)
        if not torch.equal(back, src):
            raise RuntimeError(f"{label}: bytes differ after the GPU round trip of {size_label(n)}")
        store.delete(key)
        rows.append({"store": label, "size": n, "d2h_gbs": d2h, "d2h_pinned_gbs": d2h_raw, "d2h_cpu_gbs": d2h_cpu,
                     "h2d_gbs": h2d, "h2d_pinned_gbs": h2d_raw, "d2h_vs_pinned": d2h / d2h_raw,
                     "h2d_vs_pinned": h2d / h2d_raw, "d2h_vs_cpu": d2h / d2h_cpu})
        ctx.progress.advance(task)
    return rows


def bench_nvme(ctx: BenchContext, sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    task = ctx.progress.add_task("gpu: nvme -> GPU", total=2 * len(sizes))
    for gds in ("auto", "off"):
        cfg = {"tiers": {"host": {"size": "256MiB"},
                         "nvme": {"path": str(ctx.workdir / f"gpu-{gds}"), "size": 2 * max(sizes) + 64 * MIB,
                                  "gds": gds}}}
        with tierd.open(cfg) as store:
            nvme = store.engine.nvme
            path = "kvikio" if nvme.gds else "posix + copy"
            for n in sizes:
                src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
                store.put("bench/nvme", src, tier="nvme")
                out = torch.empty_like(src)
                gbs = timeit_gbs(_synced(lambda: store.get("bench/nvme", out=out)), nbytes=n)
                if not torch.equal(out, src):
                    raise RuntimeError(f"nvme -> GPU ({path}) returned different bytes at {size_label(n)}")
                rows.append({"path": path, "gds": gds, "size": n, "gbs": gbs, "why": nvme.gds_reason})
                store.delete("bench/nvme")
                ctx.progress.advance(task)
    return rows


def run(ctx: BenchContext) -> dict[str, Any]:
    reason = no_cuda_reason()
    if reason:
        return {"skipped": reason}
    if ctx.smoke:
        sizes, nvme_sizes = [MIB], [16 * MIB]
    elif ctx.quick:
        sizes, nvme_sizes = [MIB, 16 * MIB, 256 * MIB], [16 * MIB, 256 * MIB]
    else:
        sizes, nvme_sizes = [MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB], [16 * MIB, 256 * MIB, GIB]
    host = 4 * max(sizes)
    embedded = {"tiers": {"host": {"size": host}, "nvme": {"path": str(ctx.workdir / "gpu-e"), "size": "1GiB"}}}
    with tierd.open(embedded) as store:
        rows = bench_copies(ctx, store, "open", sizes)
    daemon_dir = ctx.workdir / "gpu-d"
    daemon_dir.mkdir(exist_ok=True)
    with private_daemon(daemon_dir, host_size=f"{host // MIB}MiB") as sock, tierd.connect(sock) as store:
        rows += bench_copies(ctx, store, "connect", sizes)
    return {"device": torch.cuda.get_device_name(), "copies": rows, "nvme": bench_nvme(ctx, nvme_sizes),
            "fio_read_gbs": ctx.fio("read")}


def markdown(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"GPU suite not run: {res['skipped']}.\n"
    lines = [f"Device: {res['device']}.\n",
             "| store | size | D2H GB/s | pinned cudaMemcpy | / pinned | / .cpu() | H2D GB/s | pinned cudaMemcpy | / pinned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["copies"]:
        lines.append(f"| {r['store']} | {size_label(r['size'])} | {r['d2h_gbs']:.2f} | {r['d2h_pinned_gbs']:.2f} | "
                     f"{r['d2h_vs_pinned']:.2f} | {r['d2h_vs_cpu']:.2f} | {r['h2d_gbs']:.2f} | "
                     f"{r['h2d_pinned_gbs']:.2f} | {r['h2d_vs_pinned']:.2f} |")
    fio = res["fio_read_gbs"]
    lines += ["", f"nvme -> GPU (fio O_DIRECT read, same directory: {fio:.2f} GB/s)\n" if fio else "",
              "| path | size | GB/s | / fio | why |", "|---|---|---|---|---|"]
    for r in res["nvme"]:
        lines.append(f"| {r['path']} | {size_label(r['size'])} | {r['gbs']:.2f} | "
                     f"{r['gbs'] / fio if fio else float('nan'):.2f} | {r['why']} |")
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    target = ">= 0.9 x pinned cudaMemcpy"
    if "skipped" in res:
        why = f"not run: {res['skipped']}"
        return [row("GPU put (D2H) through the host arena", "-", limit="pinned cudaMemcpy", issue=8, target=target,
                    status=why),
                row("GPU get (H2D) through the host arena", "-", limit="pinned cudaMemcpy", issue=8, target=target,
                    status=why),
                row("nvme -> GPU, kvikio vs POSIX read + copy", "-", issue=8, target="report", status=why)]
    rows = []
    for label in ("open", "connect"):
        mine = [r for r in res["copies"] if r["store"] == label]
        big = [r for r in mine if r["size"] >= 64 * MIB] or mine
        for d, op in (("d2h", "put (D2H)"), ("h2d", "get (H2D)")):
            ratios = [r[f"{d}_vs_pinned"] for r in big]
            rows.append(row(f"GPU {op} through the arena, {label}, {size_label(big[0]['size'])} .. "
                            f"{size_label(big[-1]['size'])}", span([r[f"{d}_gbs"] for r in big]) + " GB/s",
                            limit="pinned cudaMemcpy " + span([r[f"{d}_pinned_gbs"] for r in big]) + " GB/s",
                            peer=".cpu() " + span([r["d2h_cpu_gbs"] for r in big]) + " GB/s" if d == "d2h" else "",
                            vs_limit=span(ratios), vs_peer=span([r["d2h_vs_cpu"] for r in big]) if d == "d2h" else "",
                            issue=8, target=target, status=verdict(min(ratios) >= 0.9)))
    fio = res["fio_read_gbs"]
    by = {p: [r for r in res["nvme"] if r["path"] == p] for p in {r["path"] for r in res["nvme"]}}
    kv, posix = by.get("kvikio", []), by.get("posix + copy", [])
    if kv and posix:
        rows.append(row("nvme -> GPU, kvikio", span([r["gbs"] for r in kv]) + " GB/s",
                        limit=f"fio read {fio:.2f} GB/s" if fio else "", peer="POSIX read + copy "
                        + span([r["gbs"] for r in posix]) + " GB/s",
                        vs_limit=span([r["gbs"] / fio for r in kv]) if fio else "",
                        vs_peer=span([a["gbs"] / b["gbs"] for a, b in zip(kv, posix, strict=False)]),
                        issue=8, target="report"))
    else:
        why = (posix or kv)[0]["why"] if posix or kv else "no rows"
        rows.append(row("nvme -> GPU, kvikio vs POSIX read + copy", "-", issue=8, target="report",
                        status=f"not run: {why}"))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None or "skipped" in res:
        return []
    fig, ax = plt.subplots(figsize=(7, 4))
    for label in ("open", "connect"):
        mine = [r for r in res["copies"] if r["store"] == label]
        ax.plot([r["size"] / MIB for r in mine], [r["h2d_gbs"] for r in mine], marker="o", label=f"{label} H2D")
        ax.plot([r["size"] / MIB for r in mine], [r["d2h_gbs"] for r in mine], marker="s", label=f"{label} D2H")
    ref = [r for r in res["copies"] if r["store"] == "open"]
    ax.plot([r["size"] / MIB for r in ref], [r["h2d_pinned_gbs"] for r in ref], "k--", label="pinned H2D")
    ax.plot([r["size"] / MIB for r in ref], [r["d2h_pinned_gbs"] for r in ref], "k:", label="pinned D2H")
    ax.set_xscale("log")
    ax.set_xlabel("object MiB")
    ax.set_ylabel("GB/s")
    ax.set_title(f"GPU copies through the arena ({res['device']})")
    ax.legend(fontsize=7)
    return save_figure(fig, out, "gpu")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "gpu", argv)


if __name__ == "__main__":
    sys.exit(main())
