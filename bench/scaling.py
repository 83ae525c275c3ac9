"""Scaling benchmark: how the cost of a store grows with object size, object count and clients.

    python bench/scaling.py [--quick] [--out DIR] [--dir DIR]

* Object size, 4 KiB .. 1 GiB (``--quick``: .. 16 MiB): put and get(out=)
  through a real daemon, time per operation and GB/s, beside single-thread
  memcpy of the same bytes (the cost floor of a copy).
* Object count, 1e3 .. 1e6 objects of 64 bytes in one embedded store
  (``--quick``: .. 1e4): index memory per object, by tracemalloc (Python
  allocations, up to 1e5 objects: tracing slows puts) and by the growth of
  the process's anonymous RSS (``RssAnon``: the arena is shared memory and
  not in it); ``get`` and ``exists`` latency (p50, p99) of random stored keys,
  and ``exists`` of missing keys.
* Clients, 1 .. 16 processes (``--quick``: 1, 4, 16) through one daemon,
  4 KiB put+get pairs: aggregate ops/s and p99 latency, beside the same
  clients on a redis-server with redis-py.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tierd  # noqa: E402
from bench._common import (  # noqa: E402
    GIB,
    KIB,
    MIB,
    BenchContext,
    percentile_us,
    private_daemon,
    pyplot,
    row,
    save_figure,
    size_label,
    standalone,
    start_redis,
    timeit_gbs,
)
from bench.daemon import _redis_worker, _run_clients, _tierd_worker  # noqa: E402

VALUE = b"v" * 64  # a small object: the index entry is what is measured, not the bytes


def _by_size(ctx: BenchContext, sock: str, sizes: list[int]) -> list[dict[str, Any]]:
    task = ctx.progress.add_task("scaling: object size through the daemon", total=len(sizes))
    rows = []
    budget_s = 0.1 if ctx.smoke else 0.25 if ctx.quick else 0.5
    with tierd.connect(sock) as store:
        for n in sizes:
            src = torch.randint(0, 256, (n,), dtype=torch.uint8)
            out = torch.empty_like(src)
            a, b = src.numpy(), out.numpy()
            memcpy = timeit_gbs(lambda: np.copyto(b, a), nbytes=n, budget_s=budget_s)
            put = timeit_gbs(lambda: store.put("scale/x", src), nbytes=n, budget_s=budget_s)
            get = timeit_gbs(lambda: store.get("scale/x", out=out), nbytes=n, budget_s=budget_s)
            if not torch.equal(out, src):
                raise RuntimeError(f"get returned different bytes at {size_label(n)}")
            store.delete("scale/x")
            rows.append({"size": n, "put_gbs": put, "get_gbs": get, "memcpy_gbs": memcpy,
                         "put_us": n / put / 1e3, "get_us": n / get / 1e3, "memcpy_us": n / memcpy / 1e3})
            ctx.progress.advance(task)
    return rows


def _rss_anon() -> int:
    """This process's anonymous resident memory (heap; the arena is shared memory and not counted)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _lookups(store: Any, n: int, samples: int) -> dict[str, float]:
    rng = random.Random(n)
    stored = [f"idx/o{rng.randrange(n):07d}" for _ in range(samples)]
    missing = [f"idx/missing{i:07d}" for i in range(samples)]
    res = {}
    for name, fn, keys in (("get", store.get, stored), ("exists", store.exists, stored),
                           ("exists_missing", store.exists, missing)):
        times = []
        for k in keys:
            t0 = time.perf_counter()
            fn(k)
            times.append(time.perf_counter() - t0)
        times.sort()
        res[f"{name}_p50_us"] = percentile_us(times, 0.5)
        res[f"{name}_p99_us"] = percentile_us(times, 0.99)
    return res


def _by_count(ctx: BenchContext, counts: list[int], traced_max: int) -> list[dict[str, Any]]:
    task = ctx.progress.add_task("scaling: objects in the index", total=2 * len(counts))
    arena = max(64 * MIB, int(max(counts) * 4 * KIB * 1.25))  # every object takes one 4 KiB extent
    cfg = {"tiers": {"host": {"size": arena}, "nvme": {"path": str(ctx.workdir / "scale-n"), "size": "1GiB"}}}
    samples = 500 if ctx.smoke else 2000
    rows: list[dict[str, Any]] = []
    # RSS and lookups first, so that memory freed by the traced pass is not reused under the RSS figures.
    with tierd.open(cfg) as store:
        base = _rss_anon()
        done = 0
        for n in counts:
            t0 = time.perf_counter()
            for i in range(done, n):
                store.put(f"idx/o{i:07d}", VALUE)
            put_us = (time.perf_counter() - t0) / (n - done) * 1e6
            done = n
            rows.append({"objects": n, "put_us": put_us, "rss_bytes_per_object": (_rss_anon() - base) / n,
                         **_lookups(store, n, samples)})
            ctx.progress.advance(task)
    cfg["tiers"]["nvme"]["path"] = str(ctx.workdir / "scale-t")
    with tierd.open(cfg) as store:
        tracemalloc.start()
        try:
            base_traced = tracemalloc.get_traced_memory()[0]
            done = 0
            for r in rows:
                n = r["objects"]
                if n > traced_max:
                    r["traced_bytes_per_object"] = None
                    ctx.progress.advance(task)
                    continue
                for i in range(done, n):
                    store.put(f"idx/o{i:07d}", VALUE)
                done = n
                r["traced_bytes_per_object"] = (tracemalloc.get_traced_memory()[0] - base_traced) / n
                ctx.progress.advance(task)
        finally:
            tracemalloc.stop()
    return rows


