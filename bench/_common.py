"""Helpers shared by the benchmarks."""

from __future__ import annotations

from typing import Any


def pyplot() -> Any | None:
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def fio_gbs(directory: Any, rw: str, size: int) -> float | None:
    """fio's O_DIRECT sequential bandwidth (bs=4M, iodepth=16) in GB/s, or None without fio."""
    import json
    import shutil
    import subprocess

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


def median_gbs(fn: Any, nbytes: int, reps: int) -> float:
    """GB/s of ``fn`` moving ``nbytes``: the median of ``reps`` timed calls after one warm-up."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def start_redis(workdir: Any, *, unix: bool = False) -> tuple[Any, str] | None:
    """A private redis-server: (process, url), or None if redis is not installed.

    ``unix=True`` serves on a Unix socket in ``workdir`` (``unix://`` URL), else on a loopback TCP port.
    """
    import shutil
    import socket
    import subprocess
    import time

    exe = shutil.which("redis-server")
    try:
        import redis
    except ImportError:
        return None
    if exe is None:
        return None
    if unix:
        path = f"{workdir}/redis.sock"
        listen = ["--port", "0", "--unixsocket", path, "--unixsocketperm", "700"]
        url = f"unix://{path}"
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        listen = ["--port", str(port), "--bind", "127.0.0.1"]
        url = f"redis://127.0.0.1:{port}/0"
    proc = subprocess.Popen([exe, *listen, "--save", "", "--appendonly", "no", "--dir", str(workdir)],
                            stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:  # redis has no readiness signal: PING until it answers
        try:
            if redis.Redis.from_url(url).ping():
                return proc, url
        except (redis.ConnectionError, FileNotFoundError):
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                return None
            time.sleep(0.05)


def bench_args(doc: str | None, argv: list[str] | None, **extra: Any) -> tuple[Any, Any]:
    """The options every benchmark takes (``--quick``, ``--out``) plus ``extra``; returns (args, out dir).

    ``extra`` maps an option name to its ``add_argument`` keywords, e.g. ``device={"default": "cpu"}``.
    """
    import argparse
    from pathlib import Path

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smaller run, for a first look")
    ap.add_argument("--out", default="bench/out", help="directory for the results")
    for name, kwargs in extra.items():
        ap.add_argument(f"--{name.replace('_', '-')}", **kwargs)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return args, out
