"""``tierd bench``: every benchmark in one run, one report.

    tierd bench [tiers|daemon|policies|checkpoint|training|kv|remote|gpu|scaling|soak|all ...] [--quick] [--out DIR] [--dir DIR]

The physical limits (bench/limits.py: memcpy, fio, pinned cudaMemcpy) are
measured first, in the same run and on the same disk as the suites that are
compared with them; each suite then measures tierd beside its peers. Writes
into ``--out``:

* ``results.json``: the machine (CPU, cores, RAM, the disk and filesystem of
  the scratch directory, kernel, Python and torch versions, git commit, date,
  load average at start and end) and every suite's raw figures;
* ``results.md``: the targets of issues 2-8 and 16 (ratio, met or missed, and what
  limits a missed one), then one table per suite (tierd, the limit, the
  peer, the ratios) followed by its detailed tables;
* PNG plots: tiers.png, daemon.png, policies.png, policies_sizes.png, checkpoint.png, gpu.png (on a GPU), scaling.png,
  soak.png.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench._common import BenchContext, default_workdir_base, machine, pyplot, row

SUITES = ("tiers", "daemon", "batches", "policies", "checkpoint", "training", "kv", "remote", "gpu", "scaling",
          "soak")
# Suites that divide by memcpy or fio: the limits run first when one of them runs.
USES_LIMITS = {"tiers", "daemon", "checkpoint", "kv", "remote", "gpu", "scaling"}
# Which issue's targets a suite carries, for the targets table when a suite fails.
ISSUES = {"tiers": (2,), "gpu": (8,), "daemon": (3,), "batches": (16,), "policies": (4,), "training": (5,),
          "checkpoint": (6,), "kv": (7,), "remote": (19,), "soak": (31,)}
TITLES = {
    "limits": "Limits (same run)",
    "tiers": "Tiers: host and nvme vs memcpy and fio, codecs vs zstd and zipnn (issue 2)",
    "gpu": "GPU: copies through the pinned arena vs cudaMemcpy, nvme -> GPU with kvikio (issue 8)",
    "daemon": "Daemon: small objects vs redis-py, large objects vs memcpy (issue 3)",
    "batches": "Batches: 64 x 4 KiB vs a redis-py pipeline, small ops, many clients (issue 16)",
    "policies": "Policies: simulated traces vs OPT (issue 4)",
    "checkpoint": "Checkpoints vs torch.save, safetensors, torch.distributed.checkpoint (issue 6)",
    "training": "Training: activation and optimizer offload vs save_on_cpu and recompute (issue 5)",
    "kv": "KV cache: Llama-3-8B blocks through every tier, hit ratios (issue 7)",
    "remote": "Remote tier: 1 MiB chunks vs redis-benchmark on a server and a cluster, a failover (issue 19)",
    "scaling": "Scaling: object size, object count, clients",
    "soak": "Soak: LMCache, SGLang, PrefixKVStore and a durable writer through 4 daemon restarts",
}
SUITE_COLUMNS = ("measure", "tierd", "limit", "peer", "tierd / limit", "tierd / peer", "target", "status")


def run_suites(names: list[str], *, quick: bool, out: Path, workdir: Path | None = None, smoke: bool = False,
               console: Console | None = None, command: str = "tierd bench") -> int:
    """Run ``names`` (suites of :data:`SUITES`) and write the report into ``out``; 0 if every suite ran."""
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    base = workdir or default_workdir_base()
    base.mkdir(parents=True, exist_ok=True)
    order = [n for n in SUITES if n in names]
    if USES_LIMITS & set(order):
        order.insert(0, "limits")
    if pyplot() is None:
        console.print("[yellow]matplotlib is not installed: no PNG plots (pip install -e '.[bench]')[/]")
    started = time.perf_counter()
    desc = machine(base)
    load_start = desc.pop("load_avg")
    suites: dict[str, Any] = {}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with tempfile.TemporaryDirectory(prefix="tierd-bench-", dir=base) as tmp, \
            Progress(*columns, console=console) as progress:
        ctx = BenchContext(quick=quick, workdir=Path(tmp), progress=progress, console=console, smoke=smoke)
        overall = progress.add_task(f"[bold]tierd bench {' '.join(order)}", total=len(order))
        for name in order:
            module = importlib.import_module(f"bench.{name}")
            t0 = time.perf_counter()
            entry: dict[str, Any] = {}
            try:
                res = module.run(ctx)
                entry = {"results": res, "headline": module.headline(res, ctx.limits),
                         "plots": [p.name for p in module.plot(res, out)]}
            except Exception as exc:  # noqa: BLE001 - one failing suite is reported; the others still run
                console.print(f"[red]suite {name} failed:[/]\n{traceback.format_exc()}")
                entry = {"error": f"{type(exc).__name__}: {exc}"}
            entry["seconds"] = round(time.perf_counter() - t0, 1)
            suites[name] = entry
            progress.advance(overall)
    desc["load_avg_start"] = load_start
    desc["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    report = {"command": command, "quick": quick, "smoke": smoke, "seconds": round(time.perf_counter() - started, 1),
              "machine": desc, "limits": {k: v for k, v in ctx.limits.items() if k != "options"},
              "targets": targets(suites), "suites": suites}
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (out / "results.md").write_text(md)
    _print_targets(console, report["targets"])
    console.print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
                  + "".join(f", {out / p}" for s in suites.values() for p in s.get("plots", []))
                  + f" in {report['seconds']:.0f} s")
    return 1 if any("error" in s for s in suites.values()) else 0


def targets(suites: dict[str, Any]) -> list[dict[str, Any]]:
    """Every headline row that carries an issue's target, by issue; a failed suite's issues say so."""
    rows = [dict(r, suite=name) for name, s in suites.items() for r in s.get("headline", []) if r["target"]]
    for name, s in suites.items():
        if "error" in s:
            rows += [dict(row(f"{name} suite", "-", issue=i, target="(all of the issue's targets)",
                              status=f"not run: the suite failed ({s['error']})"), suite=name)
                     for i in ISSUES.get(name, ())]
    return sorted(rows, key=lambda r: r["issue"])


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows)]


def _status(r: dict[str, Any]) -> str:
    return {"met": "**met**", "missed": "**missed**"}.get(r["status"], r["status"])


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    disk = m["disk"]
    load_note = ""
    if max(report["machine"]["load_avg_start"][0], report["machine"]["load_avg_end"][0]) > 0.5 * (m["cores_logical"] or 1):
        load_note = ("\nThe load average shows other processes sharing the machine during the run: absolute figures "
                     "are lower than on an idle machine, and the ratios between figures taken in this run are the "
                     "meaningful ones.\n")
    lines = ["# tierd benchmarks\n",
             f"`{report['command']}`: {report['seconds']:.0f} s{' (--quick)' if report['quick'] else ''}, "
             f"{m['date']}, commit {m['git_commit'] or 'unknown'}.\n",
             "## Machine\n",
             *_table(("", ""), [
                 ("CPU", f"{m['cpu']}, {m['cores_logical']} logical / {m['cores_physical']} physical cores"),
                 ("RAM", f"{m['ram_gib']} GiB"),
                 ("disk (scratch and nvme tier)", f"{disk.get('device', '?')} ({disk.get('fstype', '?')}, mounted on "
                  f"{disk.get('mountpoint', '?')}, rotational={disk.get('rotational', '?')}, "
                  f"{disk['free_gib']} of {disk['total_gib']} GiB free) at {disk['path']}"),
                 ("GPU", m["gpu"]), ("kernel", m["kernel"]), ("Python / torch", f"{m['python']} / {m['torch']}"),
                 ("load average (1, 5, 15 min) at start", ", ".join(map(str, m["load_avg_start"]))),
                 ("load average at end", ", ".join(map(str, m["load_avg_end"]))),
             ]), load_note]
    if report["targets"]:
        lines += ["## Targets of issues 2-8, 16\n",
                  *_table(("issue", "target", "measure", "tierd", "against", "ratio", "status", "what limits it"),
                          [(r["issue"], r["target"], r["measure"], r["tierd"], "; ".join(x for x in (r["limit"], r["peer"]) if x),
                            r["ratio"], _status(r), r["note"]) for r in report["targets"]]), ""]
    for name, s in report["suites"].items():
        lines.append(f"## {TITLES.get(name, name)}\n")
        if "error" in s:
            lines += [f"Not run: the suite failed ({s['error']}).\n"]
            continue
        module = importlib.import_module(f"bench.{name}")
        if s["headline"]:
            lines += _table(SUITE_COLUMNS, [(r["measure"], r["tierd"], r["limit"], r["peer"], r["vs_limit"], r["vs_peer"],
                                             r["target"], _status(r)) for r in s["headline"]])
            notes = [f"* {r['measure']}: {r['note']}" for r in s["headline"] if r["note"]]
            lines += ["", *notes, ""] if notes else [""]
        lines += [module.markdown(s["results"]), *(f"![{name}]({p})\n" for p in s["plots"]),
                  f"_{s['seconds']:.0f} s._\n"]
    return "\n".join(lines)


def _print_targets(console: Console, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    if not rows:
        return
    table = Table(title="targets", title_justify="left")
    for col in ("issue", "measure", "tierd", "ratio", "target", "status"):
        table.add_column(col, overflow="fold")
    style = {"met": "green", "missed": "red"}
    for r in rows:
        status = r["status"] or "-"
        table.add_row(str(r["issue"]), r["measure"], r["tierd"], r["ratio"], r["target"],
                      f"[{style.get(status, 'yellow')}]{status}[/]")
    console.print(table)
