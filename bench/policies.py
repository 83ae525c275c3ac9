"""Policy benchmark: every eviction policy on every generated workload, beside OPT.

    python bench/policies.py [--quick] [--out DIR]

Replays the traces of bench/traces.py through the simulator (the same policy
objects the engine runs) and reports hit ratio, bytes moved and modelled
stall per policy, with Belady-size (``opt``, offline, knows the future) as
the reference, and the schedule policies both learned from the stream and
declared by the caller.

On the prefix-cache traces (``kv``, ``serving``) the KV-aware ``prefix``
eviction runs with and without ``prefix`` admission (tierd/policies/prefix.py),
and each policy is swept over fast-tier sizes (0.5 % to 25 % of the distinct
blocks): hit ratio against size, plotted per policy. ``prefill saved`` weighs
each get by the recomputation a miss costs (``1 + depth`` for a block at
depth d).

Then the simulator's own speed: events replayed a minute per policy (and
OPT) on a large multi-turn KV trace (bench/traces.py ``kv``: 374,558 events,
59,144 distinct 1 MiB blocks), with the fast tier holding 2 % and 25 % of
the distinct blocks. """

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import traces  # noqa: E402
from bench._common import MIB, BenchContext, pyplot, row, save_figure, standalone, verdict  # noqa: E402
from bench.oracles import ToldEnds, ToldThink, last_reads  # noqa: E402
from tierd.policies.simulator import OPT, TraceEvent, simulate  # noqa: E402
from tierd.units import format_size  # noqa: E402

# Host tier sizes that make each workload overflow it (tiers.host is the cache under study).
WORKLOADS = {
    "activations": ({"layers": 48, "size": 16 * MIB}, 256 * MIB),
    "optimizer": ({}, 400 * MIB),
    "kv": ({}, 1024 * MIB),
    "checkpoint": ({}, 256 * MIB),
    "serving": ({}, None),  # None: the fast tier holds SERVING_FRACTION of the trace's distinct blocks
}
SERVING_FRACTION = 0.02
# (eviction, prefetch, schedule declared by the caller, admission)
RUNS = [("lru", "none", False, "all"), ("s3fifo", "none", False, "all"), ("gdsf", "none", False, "all"),
        ("schedule", "none", False, "all"), ("schedule", "none", True, "all"), ("schedule", "schedule", False, "all"),
        ("lru", "schedule", False, "all"), ("prefix", "none", False, "all"), ("prefix", "none", False, "prefix"),
        ("lru", "none", False, "prefix")]
PREFIX_TRACES = ("kv", "serving")  # prefix caches: the KV-aware runs and the size sweep
CYCLIC = ("optimizer", "checkpoint")  # the cyclic training traces of issue 4's target
SPEED_POLICIES = (("lru", "all"), ("s3fifo", "all"), ("gdsf", "all"), ("schedule", "all"), ("prefix", "all"),
                  ("prefix", "prefix"), (OPT, "all"))
SPEED_FRACTIONS = (0.02, 0.25)  # of the trace's distinct blocks, in the fast tier
SWEEP_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25)
# The prefix policy told one thing about the serving trace's future (bench/oracles.py), with this admission.
TOLD = (("think", "prefix"), ("ends", "prefix"), ("ends", "all"))
# On serving with every conversation's end declared (closed_share=1).
DECLARED_RUNS = (("lru", "all"), ("s3fifo", "all"), ("prefix", "prefix"), (OPT, "all"))
TOLD_LABELS = {"think": "each user's median think time", "ends": "which sessions are over (not when the rest return)"}
SWEEP_RUNS = (("lru", "all"), ("s3fifo", "all"), ("gdsf", "all"), ("prefix", "prefix"), ("lru", "prefix"), (OPT, "all"))


def _one_step(events: list[TraceEvent]) -> list[str]:
    """The keys of the first iteration: events up to the first repeat of the first (op, key)."""
    first = (events[0].op, events[0].key)
    keys = [events[0].key]
    for e in events[1:]:
        if (e.op, e.key) == first:
            break
        keys.append(e.key)
    return keys


def _runs(name: str) -> list[tuple[str, str, bool, str]]:
    # KV traces have no repeating step to declare (a "declared" schedule there would be the future
    # itself); training traces have no prefixes for the KV-aware runs.
    kv = name in PREFIX_TRACES
    return [r for r in RUNS if not ((r[2] and kv) or (not kv and (r[0] == "prefix" or r[3] == "prefix")))]


