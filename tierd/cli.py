"""The ``tierd`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tierd.benchsuite import SUITES
from tierd.clients.remote import RemoteStore
from tierd.config import load_config
from tierd.errors import TierdError
from tierd.units import format_size

_STYLE = {"ok": "green", "warn": "yellow", "off": "dim", "fail": "red"}


def _doctor(args: argparse.Namespace, console: Console) -> int:
    from tierd.doctor import run_checks

    cfg = load_config(args.config)
    table = Table(title="tierd doctor", title_justify="left")
    for col in ("check", "status", "detail", "what to do"):
        table.add_column(col, overflow="fold")
    checks = run_checks(cfg)
    for c in checks:
        table.add_row(c.name, f"[{_STYLE[c.status]}]{c.status}[/]", escape(c.detail), escape(c.fix))
    console.print(table)
    return 1 if any(c.status == "fail" for c in checks) else 0


def _demo(args: argparse.Namespace, console: Console) -> int:
    """Stash tensors of several sizes in a small host tier and show where they went."""
    import torch

    import tierd

    cfg = load_config(args.config)
    # A small host tier so that overflow to nvme shows within a few puts.
    # Its own nvme directory: the default one may belong to a running daemon.
    scratch = tempfile.TemporaryDirectory(prefix="tierd-demo-", dir=Path(cfg.tiers.nvme.path).parent)
    small = {"tiers": {"host": {"size": args.host_size}, "nvme": {"path": scratch.name, "size": "2GiB"}}}
    tensors: dict[str, Any] = {
        "demo/embedding": torch.randn(4096, 1024).to(torch.bfloat16),
        "demo/acts-0": torch.randn(48, 1024, 256),
        "demo/acts-1": torch.randn(48, 1024, 256),
        "demo/acts-2": torch.randn(48, 1024, 256),
        "demo/adam-m": torch.randn(2048, 2048),
        "demo/step": torch.tensor(1234, dtype=torch.int64),
        "demo/mask": torch.rand(1000, 1000) > 0.5,
        "demo/blob": b'{"lr": 3e-4, "warmup": 2000}',
    }
    with tierd.open(small) as store:
        try:
            started = time.perf_counter()
            for key, value in tensors.items():
                durable = key == "demo/embedding"
                store.put(key, value, durable=durable, codec="bytegroup" if durable else None)
            store.move("demo/adam-m", "nvme")
            placed = {k: store.info(k) for k in tensors}
            back = {k: store.get(k) for k in tensors}
            elapsed = time.perf_counter() - started
            table = Table(title=f"where the objects went (host tier {args.host_size}, nvme in {scratch.name})",
                          title_justify="left")
            for col in ("key", "dtype", "shape", "bytes", "codec", "durable", "after put", "nvme bytes", "after get",
                        "equal"):
                table.add_column(col)
            for key, value in tensors.items():
                info, before = store.info(key), placed[key]
                same = back[key] == value if isinstance(value, bytes) else torch.equal(back[key], value)
                nvme_bytes = format_size(before.stored_nbytes) if "nvme" in before.tiers else "-"
                table.add_row(key, info.dtype, str(tuple(info.shape)), format_size(info.nbytes), info.codec,
                              str(info.durable), "+".join(before.tiers) or "host", nvme_bytes, info.tier,
                              "[green]yes[/]" if same else "[red]NO[/]")
            console.print(table)
            _print_stats(console, store.stats())
            console.print(f"put + move + get of {len(tensors)} objects in {elapsed:.2f} s")
        finally:  # durable demo objects must not outlive the demo, even if it is interrupted
            for key in tensors:
                store.delete(key)
    scratch.cleanup()
    return 0


def _print_stats(console: Console, stats: object) -> None:
    table = Table(title="tiers", title_justify="left")
    for col in ("tier", "used", "capacity", "objects", "hits", "misses", "in", "out", "demoted", "fragmentation"):
        table.add_column(col)
    for t in stats.tiers.values():  # type: ignore[attr-defined]
        table.add_row(t.name, format_size(t.used_bytes), format_size(t.capacity_bytes), str(t.objects), str(t.hits),
                      str(t.misses), format_size(t.bytes_in), format_size(t.bytes_out),
                      format_size(t.demoted_bytes), f"{t.fragmentation:.2f}")
    console.print(table)


def _serve(args: argparse.Namespace, console: Console) -> int:
    from tierd.daemon.server import run

    return run(args.config)


def _status_tables(status: dict[str, Any]) -> list[Table]:
    stats = status["stats"]
    head = Table(title=f"tierd pid {status['pid']} on {status['socket']}", title_justify="left")
    for col in ("tier", "used", "capacity", "fill", "objects", "hits", "misses", "in", "out", "promoted",
                "demoted", "fragmentation"):
        head.add_column(col)
    for t in stats.tiers.values():
        fill = t.used_bytes / t.capacity_bytes if t.capacity_bytes else 0.0
        head.add_row(t.name, format_size(t.used_bytes), format_size(t.capacity_bytes), f"{fill:.0%}", str(t.objects),
                     str(t.hits), str(t.misses), format_size(t.bytes_in), format_size(t.bytes_out),
                     format_size(t.promoted_bytes), format_size(t.demoted_bytes), f"{t.fragmentation:.2f}")
    ns = Table(title="namespaces", title_justify="left")
    for col in ("namespace", "stored", "eviction", "admission", "prefetch", "learned"):
        ns.add_column(col)
    policies = status.get("policies", {})  # a daemon older than this client sends none
    learned = []
    for name in sorted(set(status["namespaces"]) | set(policies)):
        pol = policies.get(name, {})
        experts = pol.get("experts")
        note = ", ".join(part for part in (
            f"cache, {pol['evicted']} dropped for room" if "evicted" in pol else "",
            f"{pol['hinted_blocks']} blocks' prefixes" if "hinted_blocks" in pol else "",
            "trust recency {recency:.2f} / rhythm {rhythm:.2f}".format(**experts) if experts else "") if part)
        ns.add_row(name, format_size(status["namespaces"].get(name, 0)), pol.get("policy", ""),
                   pol.get("admission", ""), pol.get("prefetch", ""), note)
        if pol.get("admission_table"):
            learned.append(_admission_table(name, pol["admission_table"]))
    clients = Table(title=f"clients ({len(status['clients'])}, {status['inflight']} requests in flight)",
                    title_justify="left")
    for col in ("pid", "uid", "connected", "requests", "leases", "open puts"):
        clients.add_column(col)
    now = time.time()
    for c in sorted(status["clients"], key=lambda c: c["pid"]):
        clients.add_row(str(c["pid"]), str(c["uid"]), f"{now - c['since']:.0f} s ago", str(c["requests"]),
                        str(c["leases"]), str(c["puts"]))
    return [head, ns, *learned, clients]


def _admission_table(namespace: str, rows: list[dict[str, Any]]) -> Table:
    """A prefix admission's classes: how often each kind of new block is read again, and what it did."""
    table = Table(title=f"admission to host in {namespace}: new blocks by kind and depth", title_justify="left")
    for col in ("kind", "depth", "read again", "admitted", "refused"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["kind"]), str(r["depth"]), f"{r['reuse']:.0%}", str(r["admitted"]), str(r["refused"]))
    return table


