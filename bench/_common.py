"""Helpers shared by the benchmarks.

Every benchmark module (``tiers``, ``daemon``, ``policies``, ``checkpoint``,
``training``, ``kv``, ``scaling``, and ``limits``) has the same shape, so that
``tierd bench`` (bench/suite.py) can run them in one process and one report:

* ``run(ctx: BenchContext) -> dict``: measure, return JSON-able results;
* ``markdown(res) -> str``: the detailed tables (``####`` headings);
* ``plot(res, out_dir) -> list[Path]``: PNG files written (none without matplotlib);
* ``headline(res, limits) -> list[dict]``: the summary rows made by :func:`row`,
  with the targets of the issues that asked for them;
* ``main(argv)``: the stand-alone script (``python bench/X.py``), via :func:`standalone`.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
ROOT = Path(__file__).resolve().parent.parent


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, out: Path, name: str) -> list[Path]:
    """Lay out ``fig``, write it as ``out/NAME.png`` and free it; returns the paths written."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def fio_gbs(directory: Any, rw: str, size: int) -> float | None:
    """fio's O_DIRECT sequential bandwidth (bs=4M, iodepth=16) in GB/s, or None without fio."""
    import json
    import shutil

    if shutil.which("fio") is None:
        return None
    cmd = ["fio", "--name=tierd-bench", f"--directory={directory}", f"--rw={rw}", "--bs=4M", "--iodepth=16",
           "--direct=1", "--ioengine=libaio", f"--size={size}", "--numjobs=1", "--output-format=json"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300)
    except (subprocess.SubprocessError, OSError):
        return None
    job = json.loads(res.stdout)["jobs"][0]
    return float(job["read" if rw == "read" else "write"]["bw_bytes"]) / 1e9


def median_s(fn: Any, reps: int) -> float:
    """Seconds of ``fn()``: the median of ``reps`` timed calls after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def median_gbs(fn: Any, nbytes: int, reps: int) -> float:
    """GB/s of ``fn`` moving ``nbytes``: the median of ``reps`` timed calls after one warm-up."""
    return nbytes / median_s(fn, reps) / 1e9


def timeit_gbs(fn: Callable[[], Any], *, nbytes: int, min_reps: int = 3, budget_s: float = 0.6) -> float:
    """Median GB/s of ``fn`` moving ``nbytes``, over enough repetitions to fill ``budget_s``."""
    fn()  # warm: page faults, lazy slab creation
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < budget_s and len(times) < 200):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def percentile_us(sorted_s: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted durations in seconds, in microseconds."""
    return sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))] * 1e6


def size_label(n: int) -> str:
    return f"{n // GIB} GiB" if n >= GIB else f"{n // MIB} MiB" if n >= MIB else f"{n // KIB} KiB"


def start_redis(workdir: Any, *, unix: bool = False) -> tuple[Any, str] | None:
    """A private redis-server (tierd.testing.redis): (process, url), or None if redis-server,
    redis-py or a working start is missing.

    ``unix=True`` serves on a Unix socket in ``workdir`` (``unix://`` URL), else on a loopback TCP port.
    """
    import shutil

    if shutil.which("redis-server") is None:
        return None
    try:
        import redis  # noqa: F401 - the peers are measured through redis-py
    except ImportError:
        return None
    from tierd.testing.redis import RedisServer

    try:
        server = RedisServer(Path(workdir), unix=unix)
    except RuntimeError:
        return None
    return server.proc, server.url


@contextmanager
def private_daemon(tmp: Path, *, host_size: str = "1GiB", nvme_size: str = "1GiB") -> Iterator[str]:
    """A ``tierd serve`` of its own in ``tmp`` (no metrics port); yields its socket path."""
    from tierd.daemon.launch import spawn

    sock = str(tmp / "tierd.sock")
    (tmp / "tierd.toml").write_text(
        f'[tiers.host]\nsize = "{host_size}"\n[tiers.nvme]\npath = "{tmp / "nvme"}"\nsize = "{nvme_size}"\n'
        f'[daemon]\nsocket = "{sock}"\nmetrics = ""\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
    daemon = spawn(tmp / "tierd.toml", env=env, log=subprocess.DEVNULL)
    try:
        yield sock
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


@dataclass
class BenchContext:
    """What one benchmark run shares between its suites.

    ``workdir`` is scratch space on the disk under test (the nvme tier's
    filesystem); ``limits`` holds what bench/limits.py measured, so that every
    suite divides by the same memcpy and fio figures of the same run.
    """

    quick: bool
    workdir: Path
    progress: Any  # rich.progress.Progress
    console: Any  # rich.console.Console
    limits: dict[str, Any] = field(default_factory=dict)
    smoke: bool = False  # the smallest sizes: for the test of the CLI, not for figures
    options: dict[str, Any] = field(default_factory=dict)  # a stand-alone script's extra options

    def fio(self, rw: str) -> float | None:
        """fio's O_DIRECT sequential ``rw`` ("read" or "write") GB/s in ``workdir``, measured once a run."""
        key = f"fio_{rw}_gbs"
        if key not in self.limits:
            size = 64 * MIB if self.smoke else 512 * MIB if self.quick else 2 * GIB
            fio_dir = self.workdir / "fio"
            fio_dir.mkdir(exist_ok=True)
            if rw == "read" and "fio_write_gbs" not in self.limits:
                self.fio("write")  # lays the file out first
            self.limits[key] = fio_gbs(fio_dir, rw, size)
            if rw == "read":
                for f in fio_dir.iterdir():
                    f.unlink()
        return self.limits[key]

    def memcpy(self) -> float:
        """Single-thread memcpy GB/s (np.copyto) of 64 MiB, measured once a run."""
        if "memcpy_1t_gbs" not in self.limits:
            import numpy as np

            a = np.random.randint(0, 255, 64 * MIB, dtype=np.uint8)
            b = np.empty_like(a)
            self.limits["memcpy_1t_gbs"] = median_gbs(lambda: np.copyto(b, a), a.nbytes, 5)
        return float(self.limits["memcpy_1t_gbs"])


def row(measure: str, ours: str, *, limit: str = "", peer: str = "", vs_limit: str = "", vs_peer: str = "",
        issue: int | None = None, target: str = "", ratio: str = "", status: str = "", note: str = "",
        ) -> dict[str, Any]:
    """One line of a suite's summary table.

    ``ratio`` is the figure the target is about (default: ``vs_limit``, else ``vs_peer``);
    ``status`` is ``met``, ``missed``, ``not run: WHY`` or ``""`` (a figure without a target);
    ``note`` says what limits a missed target.
    """
    return {"measure": measure, "tierd": ours, "limit": limit, "peer": peer, "vs_limit": vs_limit,
            "vs_peer": vs_peer, "issue": issue, "target": target, "ratio": ratio or vs_limit or vs_peer,
            "status": status, "note": note}


# What limits a copy-bound target missed on a busy machine (measured: a 60 KiB torch copy_ took 8 ms with two
# threads on two loaded cores, 3 µs with one).
BUSY_COPY = ("tierd copies with torch's multi-threaded copy_, whose threads wait for a time slice when the cores "
             "are busy (see the load average); memcpy here is np.copyto on one thread, which does not wait")


def verdict(ok: bool | None) -> str:
    return "" if ok is None else "met" if ok else "missed"


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    """``lo .. hi`` of ``values`` (or one value), for a row covering several sizes."""
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)} .. {fmt.format(hi)}"


