"""Daemon benchmark: small-object latency beside redis, large objects beside memcpy.

    python bench/daemon.py [--quick] [--out DIR]

Measured side by side in one run on this machine:

* 4 KiB put/get latency (p50, p99) and ops/s with 1 and 4 client processes,
  through ``tierd serve`` and through a redis-server on a Unix socket with
  redis-py (the tool a user would otherwise pick for a shared cache);
* 64 MiB put/get GB/s through the daemon (the client copies into the shared
  arena itself) beside single-thread memcpy (np.copyto) of the same bytes,
  and beside redis SET/GET of the same bytes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tierd  # noqa: E402
from bench._common import (  # noqa: E402
    BUSY_COPY,
    MIB,
    BenchContext,
    median_gbs,
    percentile_us,
    private_daemon,
    pyplot,
    row,
    save_figure,
    standalone,
    start_redis,
    verdict,
)


def _timed_pairs(put: Any, get: Any, n_ops: int, size: int, seed: int, q: Any) -> None:
    """``n_ops`` put+get pairs of ``size`` random bytes; sends (put latencies, get latencies, start, end) to ``q``.

    start and end are ``time.perf_counter()`` (CLOCK_MONOTONIC, the same clock in every process) around the
    timed loop, so aggregate ops/s leaves out process start-up and connecting.
    """
    value = os.urandom(size)
    puts, gets = [], []
    started = time.perf_counter()
    for i in range(n_ops):
        key = f"bench/{seed}-{i % 64}"
        t0 = time.perf_counter()
        put(key, value)
        t1 = time.perf_counter()
        got = get(key)
        t2 = time.perf_counter()
        if got != value:
            raise RuntimeError(f"{key}: the value read back differs from the one written")
        puts.append(t1 - t0)
        gets.append(t2 - t1)
    q.put((puts, gets, started, time.perf_counter()))


def _tierd_worker(sock: str, n_ops: int, size: int, seed: int, q: Any) -> None:
    with tierd.connect(sock) as store:
        _timed_pairs(store.put, store.get, n_ops, size, seed, q)


def _redis_worker(sock: str, n_ops: int, size: int, seed: int, q: Any) -> None:
    import redis

    r = redis.Redis.from_url(sock)
    _timed_pairs(r.set, r.get, n_ops, size, seed, q)
    r.close()


def _run_clients(target: Any, sock: str, clients: int, n_ops: int, size: int) -> dict[str, float]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(sock, n_ops, size, i, q)) for i in range(clients)]
    for pr in procs:
        pr.start()
    results = [q.get(timeout=600) for _ in procs]
    elapsed = max(r[3] for r in results) - min(r[2] for r in results)
    for pr in procs:
        pr.join(timeout=60)
    puts = sorted(x for r in results for x in r[0])
    gets = sorted(x for r in results for x in r[1])
    both = sorted(puts + gets)
    return {"put_p50_us": percentile_us(puts, 0.5), "put_p99_us": percentile_us(puts, 0.99),
            "get_p50_us": percentile_us(gets, 0.5), "get_p99_us": percentile_us(gets, 0.99),
            "p99_us": percentile_us(both, 0.99), "ops_per_s": 2 * clients * n_ops / elapsed}


def _large(sock: str, redis_sock: str | None, size: int, reps: int) -> dict[str, Any]:
    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    out = torch.empty_like(src)
    a, b = src.numpy(), out.numpy()
    res: dict[str, Any] = {"size": size, "memcpy_gbs": median_gbs(lambda: np.copyto(b, a), size, reps)}
    with tierd.connect(sock) as store:
        res["tierd_put_gbs"] = median_gbs(lambda: store.put("bench/large", src), size, reps)
        res["tierd_get_gbs"] = median_gbs(lambda: store.get("bench/large", out=out), size, reps)
        if not torch.equal(out, src):
            raise RuntimeError("the large object read back differs from the one written")
        store.delete("bench/large")
    if redis_sock:
        import redis

        r = redis.Redis.from_url(redis_sock)
        raw = a.tobytes()
        res["redis_set_gbs"] = median_gbs(lambda: r.set("bench/large", raw), size, reps)
        res["redis_get_gbs"] = median_gbs(lambda: r.get("bench/large"), size, reps)
        r.delete("bench/large")
    return res


def run(ctx: BenchContext) -> dict[str, Any]:
    ops = 100 if ctx.smoke else 500 if ctx.quick else 3000
    small = 4096
    large_size = 16 * MIB if ctx.smoke else 64 * MIB
    task = ctx.progress.add_task("daemon: 4 KiB vs redis, 64 MiB vs memcpy", total=5)
    with tempfile.TemporaryDirectory(prefix="tierd-bd-", dir="/tmp") as tmp_s:  # short path: AF_UNIX limit
        tmp = Path(tmp_s)
        redis_proc = start_redis(tmp, unix=True)
        if redis_proc is None:
            ctx.console.print("[yellow]no redis-server or redis-py: no redis column[/]")
        redis_sock = redis_proc[1] if redis_proc else None
        try:
            with private_daemon(tmp) as sock:
                rows = []
                for clients in (1, 4):
                    rows.append({"system": "tierd", "clients": clients,
                                 **_run_clients(_tierd_worker, sock, clients, ops, small)})
                    ctx.progress.advance(task)
                    if redis_sock:
                        rows.append({"system": "redis", "clients": clients,
                                     **_run_clients(_redis_worker, redis_sock, clients, ops, small)})
                    ctx.progress.advance(task)
                large = _large(sock, redis_sock, large_size, 5 if ctx.quick or ctx.smoke else 15)
                ctx.progress.advance(task)
        finally:
            if redis_proc:
                redis_proc[0].terminate()
                redis_proc[0].wait(timeout=30)
    ratios = []
    for clients in (1, 4):
        t = next(r for r in rows if r["system"] == "tierd" and r["clients"] == clients)
        r = next((r for r in rows if r["system"] == "redis" and r["clients"] == clients), None)
        if r:
            ratios.append({"clients": clients, "put_p50": t["put_p50_us"] / r["put_p50_us"],
                           "get_p50": t["get_p50_us"] / r["get_p50_us"], "ops": t["ops_per_s"] / r["ops_per_s"]})
    return {"small_size": small, "ops": ops, "small": rows, "ratios_vs_redis": ratios, "large": large}


def markdown(res: dict[str, Any]) -> str:
    lines = [f"#### {res['small_size'] // 1024} KiB objects, {res['ops']} put+get pairs per client\n",
             "| system | clients | put p50 µs | put p99 µs | get p50 µs | get p99 µs | ops/s |",
             "|---|---|---|---|---|---|---|"]
    for r in res["small"]:
        lines.append(f"| {r['system']} | {r['clients']} | {r['put_p50_us']:.0f} | {r['put_p99_us']:.0f} | "
                     f"{r['get_p50_us']:.0f} | {r['get_p99_us']:.0f} | {r['ops_per_s']:.0f} |")
    if res["ratios_vs_redis"]:
        lines += ["", "| clients | tierd p50 / redis p50 (put) | (get) | tierd ops/s / redis ops/s |", "|---|---|---|---|"]
        for r in res["ratios_vs_redis"]:
            lines.append(f"| {r['clients']} | {r['put_p50']:.2f} | {r['get_p50']:.2f} | {r['ops']:.2f} |")
    lg = res["large"]
    lines += ["", f"#### {lg['size'] // MIB} MiB objects\n", "| measure | GB/s | / memcpy |", "|---|---|---|"]
    for key, label in (("memcpy_gbs", "memcpy, 1 thread (limit)"), ("tierd_put_gbs", "tierd put (client copies into arena)"),
                       ("tierd_get_gbs", "tierd get(out=)"), ("redis_set_gbs", "redis SET"), ("redis_get_gbs", "redis GET")):
        if key in lg:
            lines.append(f"| {label} | {lg[key]:.2f} | {lg[key] / lg['memcpy_gbs']:.2f} |")
    return "\n".join(lines) + "\n"


_SLOW_SMALL = ("the daemon is one Python process (~45-75 µs of interpreter time a request) against redis's C "
               "event loop, and the clients share the cores with it")


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    by = {(r["system"], r["clients"]): r for r in res["small"]}
    kib = res["small_size"] // 1024
    for op in ("put", "get"):
        for clients in (1, 4):
            t, r = by[("tierd", clients)], by.get(("redis", clients))
            ratio = t[f"{op}_p50_us"] / r[f"{op}_p50_us"] if r else None
            rows.append(row(f"{kib} KiB {op} p50, {clients} client(s)", f"{t[f'{op}_p50_us']:.0f} µs "
                            f"(p99 {t[f'{op}_p99_us']:.0f})",
                            peer=f"redis-py {r[f'{op}_p50_us']:.0f} µs (p99 {r[f'{op}_p99_us']:.0f})" if r else "",
                            vs_peer=f"{ratio:.2f}" if ratio else "", issue=3, target="p50 <= redis-py's",
                            status=verdict(ratio <= 1.0) if ratio else "not run: no redis-server",
                            note=_SLOW_SMALL if ratio and ratio > 1.0 else ""))
    for clients in (1, 4):
        t, r = by[("tierd", clients)], by.get(("redis", clients))
        rows.append(row(f"{kib} KiB ops/s, {clients} client(s)", f"{t['ops_per_s']:.0f}",
                        peer=f"redis-py {r['ops_per_s']:.0f}" if r else "",
                        vs_peer=f"{t['ops_per_s'] / r['ops_per_s']:.2f}" if r else ""))
    lg = res["large"]
    for op, peer in (("put", "redis_set_gbs"), ("get", "redis_get_gbs")):
        ratio = lg[f"tierd_{op}_gbs"] / lg["memcpy_gbs"]
        rows.append(row(f"{lg['size'] // MIB} MiB {op} through the daemon", f"{lg[f'tierd_{op}_gbs']:.1f} GB/s",
                        limit=f"memcpy 1 thread {lg['memcpy_gbs']:.1f} GB/s",
                        peer=f"redis {'SET' if op == 'put' else 'GET'} {lg[peer]:.2f} GB/s" if peer in lg else "",
                        vs_limit=f"{ratio:.2f}", vs_peer=f"{lg[f'tierd_{op}_gbs'] / lg[peer]:.1f}" if peer in lg else "",
                        issue=3, target=">= 0.8 x memcpy", status=verdict(ratio >= 0.8),
                        note="" if ratio >= 0.8 else BUSY_COPY))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = res["small"]
    labels = [f"{r['system']}\n{r['clients']} client(s)" for r in rows]
    x = np.arange(len(rows))
    ax1.bar(x - 0.2, [r["put_p50_us"] for r in rows], 0.4, label="put p50")
    ax1.bar(x + 0.2, [r["get_p50_us"] for r in rows], 0.4, label="get p50")
    ax1.errorbar(x - 0.2, [r["put_p50_us"] for r in rows], yerr=[[0] * len(rows), [r["put_p99_us"] - r["put_p50_us"] for r in rows]], fmt="none", ecolor="k", capsize=3)
    ax1.errorbar(x + 0.2, [r["get_p50_us"] for r in rows], yerr=[[0] * len(rows), [r["get_p99_us"] - r["get_p50_us"] for r in rows]], fmt="none", ecolor="k", capsize=3)
    ax1.set_xticks(x, labels, fontsize=8)
    ax1.set(ylabel="µs (bar p50, whisker p99)", title=f"{res['small_size'] // 1024} KiB put/get latency")
    ax1.legend()
    lg = res["large"]
    keys = [k for k in ("memcpy_gbs", "tierd_put_gbs", "tierd_get_gbs", "redis_set_gbs", "redis_get_gbs") if k in lg]
    ax2.bar(range(len(keys)), [lg[k] for k in keys], color=["k", "C0", "C1", "C2", "C3"][: len(keys)])
    ax2.set_xticks(range(len(keys)), [k.replace("_gbs", "").replace("_", " ") for k in keys], fontsize=8)
    ax2.set(ylabel="GB/s", title=f"{lg['size'] // MIB} MiB objects")
    return save_figure(fig, out, "daemon")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "daemon", argv)


if __name__ == "__main__":
    sys.exit(main())