def _by_clients(ctx: BenchContext, sock: str, tmp: Path, clients: list[int], ops: int) -> list[dict[str, Any]]:
    task = ctx.progress.add_task("scaling: client processes through one daemon", total=len(clients))
    rows = []
    redis = start_redis(tmp, unix=True)
    try:
        for n in clients:
            t = _run_clients(_tierd_worker, sock, n, ops, 4096)
            r = _run_clients(_redis_worker, redis[1], n, ops, 4096) if redis else None
            rows.append({"clients": n, "ops_per_s": t["ops_per_s"], "p99_us": t["p99_us"],
                         "p50_us": statistics.mean([t["put_p50_us"], t["get_p50_us"]]),
                         "redis_ops_per_s": r["ops_per_s"] if r else None, "redis_p99_us": r["p99_us"] if r else None})
            ctx.progress.advance(task)
    finally:
        if redis:
            redis[0].terminate()
            redis[0].wait(timeout=30)
    return rows


def run(ctx: BenchContext) -> dict[str, Any]:
    if ctx.smoke:
        top, counts, clients, ops = 256 * KIB, [1000], [1, 2], 50
    elif ctx.quick:
        top, counts, clients, ops = 16 * MIB, [1000, 10_000], [1, 4, 16], 150
    else:
        top, counts, clients, ops = GIB, [1000, 10_000, 100_000, 1_000_000], [1, 2, 4, 8, 16], 1000
    sizes = [4 * KIB << (2 * k) for k in range(20) if 4 * KIB << (2 * k) <= top]
    res: dict[str, Any] = {"ops_per_client": ops, "value_bytes": len(VALUE),
                           "count": _by_count(ctx, counts, traced_max=100_000)}
    host = max(GIB, 3 * top + 64 * MIB)  # room for the largest object, its staging copy and slack
    with tempfile.TemporaryDirectory(prefix="tierd-bs-", dir="/tmp") as tmp_s:  # short path: AF_UNIX limit
        tmp = Path(tmp_s)
        with private_daemon(tmp, host_size=f"{host // MIB}MiB") as sock:
            res["size"] = _by_size(ctx, sock, sizes)
            res["clients"] = _by_clients(ctx, sock, tmp, clients, ops)
    return res


def _f(x: float | None, fmt: str = "{:.0f}") -> str:
    return fmt.format(x) if x is not None else "-"


