"""KV-cache benchmark: a Llama-3-8B block through every tier, and hit ratios per policy.

    python bench/kv.py [--quick] [--out DIR]

* One KV block of Llama-3-8B (32 layers, 2, 256 tokens, 8 KV heads,
  head_dim 128, bf16: 32 MiB) stored and fetched through ``PrefixKVStore``
  from host, nvme and remote (a private redis-server), in GB/s, beside
  single-thread memcpy and fio on the same directory. Gets fill a
  preallocated KV buffer (``get(tokens, out=...)``), as a serving engine would.
* The hit ratio of a multi-turn conversation trace (Zipf-popular shared
  prefixes, bench/traces.py ``kv``) per eviction policy, beside OPT.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tierd  # noqa: E402
from bench import traces  # noqa: E402
from bench._common import MIB, BenchContext, median_gbs, row, standalone, start_redis  # noqa: E402
from tierd.policies.simulator import OPT, simulate  # noqa: E402

LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 256
POLICIES = ("lru", "s3fifo", "gdsf", "schedule", OPT)


def _tier_run(cfg: dict, tier: str, blocks: int, reps: int) -> tuple[float, float]:
    """(put GB/s, get GB/s) of ``blocks`` KV blocks through PrefixKVStore on ``tier``."""
    tokens = torch.randint(0, 128000, (blocks * BLOCK,)).tolist()
    kv_tensor = (torch.randn(LAYERS, 2, blocks * BLOCK, HEADS, DIM) * 0.1).to(torch.bfloat16)
    nbytes = kv_tensor.numel() * 2
    with tierd.open(cfg) as store:
        kv = tierd.PrefixKVStore(store, model="llama-3-8b", block_tokens=BLOCK)
        keys = kv.block_keys(tokens)

        def put() -> None:
            for k in keys:
                store.delete(k)
            for i, k in enumerate(keys):  # PrefixKVStore.put without its exists() checks
                store.put(k, kv_tensor[:, :, i * BLOCK : (i + 1) * BLOCK], tier=tier)

        put_gbs = median_gbs(put, nbytes, reps)
        if kv.lookup(tokens) != blocks * BLOCK:
            raise RuntimeError(f"lookup found {kv.lookup(tokens)} tokens of {blocks * BLOCK} stored")
        buffer = torch.empty_like(kv_tensor)  # a serving engine's preallocated KV memory

        def get() -> None:
            kv.get(tokens, out=buffer)

        get_gbs = median_gbs(get, nbytes, reps)
        if not torch.equal(buffer, kv_tensor):
            raise RuntimeError("the KV read back differs from the one stored")
    return put_gbs, get_gbs


def run(ctx: BenchContext) -> dict[str, Any]:
    blocks, reps = (1, 1) if ctx.smoke else (2, 2) if ctx.quick else (8, 3)
    nbytes = LAYERS * 2 * BLOCK * HEADS * DIM * 2 * blocks
    task = ctx.progress.add_task("kv: Llama-3-8B blocks through host, nvme, remote", total=5)
    rows: list[dict[str, Any]] = []
    tmp = ctx.workdir / "kv"
    tmp.mkdir()
    a = np.random.randint(0, 255, nbytes, dtype=np.uint8)
    b = np.empty_like(a)
    memcpy = median_gbs(lambda: np.copyto(b, a), nbytes, 5)
    fio_w, fio_r = ctx.fio("write"), ctx.fio("read")
    ctx.progress.advance(task)
    redis = start_redis(tmp)
    try:
        for tier in ("host", "nvme", "remote"):
            ctx.progress.advance(task)
            if tier == "remote" and redis is None:
                ctx.console.print("[yellow]no redis-server: remote tier not measured[/]")
                continue
            cfg: dict[str, Any] = {
                "tiers": {"host": {"size": "2GiB" if tier == "host" else "1MiB"},
                          "nvme": {"path": str(tmp / tier), "size": "4GiB"}},
            }
            if tier == "remote" and redis is not None:
                cfg["tiers"]["remote"] = {"url": redis[1]}
            put, get = _tier_run(cfg, tier, blocks, reps)
            limit = memcpy if tier == "host" else None
            rows.append({"tier": tier, "put_gbs": put, "get_gbs": get,
                         "put_vs_limit": put / (limit or fio_w) if (limit or fio_w) and tier != "remote" else None,
                         "get_vs_limit": get / (limit or fio_r) if (limit or fio_r) and tier != "remote" else None})
    finally:
        if redis is not None:
            redis[0].kill()
            redis[0].wait()
    events = list(traces.kv(requests=300 if ctx.smoke else 1500 if ctx.quick else 6000))
    hits = {p: simulate(events, p, host_bytes=1 << 30, nvme_bytes=64 << 30).hit_ratio for p in POLICIES}
    ctx.progress.advance(task)
    return {"block_bytes": nbytes // blocks, "blocks": blocks, "memcpy_gbs": memcpy, "fio_write_gbs": fio_w,
            "fio_read_gbs": fio_r, "tiers": rows, "kv_trace_events": len(events), "hit_ratio": hits}


def markdown(res: dict[str, Any]) -> str:
    nan = float("nan")
    lines = [f"A Llama-3-8B block (32 layers x 2 x 256 tokens x 8 heads x 128 x bf16 = {res['block_bytes'] // MIB} MiB), "
             f"{res['blocks']} blocks a request, through PrefixKVStore. Limits in the same run: memcpy (1 thread) "
             f"{res['memcpy_gbs']:.2f} GB/s; fio O_DIRECT write {res['fio_write_gbs'] or nan:.2f}, read "
             f"{res['fio_read_gbs'] or nan:.2f} GB/s.\n",
             "| tier | put GB/s | get GB/s | put / limit | get / limit |", "|---|---|---|---|---|"]
    for r in res["tiers"]:
        pl = f"{r['put_vs_limit']:.2f}" if r["put_vs_limit"] else "- (redis on loopback)"
        gl = f"{r['get_vs_limit']:.2f}" if r["get_vs_limit"] else "-"
        lines.append(f"| {r['tier']} | {r['put_gbs']:.2f} | {r['get_gbs']:.2f} | {pl} | {gl} |")
    hits = res["hit_ratio"]
    lines += ["", f"#### hit ratio, multi-turn conversation trace ({res['kv_trace_events']} events, host tier 1 GiB)\n",
              "| policy | hit ratio | / opt |", "|---|---|---|"]
    for p, h in hits.items():
        lines.append(f"| {p} | {h:.3f} | {h / hits[OPT]:.3f} |")
    return "\n".join(lines) + "\n"


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    mib = res["block_bytes"] // MIB
    for r in res["tiers"]:
        if r["tier"] == "host":
            lim = f"memcpy {res['memcpy_gbs']:.1f} GB/s"
        elif r["tier"] == "nvme":
            lim = f"fio {res['fio_write_gbs'] or 0:.2f} / {res['fio_read_gbs'] or 0:.2f} GB/s"
        else:
            lim = "redis-server on loopback"
        vs = f"{r['put_vs_limit']:.2f} / {r['get_vs_limit']:.2f}" if r["put_vs_limit"] and r["get_vs_limit"] else ""
        rows.append(row(f"KV block ({mib} MiB) put / get, {r['tier']}", f"{r['put_gbs']:.2f} / {r['get_gbs']:.2f} GB/s",
                        limit=lim, vs_limit=vs, issue=7, target="report"))
    hits = res["hit_ratio"]
    rows.append(row(f"conversation trace hit ratio ({res['kv_trace_events']} events)",
                    ", ".join(f"{p} {h:.3f}" for p, h in hits.items() if p != OPT), limit=f"opt {hits[OPT]:.3f}",
                    vs_limit="best " + f"{max(h for p, h in hits.items() if p != OPT) / hits[OPT]:.3f}",
                    issue=7, target="report"))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    return []


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "kv", argv)


if __name__ == "__main__":
    sys.exit(main())
