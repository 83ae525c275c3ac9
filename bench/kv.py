"""KV-cache benchmark: a Llama-3-8B block through every tier, and hit ratios per policy.

    python bench/kv.py [--quick] [--out DIR]

* One KV block of Llama-3-8B (32 layers, 2, 256 tokens, 8 KV heads,
  head_dim 128, bf16: 32 MiB) stored and fetched through ``PrefixKVStore``
  from host, nvme and remote (a private redis-server), in GB/s, beside
  single-thread memcpy and fio on the same directory. Gets fill a
  preallocated KV buffer (``get(tokens, out=...)``), as a serving engine would.
* The hit ratio of a multi-turn conversation trace (Zipf-popular shared
  prefixes, bench/traces.py ``kv``) per eviction policy, beside OPT.

Writes kv.json and kv.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).parent))
import traces  # noqa: E402
from _common import bench_args, fio_gbs, median_gbs, start_redis  # noqa: E402

import tierd  # noqa: E402
from tierd.policies.simulator import OPT, simulate  # noqa: E402

console = Console(width=132)
MIB, GIB = 1 << 20, 1 << 30
LAYERS, HEADS, DIM, BLOCK = 32, 8, 128, 256


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
        assert kv.lookup(tokens) == blocks * BLOCK
        buffer = torch.empty_like(kv_tensor)  # a serving engine's preallocated KV memory

        def get() -> None:
            kv.get(tokens, out=buffer)

        get_gbs = median_gbs(get, nbytes, reps)
        assert torch.equal(buffer, kv_tensor)
    return put_gbs, get_gbs


def main(argv: list[str] | None = None) -> int:
    args, out = bench_args(__doc__, argv)
    blocks, reps = (2, 2) if args.quick else (8, 3)
    nbytes = LAYERS * 2 * BLOCK * HEADS * DIM * 2 * blocks
    rows: list[dict[str, Any]] = []
    base = Path.home() / ".cache"
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tierd-kv-bench-", dir=base) as tmp_s:
        tmp = Path(tmp_s)
        a = np.random.randint(0, 255, nbytes, dtype=np.uint8)
        b = np.empty_like(a)
        memcpy = median_gbs(lambda: np.copyto(b, a), nbytes, 5)
        fio_w, fio_r = fio_gbs(tmp, "write", GIB), fio_gbs(tmp, "read", GIB)
        for f in tmp.glob("tierd-bench*"):
            f.unlink()
        redis = start_redis(tmp)
        try:
            for tier in ("host", "nvme", "remote"):
                if tier == "remote" and redis is None:
                    console.print("[yellow]no redis-server: remote tier not measured[/]")
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
                console.print(f"{tier}: put {put:.2f} GB/s, get {get:.2f} GB/s")
        finally:
            if redis is not None:
                redis[0].kill()
                redis[0].wait()
    events = list(traces.kv(requests=1500 if args.quick else 6000))
    hits = {p: simulate(events, p, host_bytes=1 * GIB, nvme_bytes=64 * GIB).hit_ratio
            for p in ("lru", "s3fifo", "gdsf", "schedule", OPT)}
    res = {"command": " ".join(["python", "bench/kv.py", *(argv if argv is not None else sys.argv[1:])]),
           "block_bytes": nbytes // blocks, "blocks": blocks, "memcpy_gbs": memcpy, "fio_write_gbs": fio_w,
           "fio_read_gbs": fio_r, "tiers": rows, "kv_trace_events": len(events), "hit_ratio": hits}
    (out / "kv.json").write_text(json.dumps(res, indent=2))
    lines = [f"# tierd KV-cache benchmark\n\nCommand: `{res['command']}`. A Llama-3-8B block (32 layers x 2 x 256 "
             f"tokens x 8 heads x 128 x bf16 = {res['block_bytes'] // MIB} MiB), {blocks} blocks a request, through "
             "PrefixKVStore. Limits in the same run: memcpy (1 thread) "
             f"{memcpy:.2f} GB/s; fio O_DIRECT write {fio_w or float('nan'):.2f}, read {fio_r or float('nan'):.2f} GB/s.\n",
             "| tier | put GB/s | get GB/s | put / limit | get / limit |", "|---|---|---|---|---|"]
    for r in rows:
        pl = f"{r['put_vs_limit']:.2f}" if r["put_vs_limit"] else "- (redis on loopback)"
        gl = f"{r['get_vs_limit']:.2f}" if r["get_vs_limit"] else "-"
        lines.append(f"| {r['tier']} | {r['put_gbs']:.2f} | {r['get_gbs']:.2f} | {pl} | {gl} |")
    lines += ["", f"## hit ratio, multi-turn conversation trace ({len(events)} events, host tier 1 GiB)\n",
              "| policy | hit ratio | / opt |", "|---|---|---|"]
    for p, h in hits.items():
        lines.append(f"| {p} | {h:.3f} | {h / hits[OPT]:.3f} |")
    md = "\n".join(lines) + "\n"
    (out / "kv.md").write_text(md)
    console.print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
