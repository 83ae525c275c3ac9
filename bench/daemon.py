"""Daemon benchmark: small-object latency beside redis, large objects beside memcpy.

    python bench/daemon.py [--quick] [--out DIR]

Measured side by side in one run on this machine:

* 4 KiB put/get latency (p50, p99) and ops/s with 1 and 4 client processes,
  through ``tierd serve`` and through a redis-server on a Unix socket with
  redis-py (the tool a user would otherwise pick for a shared cache);
* 64 MiB put/get GB/s through the daemon (the client copies into the shared
  arena itself) beside single-thread memcpy (np.copyto) of the same bytes,
  and beside redis SET/GET of the same bytes.

Writes daemon.json, daemon.md and daemon.png into --out.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import Progress

import tierd
from tierd.daemon.launch import spawn

sys.path.insert(0, str(Path(__file__).parent))
from _common import bench_args, median_gbs, pyplot, start_redis  # noqa: E402

console = Console(width=132)
MIB = 1 << 20


def _timed_pairs(put: Any, get: Any, n_ops: int, size: int, seed: int, q: Any) -> None:
    """``n_ops`` put+get pairs of ``size`` random bytes; sends (put latencies, get latencies) to ``q``."""
    value = os.urandom(size)
    puts, gets = [], []
    for i in range(n_ops):
        key = f"bench/{seed}-{i % 64}"
        t0 = time.perf_counter()
        put(key, value)
        t1 = time.perf_counter()
        got = get(key)
        t2 = time.perf_counter()
        assert got == value
        puts.append(t1 - t0)
        gets.append(t2 - t1)
    q.put((puts, gets))


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
    started = time.perf_counter()
    for pr in procs:
        pr.start()
    results = [q.get(timeout=600) for _ in procs]
    elapsed = time.perf_counter() - started
    for pr in procs:
        pr.join(timeout=60)
    puts = sorted(x for r in results for x in r[0])
    gets = sorted(x for r in results for x in r[1])

    def pct(xs: list[float], q_: float) -> float:
        return xs[min(len(xs) - 1, int(q_ * len(xs)))] * 1e6

    return {"put_p50_us": pct(puts, 0.5), "put_p99_us": pct(puts, 0.99), "get_p50_us": pct(gets, 0.5),
            "get_p99_us": pct(gets, 0.99), "ops_per_s": 2 * clients * n_ops / elapsed}


def _large(sock: str, redis_sock: str | None, size: int, reps: int) -> dict[str, Any]:
    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    out = torch.empty_like(src)
    a, b = src.numpy(), out.numpy()
    res: dict[str, Any] = {"size": size, "memcpy_gbs": median_gbs(lambda: np.copyto(b, a), size, reps)}
    with tierd.connect(sock) as store:
        res["tierd_put_gbs"] = median_gbs(lambda: store.put("bench/large", src), size, reps)
        res["tierd_get_gbs"] = median_gbs(lambda: store.get("bench/large", out=out), size, reps)
        assert torch.equal(out, src)
        store.delete("bench/large")
    if redis_sock:
        import redis

        r = redis.Redis.from_url(redis_sock)
        raw = a.tobytes()
        res["redis_set_gbs"] = median_gbs(lambda: r.set("bench/large", raw), size, reps)
        res["redis_get_gbs"] = median_gbs(lambda: r.get("bench/large"), size, reps)
        r.delete("bench/large")
    return res


def _markdown(res: dict[str, Any]) -> str:
    lines = [f"# tierd daemon benchmark\n\nMachine: {res['machine']}. Command: `{res['command']}`.\n",
             f"## {res['small_size'] // 1024} KiB objects, {res['ops']} put+get pairs per client\n",
             "| system | clients | put p50 µs | put p99 µs | get p50 µs | get p99 µs | ops/s |",
             "|---|---|---|---|---|---|---|"]
    for row in res["small"]:
        lines.append(f"| {row['system']} | {row['clients']} | {row['put_p50_us']:.0f} | {row['put_p99_us']:.0f} | "
                     f"{row['get_p50_us']:.0f} | {row['get_p99_us']:.0f} | {row['ops_per_s']:.0f} |")
    ratios = res.get("ratios_vs_redis", [])
    if ratios:
        lines += ["", "| clients | tierd p50 / redis p50 (put) | (get) | tierd ops/s / redis ops/s |", "|---|---|---|---|"]
        for r in ratios:
            lines.append(f"| {r['clients']} | {r['put_p50']:.2f} | {r['get_p50']:.2f} | {r['ops']:.2f} |")
    lg = res["large"]
    lines += ["", f"## {lg['size'] // MIB} MiB objects\n", "| measure | GB/s | / memcpy |", "|---|---|---|"]
    for key, label in (("memcpy_gbs", "memcpy, 1 thread (limit)"), ("tierd_put_gbs", "tierd put (client copies into arena)"),
                       ("tierd_get_gbs", "tierd get(out=)"), ("redis_set_gbs", "redis SET"), ("redis_get_gbs", "redis GET")):
        if key in lg:
            lines.append(f"| {label} | {lg[key]:.2f} | {lg[key] / lg['memcpy_gbs']:.2f} |")
    return "\n".join(lines) + "\n"


def _plot(res: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    args, out = bench_args(__doc__, argv)
    ops = 500 if args.quick else 3000
    small = 4096
    with tempfile.TemporaryDirectory(prefix="tierd-bd-", dir="/tmp") as tmp_s, Progress(console=console) as progress:
        tmp = Path(tmp_s)
        sock = str(tmp / "tierd.sock")
        (tmp / "tierd.toml").write_text(
            f'[tiers.host]\nsize = "1GiB"\n[tiers.nvme]\npath = "{tmp / "nvme"}"\nsize = "1GiB"\n'
            f'[daemon]\nsocket = "{sock}"\nmetrics = ""\n')
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
        task = progress.add_task("daemon benchmark", total=6)
        daemon = spawn(tmp / "tierd.toml", env=env, log=subprocess.DEVNULL)
        redis_proc = start_redis(tmp, unix=True)
        if redis_proc is None:
            console.print("[yellow]no redis-server or redis-py: no redis column[/]")
        redis_sock = redis_proc[1] if redis_proc else None
        try:
            rows = []
            for clients in (1, 4):
                rows.append({"system": "tierd", "clients": clients, **_run_clients(_tierd_worker, sock, clients, ops, small)})
                progress.advance(task)
                if redis_sock:
                    rows.append({"system": "redis", "clients": clients,
                                 **_run_clients(_redis_worker, redis_sock, clients, ops, small)})
                progress.advance(task)
            large = _large(sock, redis_sock, 64 * MIB, 5 if args.quick else 15)
            progress.advance(task, 2)
        finally:
            daemon.terminate()
            daemon.wait(timeout=60)
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
    res = {"command": " ".join(["python", "bench/daemon.py", *(argv if argv is not None else sys.argv[1:])]),
           "machine": f"{os.cpu_count()} cores, torch {torch.__version__}", "small_size": small, "ops": ops,
           "small": rows, "ratios_vs_redis": ratios, "large": large}
    (out / "daemon.json").write_text(json.dumps(res, indent=2))
    md = _markdown(res)
    (out / "daemon.md").write_text(md)
    _plot(res, out / "daemon.png")
    console.print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