def markdown(res: dict[str, Any]) -> str:
    lines = ["#### object size (through the daemon)\n",
             "| size | put µs | get(out=) µs | memcpy µs | put GB/s | get GB/s | memcpy GB/s |", "|---|---|---|---|---|---|---|"]
    for r in res["size"]:
        lines.append(f"| {size_label(r['size'])} | {r['put_us']:.0f} | {r['get_us']:.0f} | {r['memcpy_us']:.1f} | "
                     f"{r['put_gbs']:.2f} | {r['get_gbs']:.2f} | {r['memcpy_gbs']:.2f} |")
    lines += ["", f"#### objects in one embedded store ({res['value_bytes']}-byte values)\n",
              "| objects | put µs | index bytes/object (tracemalloc) | RssAnon bytes/object | get p50 / p99 µs "
              "| exists p50 / p99 µs | exists (missing) p50 µs |", "|---|---|---|---|---|---|---|"]
    for r in res["count"]:
        lines.append(f"| {r['objects']:,} | {r['put_us']:.0f} | {_f(r['traced_bytes_per_object'])} | "
                     f"{r['rss_bytes_per_object']:.0f} | {r['get_p50_us']:.1f} / {r['get_p99_us']:.1f} | "
                     f"{r['exists_p50_us']:.1f} / {r['exists_p99_us']:.1f} | {r['exists_missing_p50_us']:.1f} |")
    lines += ["", f"#### client processes through one daemon (4 KiB put+get pairs, {res['ops_per_client']} a client)\n",
              "| clients | tierd ops/s | tierd p50 µs | tierd p99 µs | redis-py ops/s | redis-py p99 µs |",
              "|---|---|---|---|---|---|"]
    for r in res["clients"]:
        lines.append(f"| {r['clients']} | {r['ops_per_s']:.0f} | {r['p50_us']:.0f} | {r['p99_us']:.0f} | "
                     f"{_f(r['redis_ops_per_s'])} | {_f(r['redis_p99_us'])} |")
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    sz, ct, cl = res["size"], res["count"], res["clients"]
    small, big = sz[0], sz[-1]
    rows = [row(f"op cost, {size_label(small['size'])} via daemon (put / get)",
                f"{small['put_us']:.0f} / {small['get_us']:.0f} µs", limit=f"memcpy {small['memcpy_us']:.2f} µs",
                note="per-request overhead (socket round trip, Python) dominates small objects"),
            row(f"throughput, {size_label(big['size'])} via daemon (put / get)",
                f"{big['put_gbs']:.1f} / {big['get_gbs']:.1f} GB/s", limit=f"memcpy 1 thread {big['memcpy_gbs']:.1f} GB/s",
                vs_limit=f"{big['put_gbs'] / big['memcpy_gbs']:.2f} / {big['get_gbs'] / big['memcpy_gbs']:.2f}")]
    first, last = ct[0], ct[-1]
    traced = [r for r in ct if r["traced_bytes_per_object"] is not None]
    mem = f"{traced[-1]['traced_bytes_per_object']:.0f} B traced at {traced[-1]['objects']:,}; " if traced else ""
    rows.append(row(f"index memory per object, {last['objects']:,} objects",
                    mem + f"{last['rss_bytes_per_object']:.0f} B RssAnon"))
    rows.append(row(f"get / exists p50, {first['objects']:,} -> {last['objects']:,} objects",
                    f"{first['get_p50_us']:.1f} -> {last['get_p50_us']:.1f} / {first['exists_p50_us']:.1f} -> "
                    f"{last['exists_p50_us']:.1f} µs",
                    vs_limit=f"{last['get_p50_us'] / first['get_p50_us']:.2f} x (get)"))
    one, most = cl[0], cl[-1]
    peer = (f"redis-py {most['redis_ops_per_s']:.0f} ops/s, p99 {most['redis_p99_us']:.0f} µs"
            if most["redis_ops_per_s"] else "")
    rows.append(row(f"4 KiB ops/s, {one['clients']} -> {most['clients']} clients",
                    f"{one['ops_per_s']:.0f} -> {most['ops_per_s']:.0f} ops/s, p99 {most['p99_us']:.0f} µs", peer=peer,
                    vs_peer=f"{most['ops_per_s'] / most['redis_ops_per_s']:.2f}" if most["redis_ops_per_s"] else "",
                    note="one Python daemon process; the clients share the same cores"))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.5))
    sz = res["size"]
    xs = [r["size"] for r in sz]
    ax1.plot(xs, [r["put_us"] for r in sz], "o-", label="tierd put (daemon)")
    ax1.plot(xs, [r["get_us"] for r in sz], "s-", label="tierd get(out=) (daemon)")
    ax1.plot(xs, [r["memcpy_us"] for r in sz], "k--", label="memcpy, 1 thread")
    ax1.set(xscale="log", yscale="log", xlabel="object size (bytes)", ylabel="µs per operation",
            title="cost vs object size")
    ax1.legend(fontsize=8)
    ct = res["count"]
    xs = [r["objects"] for r in ct]
    ax2.plot(xs, [r["get_p50_us"] for r in ct], "o-", label="get p50")
    ax2.plot(xs, [r["exists_p50_us"] for r in ct], "s-", label="exists p50")
    ax2.plot(xs, [r["get_p99_us"] for r in ct], "o:", label="get p99")
    ax2.set(xscale="log", xlabel="objects in the store", ylabel="µs", title="lookup vs object count")
    ax2b = ax2.twinx()
    ax2b.plot(xs, [r["rss_bytes_per_object"] for r in ct], "k^--", label="RssAnon bytes/object")
    ax2b.set(ylabel="bytes per object")
    ax2.legend(fontsize=8, loc="upper left")
    ax2b.legend(fontsize=8, loc="upper right")
    cl = res["clients"]
    xs = [r["clients"] for r in cl]
    ax3.plot(xs, [r["ops_per_s"] for r in cl], "o-", label="tierd ops/s")
    if cl[0]["redis_ops_per_s"]:
        ax3.plot(xs, [r["redis_ops_per_s"] for r in cl], "s--", label="redis-py ops/s")
    ax3.set(xscale="log", xlabel="client processes", ylabel="ops/s (4 KiB put+get)", title="clients")
    ax3b = ax3.twinx()
    ax3b.plot(xs, [r["p99_us"] for r in cl], "C0:", label="tierd p99 µs")
    if cl[0]["redis_p99_us"]:
        ax3b.plot(xs, [r["redis_p99_us"] for r in cl], "C1:", label="redis p99 µs")
    ax3b.set(ylabel="p99 µs")
    ax3.legend(fontsize=8, loc="upper left")
    ax3b.legend(fontsize=8, loc="lower right")
    return save_figure(fig, out, "scaling")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "scaling", argv)


if __name__ == "__main__":
    sys.exit(main())