def no_cuda_reason() -> str | None:
    """Why the GPU measurements cannot run here, or None when a CUDA device is usable."""
    import torch

    if torch.cuda.is_available():
        return None
    return f"no GPU (torch {torch.__version__} sees no CUDA device)"


def default_workdir_base() -> Path:
    """Where scratch files go by default: beside the default nvme tier directory."""
    from tierd.config import default_nvme_path

    return default_nvme_path().parent


def standalone(module: Any, name: str, argv: list[str] | None, **extra: Any) -> int:
    """``python bench/NAME.py [--quick] [--out DIR]``: run one module and write NAME.json, NAME.md and its PNGs."""
    import json

    from rich.console import Console
    from rich.progress import Progress

    args, out = bench_args(module.__doc__, argv, **extra)
    console = Console(width=132)
    base = Path(getattr(args, "dir", None) or default_workdir_base())
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"tierd-bench-{name}-", dir=base) as tmp, \
            Progress(console=console) as progress:
        options = {k: v for k, v in vars(args).items() if k not in ("quick", "out", "dir")}
        ctx = BenchContext(quick=args.quick, workdir=Path(tmp), progress=progress, console=console, options=options)
        res = module.run(ctx)
    res["command"] = " ".join(["python", f"bench/{name}.py", *(argv if argv is not None else sys.argv[1:])])
    res["machine"] = machine(base)
    (out / f"{name}.json").write_text(json.dumps(res, indent=2))
    md = f"# tierd {name} benchmark\n\nCommand: `{res['command']}`.\n\n{module.markdown(res)}"
    (out / f"{name}.md").write_text(md)
    pngs = module.plot(res, out)
    console.print(md)
    console.print(f"wrote {out / (name + '.json')}, {out / (name + '.md')}" + "".join(f", {p}" for p in pngs))
    return 0


def bench_args(doc: str | None, argv: list[str] | None, **extra: Any) -> tuple[Any, Any]:
    """The options every benchmark takes (``--quick``, ``--out``) plus ``extra``; returns (args, out dir).

    ``extra`` maps an option name to its ``add_argument`` keywords, e.g. ``device={"default": "cpu"}``.
    """
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller run, for a first look")
    ap.add_argument("--out", default="bench/out", help="directory for the results")
    ap.add_argument("--dir", default=None, help="scratch directory on the disk to measure (default: ~/.cache)")
    for name, kwargs in extra.items():
        ap.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _disk(path: Path) -> dict[str, Any]:
    """The filesystem and block device ``path`` lives on."""
    import psutil

    path = path.resolve()
    best = None
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint.rstrip("/") + "/") or str(path) == part.mountpoint:
            if best is None or len(part.mountpoint) > len(best.mountpoint):
                best = part
    usage = psutil.disk_usage(str(path))
    info: dict[str, Any] = {"path": str(path), "free_gib": round(usage.free / GIB, 1),
                            "total_gib": round(usage.total / GIB, 1)}
    if best is not None:
        info.update({"device": best.device, "fstype": best.fstype, "mountpoint": best.mountpoint})
        dev = Path(best.device).name
        queue = Path("/sys/class/block", dev, "queue")
        for name, fname in (("rotational", "rotational"), ("scheduler", "scheduler")):
            try:
                info[name] = (queue / fname).read_text().strip()
            except OSError:
                pass
        try:
            info["model"] = Path("/sys/class/block", dev, "device", "model").read_text().strip()
        except OSError:
            pass
    return info


def git_commit() -> str | None:
    """The checkout's commit (``+dirty`` when it has uncommitted changes), or None outside git."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def machine(workdir: Path) -> dict[str, Any]:
    """What the figures were measured on: CPU, RAM, the disk of ``workdir``, software versions, load."""
    import datetime

    import psutil
    import torch

    gpu = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
           else "none")
    return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "hostname": platform.node(), "cpu": _cpu_model(), "cores_logical": os.cpu_count(),
            "cores_physical": psutil.cpu_count(logical=False), "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
            "disk": _disk(workdir), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": gpu, "git_commit": git_commit(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}