def _events(ctx: BenchContext, name: str, kwargs: dict[str, Any], **extra: Any) -> list[TraceEvent]:
    kw = dict(kwargs, **extra)
    if ctx.smoke or ctx.quick:
        kw.update({"steps": 4 if ctx.smoke else 6} if name not in PREFIX_TRACES
                  else {"requests": 500 if ctx.smoke else 1500 if name == "kv" else 5000})
    return list(traces.WORKLOADS[name](**kw))


def run(ctx: BenchContext) -> dict[str, Any]:
    results: dict[str, Any] = {}
    sweeps: dict[str, Any] = {}
    fractions = SWEEP_FRACTIONS[1::2] if ctx.smoke else SWEEP_FRACTIONS
    total = (sum(len(_runs(n)) + 1 for n in WORKLOADS) + len(PREFIX_TRACES) * len(fractions) * len(SWEEP_RUNS)
             + (0 if ctx.smoke else len(TOLD) + len(DECLARED_RUNS)))
    task = ctx.progress.add_task("policies: simulated traces vs OPT", total=total)
    for name, (kwargs, host) in WORKLOADS.items():
        users: dict[str, float] = {}  # serving: each session's user's median think time (for the oracles)
        events = _events(ctx, name, kwargs, **({"users": users} if name == "serving" else {}))
        distinct = len({e.key for e in events})
        if host is None:
            host = max(1, int(distinct * SERVING_FRACTION)) * MIB
        rows = []
        for policy, prefetch, declared, admission in [*_runs(name), (OPT, "none", False, "all")]:
            r = simulate(events, policy, host_bytes=host, nvme_bytes=64 << 30, prefetch=prefetch,
                         declared=_one_step(events) if declared else None, admission=admission)
            rows.append({"policy": policy, "prefetch": prefetch, "schedule": "declared" if declared else "learned",
                         "admission": admission, "hit_ratio": r.hit_ratio, "gets": r.gets,
                         "promoted": r.bytes_promoted, "demoted": r.bytes_demoted, "stall_s": r.stall_s,
                         "prefill_saved": r.prefill_saved})
            ctx.progress.advance(task)
        opt = rows[-1]["hit_ratio"]
        for r_ in rows:
            r_["vs_opt"] = r_["hit_ratio"] / opt if opt else None
        results[name] = {"events": len(events), "host_bytes": host, "rows": rows}
        if name == "serving" and not ctx.smoke:
            results[name]["told"] = _told(events, host, users, opt)
            results[name]["declared_ends"] = _declared_ends(ctx, kwargs)
            ctx.progress.advance(task, len(TOLD) + len(DECLARED_RUNS))
        if name in PREFIX_TRACES:
            sweeps[name] = _sweep(ctx, task, events, distinct, fractions)
    return {"workloads": results, "sweeps": sweeps, "speed": _speed(ctx)}


def _told(events: list[TraceEvent], host: int, users: dict[str, float], opt: float) -> list[dict[str, Any]]:
    """The prefix policy told one thing about the future each (bench/oracles.py): where OPT's lead comes from."""
    per_s = len(events) / (events[-1].t - events[0].t)  # the hints' clock ticks about once an event
    medians = {k: v * per_s for k, v in users.items()}
    last = last_reads(events)
    rows = []
    for told, admission in TOLD:
        make = ((lambda h: ToldEnds(h, last)) if told == "ends" else (lambda h: ToldThink(h, medians)))
        r = simulate(events, "prefix", host_bytes=host, nvme_bytes=64 << 30, admission=admission, make_policy=make)
        rows.append({"told": told, "admission": admission, "hit_ratio": r.hit_ratio, "vs_opt": r.hit_ratio / opt,
                     "prefill_saved": r.prefill_saved})
    return rows