def _status(args: argparse.Namespace, console: Console) -> int:

    with RemoteStore(args.socket) as store:
        for table in _status_tables(store.status()):
            console.print(table)
    return 0


def _top(args: argparse.Namespace, console: Console) -> int:
    from rich.console import Group
    from rich.live import Live


    with RemoteStore(args.socket) as store, Live(console=console, auto_refresh=False) as live:
        try:
            for _ in range(args.iterations) if args.iterations else iter(int, 1):
                live.update(Group(*_status_tables(store.status())), refresh=True)
                time.sleep(args.interval)
        except KeyboardInterrupt:
            pass
    return 0


def _simulate(args: argparse.Namespace, console: Console) -> int:
    from tierd.errors import InvalidArgument
    from tierd.policies import ADMISSION_POLICIES, EVICTION_POLICIES, CostModel
    from tierd.policies.simulator import OPT, read_trace, simulate
    from tierd.units import parse_size

    tiers = {}
    for part in args.tiers.split(","):
        name, _, size = part.partition("=")
        if name not in ("host", "nvme") or not size:
            raise InvalidArgument(f"--tiers takes host=SIZE,nvme=SIZE, got {part!r}")
        try:
            tiers[name] = parse_size(size)
        except ValueError as exc:
            raise InvalidArgument(f"--tiers {name}: {exc}") from None
    # "policy" or "policy+admission": prefix+prefix is the prefix policy with prefix admission.
    runs = [(p.partition("+")[0], p.partition("+")[2] or "all") for p in args.policy.split(",") if p]
    for name, admission in runs:
        if name not in EVICTION_POLICIES:
            raise InvalidArgument(f"unknown policy {name!r}; choose from {', '.join(EVICTION_POLICIES)}")
        if admission not in ADMISSION_POLICIES:
            raise InvalidArgument(f"unknown admission {admission!r} in {name}+{admission}; choose from "
                                  f"{', '.join(ADMISSION_POLICIES)}")
    try:
        events = read_trace(args.trace)
    except OSError as exc:
        raise InvalidArgument(f"cannot read trace {args.trace!r}: {exc.strerror}") from None
    cost = CostModel(latency_s=args.latency_us * 1e-6, bytes_per_s=parse_size(args.bandwidth))
    host, nvme = tiers.get("host", 1 << 30), tiers.get("nvme", 8 << 30)
    results = [simulate(events, name, host_bytes=host, nvme_bytes=nvme, prefetch=args.prefetch, cost=cost,
                        admission=admission) for name, admission in runs]
    opt = simulate(events, OPT, host_bytes=host, nvme_bytes=nvme, cost=cost)
    prefixed = any(e.parent for e in events)
    table = Table(title=f"{args.trace}: {len(events)} events, host {format_size(host)}, nvme {format_size(nvme)}",
                  title_justify="left")
    for col in ("policy", "prefetch", "gets", "hit ratio", "/ opt", "promoted", "demoted", "stall (modelled)",
                *(["prefill saved"] if prefixed else [])):
        table.add_column(col)
    for r in [*results, opt]:
        rel = r.hit_ratio / opt.hit_ratio if opt.hit_ratio else float("nan")
        name = r.policy if r.admission == "all" else f"{r.policy}+{r.admission}"
        table.add_row(name, r.prefetch, str(r.gets), f"{r.hit_ratio:.3f}", f"{rel:.2f}",
                      format_size(r.bytes_promoted), format_size(r.bytes_demoted), f"{r.stall_s:.2f} s",
                      *([f"{r.prefill_saved:.3f}"] if prefixed else []))
    console.print(table)
    if args.png:
        from tierd.policies.simulator import plot_results

        plot_results([*results, opt], args.png, title=str(args.trace))
        console.print(f"wrote {args.png}")
    return 0


