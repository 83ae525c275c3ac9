"""Policy benchmark: every eviction policy on every generated workload, beside OPT.

    python bench/policies.py [--quick] [--out DIR]

Replays the traces of bench/traces.py through the simulator (the same policy
objects the engine runs) and reports hit ratio, bytes moved and modelled
stall per policy, with Belady-size (``opt``, offline, knows the future) as
the reference, and the schedule policies both learned from the stream and
declared by the caller. Writes policies.json, policies.md and policies.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import traces  # noqa: E402
from _common import bench_args, pyplot  # noqa: E402

from tierd.policies.simulator import OPT, simulate  # noqa: E402
from tierd.units import format_size  # noqa: E402

console = Console(width=132)
MIB = 1 << 20

# Host tier sizes that make each workload overflow it (tiers.host is the cache under study).
WORKLOADS = {
    "activations": ({"layers": 48, "size": 16 * MIB}, 256 * MIB),
    "optimizer": ({}, 400 * MIB),
    "kv": ({}, 1024 * MIB),
    "checkpoint": ({}, 256 * MIB),
}
RUNS = [("lru", "none"), ("s3fifo", "none"), ("gdsf", "none"), ("schedule", "none"), ("schedule", "schedule"),
        ("lru", "schedule")]


def main(argv: list[str] | None = None) -> int:
    args, out = bench_args(__doc__, argv)
    results: dict[str, Any] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("simulating", total=len(WORKLOADS) * (len(RUNS) + 1))
        for name, (kwargs, host) in WORKLOADS.items():
            kw = dict(kwargs)
            if args.quick:
                kw.update({"steps": 6} if name != "kv" else {"requests": 1500})
            events = list(traces.WORKLOADS[name](**kw))
            rows = []
            for policy, prefetch in [*RUNS, (OPT, "none")]:
                r = simulate(events, policy, host_bytes=host, nvme_bytes=64 << 30, prefetch=prefetch)
                rows.append({"policy": policy, "prefetch": prefetch, "hit_ratio": r.hit_ratio, "gets": r.gets,
                             "promoted": r.bytes_promoted, "demoted": r.bytes_demoted, "stall_s": r.stall_s})
                progress.advance(task)
            opt = rows[-1]["hit_ratio"]
            for row in rows:
                row["vs_opt"] = row["hit_ratio"] / opt if opt else None
            results[name] = {"events": len(events), "host_bytes": host, "rows": rows}
    res = {"command": " ".join(["python", "bench/policies.py", *(argv if argv is not None else sys.argv[1:])]),
           "workloads": results}
    (out / "policies.json").write_text(json.dumps(res, indent=2))
    lines = [f"# tierd policy benchmark\n\nCommand: `{res['command']}`. Simulated nvme: 64 GiB, 2 GB/s, 100 µs. "
             "`opt` is Belady-size with the whole future known and no prefetching (for equal sizes, Belady's "
             "optimum). Prefetching policies can pass its hit ratio; compare them by modelled stall.\n"]
    for name, wl in results.items():
        lines += [f"## {name}: {wl['events']} events, host tier {format_size(wl['host_bytes'])}\n",
                  "| policy | prefetch | hit ratio | / opt | promoted | demoted | modelled stall s |",
                  "|---|---|---|---|---|---|---|"]
        for r in wl["rows"]:
            vs = f"{r['vs_opt']:.3f}" if r["vs_opt"] is not None else "-"
            lines.append(f"| {r['policy']} | {r['prefetch']} | {r['hit_ratio']:.3f} | {vs} | {format_size(r['promoted'])} "
                         f"| {format_size(r['demoted'])} | {r['stall_s']:.2f} |")
        lines.append("")
    md = "\n".join(lines)
    (out / "policies.md").write_text(md)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4.2))
        for ax, (name, wl) in zip(axes, results.items(), strict=True):
            labels = [r["policy"] + ("+pf" if r["prefetch"] != "none" else "") for r in wl["rows"]]
            ax.bar(labels, [r["hit_ratio"] for r in wl["rows"]],
                   color=["k" if r["policy"] == OPT else "C0" if r["prefetch"] == "none" else "C1" for r in wl["rows"]])
            ax.set(title=name, ylim=(0, 1.05), ylabel="hit ratio")
            ax.tick_params(axis="x", rotation=60, labelsize=8)
        fig.tight_layout()
        fig.savefig(out / "policies.png", dpi=110)
    console.print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