def _declared_ends(ctx: BenchContext, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``serving`` with every conversation's end declared by its client (``closed_share=1``:
    ``Store.declare_prefix(keys, done=True)``), fast tier at SERVING_FRACTION of the blocks."""
    events = _events(ctx, "serving", kwargs, closed_share=1.0)
    host = max(1, int(len({e.key for e in events if e.op != "done"}) * SERVING_FRACTION)) * MIB
    rows = {_name(p, a): simulate(events, p, host_bytes=host, nvme_bytes=64 << 30, admission=a).hit_ratio
            for p, a in DECLARED_RUNS}
    return {"events": len(events), "host_bytes": host, "hit_ratio": rows}


def _sweep(ctx: BenchContext, task: Any, events: list[TraceEvent], distinct: int,
           fractions: tuple[float, ...]) -> dict[str, Any]:
    """Hit ratio against fast-tier size, per policy (nvme holds every block)."""
    block = max(e.size for e in events)  # a prefix cache's blocks are all one size
    rows = []
    for fraction in fractions:
        host = max(1, int(distinct * fraction)) * block
        for policy, admission in SWEEP_RUNS:
            r = simulate(events, policy, host_bytes=host, nvme_bytes=distinct * block * 4, admission=admission)
            rows.append({"policy": policy, "admission": admission, "fraction": fraction, "host_bytes": host,
                         "hit_ratio": r.hit_ratio, "prefill_saved": r.prefill_saved})
            ctx.progress.advance(task)
    return {"distinct": distinct, "rows": rows}


def _speed(ctx: BenchContext) -> dict[str, Any]:
    """Events a minute the simulator replays, per policy, on a large KV trace."""
    requests = 1000 if ctx.smoke else 5000 if ctx.quick else 20000
    events = list(traces.kv(prefixes=4000, requests=requests, blocks=8, block_size=MIB))
    distinct = len({e.key for e in events})
    task = ctx.progress.add_task("policies: simulator speed", total=len(SPEED_POLICIES) * len(SPEED_FRACTIONS))
    rows = []
    for fraction in SPEED_FRACTIONS:
        host = max(1, int(distinct * fraction)) * MIB
        for policy, admission in SPEED_POLICIES:
            t0 = time.perf_counter()
            r = simulate(events, policy, host_bytes=host, nvme_bytes=64 << 30, admission=admission)
            seconds = time.perf_counter() - t0
            rows.append({"policy": _name(policy, admission), "fraction": fraction, "host_bytes": host,
                         "seconds": seconds, "events_per_min": len(events) / seconds * 60, "hit_ratio": r.hit_ratio})
            ctx.progress.advance(task)
    return {"events": len(events), "distinct": distinct, "rows": rows}


def _name(policy: str, admission: str) -> str:
    return policy if admission == "all" else f"{policy} + {admission} admission"


def _label(r: dict[str, Any]) -> str:
    label = _name(r["policy"], r.get("admission", "all")) + (" (declared)" if r["schedule"] == "declared" else "")
    return label + (f" + {r['prefetch']} prefetch" if r["prefetch"] != "none" else "")


def markdown(res: dict[str, Any]) -> str:
    lines = ["Simulated nvme: 64 GiB, 2 GB/s, 100 µs. `opt` is Belady-size with the whole future known and no "
             "prefetching (for equal sizes, Belady's optimum). Prefetching policies can pass its hit ratio; compare "
             "them by modelled stall. `schedule` is learned from the stream unless marked declared.\n"]
    for name, wl in res["workloads"].items():
        kv = name in PREFIX_TRACES
        lines += [f"#### {name}: {wl['events']} events, host tier {format_size(wl['host_bytes'])}\n",
                  "| policy | hit ratio | / opt | promoted | demoted | modelled stall s |" + (" prefill saved |" if kv else ""),
                  "|---|---|---|---|---|---|" + ("---|" if kv else "")]
        for r in wl["rows"]:
            vs = f"{r['vs_opt']:.3f}" if r["vs_opt"] is not None else "-"
            lines.append(f"| {_label(r)} | {r['hit_ratio']:.3f} | {vs} | {format_size(r['promoted'])} "
                         f"| {format_size(r['demoted'])} | {r['stall_s']:.2f} |"
                         + (f" {r.get('prefill_saved', 0):.3f} |" if kv else ""))
        lines.append("")
        if wl.get("told"):
            lines += ["What OPT knows that the prefix policy does not: the same policy told one thing about the "
                      "future (bench/oracles.py).\n", "| prefix policy told | admission | hit ratio | / opt | prefill saved |",
                      "|---|---|---|---|---|"]
            for r in wl["told"]:
                lines.append(f"| {TOLD_LABELS[r['told']]} | {r['admission']} | {r['hit_ratio']:.3f} | "
                             f"{r['vs_opt']:.3f} | {r['prefill_saved']:.3f} |")
            lines.append("")
        if wl.get("declared_ends"):
            de = wl["declared_ends"]
            hits = de["hit_ratio"]
            lines += [f"The same trace with every conversation's end declared by its client (`closed_share=1`, "
                      f"`declare_prefix(keys, done=True)`): {de['events']} events, host tier "
                      f"{format_size(de['host_bytes'])}.\n", "| policy | hit ratio | / opt | / lru |", "|---|---|---|---|"]
            for label, h in hits.items():
                lines.append(f"| {label} | {h:.3f} | {h / hits[OPT]:.3f} | {h / hits['lru']:.2f} |")
            lines.append("")
    for name, sw in res.get("sweeps", {}).items():
        fractions = sorted({r["fraction"] for r in sw["rows"]})
        lines += [f"#### {name}: hit ratio against fast-tier size (% of its {sw['distinct']} distinct blocks)\n",
                  "| policy | " + " | ".join(f"{f:.1%}" for f in fractions) + " |", "|---|" + "---|" * len(fractions)]
        by: dict[str, dict[float, float]] = {}
        for r in sw["rows"]:
            by.setdefault(_name(r["policy"], r["admission"]), {})[r["fraction"]] = r["hit_ratio"]
        for label, hits in by.items():
            lines.append(f"| {label} | " + " | ".join(f"{hits[f]:.3f}" for f in fractions) + " |")
        lines.append("")
    sp = res.get("speed")
    if sp:
        lines += [f"#### Simulator speed: kv trace of {sp['events']} events, {sp['distinct']} distinct 1 MiB blocks\n",
                  "| policy | fast tier | hit ratio | replay s | events a minute |", "|---|---|---|---|---|"]
        for r in sp["rows"]:
            lines.append(f"| {r['policy']} | {r['fraction']:.0%} of the blocks ({format_size(r['host_bytes'])}) "
                         f"| {r['hit_ratio']:.3f} | {r['seconds']:.2f} | {r['events_per_min'] / 1e6:.2f} M |")
        lines.append("")
    return "\n".join(lines)


def headline(res: dict[str, Any], limits: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, wl in res["workloads"].items():
        by = {(r["policy"], r["prefetch"], r["schedule"]): r for r in wl["rows"] if r.get("admission", "all") == "all"}
        opt, lru = by[(OPT, "none", "learned")], by[("lru", "none", "learned")]
        if name in CYCLIC:
            for mode in ("learned", "declared"):
                s = by[("schedule", "none", mode)]
                ok = s["vs_opt"] is not None and s["vs_opt"] >= 0.98
                rows.append(row(f"{name} trace ({wl['events']} events): schedule, {mode}, hit ratio",
                                f"{s['hit_ratio']:.3f}", limit=f"opt {opt['hit_ratio']:.3f}",
                                peer=f"lru {lru['hit_ratio']:.3f}", vs_limit=f"{s['vs_opt']:.3f}", issue=4,
                                target=">= 0.98 x opt (lru far below)", status=verdict(ok),
                                note="" if ok else "the first step is the learner's: the guess of a first pass "
                                "did not match this trace"))
        elif name == "kv":
            best = max((r for r in wl["rows"] if r["policy"] != OPT), key=lambda r: r["hit_ratio"])
            rows.append(row(f"kv trace ({wl['events']} events): hit ratio per policy",
                            ", ".join(f"{r['policy']} {r['hit_ratio']:.3f}" for r in wl["rows"]
                                      if r["prefetch"] == "none" and r["policy"] != OPT and r["schedule"] == "learned"),
                            limit=f"opt {opt['hit_ratio']:.3f}", vs_limit=f"best {best['vs_opt']:.3f}", issue=4,
                            target="report vs opt"))
        elif name == "serving":
            plain = [r for r in wl["rows"] if r["policy"] != OPT and r["prefetch"] == "none"]
            best = max(plain, key=lambda r: r["hit_ratio"])
            vs_lru = best["hit_ratio"] / lru["hit_ratio"] if lru["hit_ratio"] else float("inf")
            ok = best["vs_opt"] is not None and best["vs_opt"] >= 0.8 and vs_lru >= 2
            rows.append(row(f"serving trace ({wl['events']} events), fast tier {SERVING_FRACTION:.0%} of the blocks: "
                            "best policy", f"{_label(best)} {best['hit_ratio']:.3f}", limit=f"opt {opt['hit_ratio']:.3f}",
                            peer=f"lru {lru['hit_ratio']:.3f}", vs_limit=f"{best['vs_opt']:.3f}", vs_peer=f"{vs_lru:.2f}",
                            issue=20, target=">= 0.8 x opt and >= 2 x lru", status=verdict(ok),
                            note="" if ok else _serving_note(wl)))
            de = wl.get("declared_ends")
            if de:
                h = de["hit_ratio"]
                best_de = h[_name("prefix", "prefix")]
                ok_de = best_de >= 0.8 * h[OPT] and best_de >= 2 * h["lru"]
                rows.append(row(f"serving trace, every conversation's end declared ({de['events']} events): "
                                "prefix + prefix admission", f"{best_de:.3f}", limit=f"opt {h[OPT]:.3f}",
                                peer=f"lru {h['lru']:.3f}", vs_limit=f"{best_de / h[OPT]:.3f}",
                                vs_peer=f"{best_de / h['lru']:.2f}", issue=20,
                                target=">= 0.8 x opt and >= 2 x lru (where the client declares ends)",
                                status=verdict(ok_de)))
        else:
            pf = by[("schedule", "schedule", "learned")]
            rows.append(row(f"{name} trace: modelled stall, schedule prefetch", f"{pf['stall_s']:.2f} s",
                            limit=f"opt (no prefetch) {opt['stall_s']:.2f} s", peer=f"lru {lru['stall_s']:.2f} s",
                            vs_peer=f"{pf['stall_s'] / lru['stall_s']:.2f}" if lru["stall_s"] else ""))
    sp = res.get("speed")
    if sp:
        slow = min(sp["rows"], key=lambda r: r["events_per_min"])
        rows.append(row(f"simulator: events a minute, slowest policy ({sp['events']} kv events)",
                        f"{slow['events_per_min'] / 1e6:.2f} M ({slow['policy']}, {slow['fraction']:.0%})",
                        issue=20, target=">= 1 M events a minute, every policy and opt", ratio="-",
                        status=verdict(slow["events_per_min"] >= 1e6)))
    return rows


def _serving_note(wl: dict[str, Any]) -> str:
    told = {(r["told"], r["admission"]): r for r in wl.get("told", ())}
    if not told:
        return "which sessions come back at all is known to opt, not to an online policy"
    ends, think = max(told[("ends", "all")], told[("ends", "prefix")], key=lambda r: r["hit_ratio"]), told[("think", "prefix")]
    return (f"opt knows which sessions are over: told that alone, the prefix policy reaches {ends['hit_ratio']:.3f} "
            f"({ends['vs_opt']:.2f} x opt); told each user's median think time instead, {think['hit_ratio']:.3f}")


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    wls = res["workloads"]
    fig, axes = plt.subplots(1, len(wls), figsize=(4.2 * len(wls), 4.6))
    for ax, (name, wl) in zip(axes, wls.items(), strict=True):
        labels = [_label(r).replace(" + schedule prefetch", "+pf").replace(" admission", " adm") for r in wl["rows"]]
        ax.bar(labels, [r["hit_ratio"] for r in wl["rows"]],
               color=["k" if r["policy"] == OPT else "C0" if r["prefetch"] == "none" else "C1" for r in wl["rows"]])
        ax.set(title=name, ylim=(0, 1.05), ylabel="hit ratio")
        ax.tick_params(axis="x", rotation=60, labelsize=8)
    paths = save_figure(fig, out, "policies")
    sweeps = res.get("sweeps") or {}
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4.4), squeeze=False)
        for ax, (name, sw) in zip(axes[0], sweeps.items(), strict=True):
            by: dict[str, list[tuple[float, float]]] = {}
            for r in sw["rows"]:
                by.setdefault(_name(r["policy"], r["admission"]), []).append((r["fraction"] * 100, r["hit_ratio"]))
            for label, pts in by.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label,
                        color="k" if label == OPT else None, linestyle="--" if label == OPT else "-")
            ax.set(title=f"{name}: hit ratio against fast-tier size", xscale="log", ylim=(0, 1.02),
                   xlabel="fast tier, % of the distinct blocks", ylabel="hit ratio")
            ticks = sorted({r["fraction"] * 100 for r in sw["rows"]})
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
            ax.axvline(SERVING_FRACTION * 100, color="grey", linewidth=0.8, linestyle=":")
            ax.legend(fontsize=8)
        paths += save_figure(fig, out, "policies_sizes")
    return paths


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "policies", argv)


if __name__ == "__main__":
    sys.exit(main())