def _bench(args: argparse.Namespace, console: Console) -> int:
    from tierd.benchsuite import run

    argv = sys.argv[1:] if args.argv is None else args.argv
    return run(args.suites, quick=args.quick, out=args.out, workdir=args.dir, smoke=args.smoke, console=console,
               command=" ".join(["tierd", *argv]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tierd", description="memory-tier manager for ML state")
    parser.add_argument("--log-level", default=os.environ.get("TIERD_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("doctor", help="check what this machine offers and what to fix")
    p.add_argument("--config", default=os.environ.get("TIERD_CONFIG"))
    p = sub.add_parser("demo", help="stash and fetch tensors across tiers and show where they went")
    p.add_argument("--config", default=os.environ.get("TIERD_CONFIG"))
    p.add_argument("--host-size", default="128MiB", help="host tier size for the demo (default 128MiB)")
    p = sub.add_parser("serve", help="run the daemon in the foreground (systemd Type=notify)")
    p.add_argument("--config", default=os.environ.get("TIERD_CONFIG"))
    for name, helptext in (("status", "tiers, namespaces and clients of the running daemon"),
                           ("top", "a live view of the running daemon")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--socket", default=None, help="daemon socket (default: $TIERD_SOCKET, then the default path)")
        if name == "top":
            p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
            p.add_argument("--iterations", type=int, default=0, help="stop after this many refreshes (0: never)")
    p = sub.add_parser("simulate", help="replay an access trace under several policies, beside OPT")
    p.add_argument("trace", help="JSON lines t, op, key, size, tier (as [trace] path records)")
    p.add_argument("--policy", default="lru,s3fifo,gdsf,schedule,prefix+prefix",
                   help="comma-separated eviction policies, each optionally +ADMISSION (prefix+prefix: the prefix "
                   "policy with prefix admission)")
    p.add_argument("--prefetch", default="none", choices=["none", "sequential", "schedule"])
    p.add_argument("--tiers", default="host=1GiB,nvme=8GiB", help="tier sizes, e.g. host=1GiB,nvme=8GiB")
    p.add_argument("--bandwidth", default="2GB", help="nvme read bandwidth per second for the stall model")
    p.add_argument("--latency-us", type=float, default=100.0, help="nvme read latency for the stall model")
    p.add_argument("--png", default=None, help="also plot hit ratios to this PNG file")
    p = sub.add_parser("bench", help="run the benchmarks: tierd beside the machine's limits and the usual tools")
    p.add_argument("suites", nargs="*", metavar="SUITE",
                   help=f"{', '.join(SUITES)} or all (default: all)")
    p.add_argument("--quick", action="store_true", help="smaller sizes: about two minutes on 2 cores")
    p.add_argument("--out", default="tierd-bench", help="directory for results.json, results.md and the plots")
    p.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: ~/.cache)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the tiniest sizes, for the tests
    args = parser.parse_args(argv)
    args.argv = argv
    level = "INFO" if args.command == "serve" and "--log-level" not in (argv or sys.argv) else args.log_level
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    console = Console(width=None if sys.stdout.isatty() else 132)
    try:
        commands = {"doctor": _doctor, "demo": _demo, "serve": _serve, "status": _status, "top": _top,
                    "simulate": _simulate, "bench": _bench}
        return commands[args.command](args, console)
    except TierdError as exc:  # on stderr, unwrapped: the message names the fix, and scripts grep it
        Console(stderr=True, soft_wrap=True).print(f"[red]tierd: {escape(str(exc))}[/]")
        return 2


if __name__ == "__main__":
    sys.exit(main())
