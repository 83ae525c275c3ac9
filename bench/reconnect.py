"""Reconnect benchmark: how soon a ``tierd.connect()`` store serves again after its daemon restarts.

    python bench/reconnect.py [--quick] [--out DIR]

A client thread calls ``exists()`` on one store every millisecond while the
daemon is stopped (SIGKILL and SIGTERM in turn) and started again on the
same socket. Per restart: the time from the new daemon's READY=1 (sent once
it accepts connections) to the client's first successful call (negative:
the client was served before the launcher heard READY), the calls that
failed while it was away, and which errors they raised (goal: only
DaemonUnavailable). :func:`restart_to_first_call` is the measurement, for
other benchmarks to reuse.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tierd  # noqa: E402
from bench._common import BenchContext, standalone  # noqa: E402
from tierd.daemon.launch import spawn  # noqa: E402


class _Caller:
    """Calls ``store.exists`` every millisecond on its own thread, logging (end time, error or None)."""

    def __init__(self, store: tierd.Store) -> None:
        self.store = store
        self.log: list[tuple[float, BaseException | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.exists("bench/probe")
                err = None
            except Exception as exc:  # noqa: BLE001 - recorded: what the client saw
                err = exc
            self.log.append((time.monotonic(), err))
            time.sleep(0.001)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def restart_to_first_call(proc: subprocess.Popen[bytes], config: Path, caller: _Caller, sig: int,
                          env: dict[str, str]) -> tuple[subprocess.Popen[bytes], dict[str, Any]]:
    """Stop ``proc`` with ``sig``, start a daemon on ``config`` again; what ``caller`` saw meanwhile."""
    proc.send_signal(sig)
    proc.wait(timeout=120)
    stopped = time.monotonic()  # gone: a SIGTERM'd daemon serves until its drain ends
    new = spawn(config, env=env, log=subprocess.DEVNULL)
    ready = time.monotonic()
    while True:  # until the client's first success after the old daemon exited
        after = [(t, err) for t, err in list(caller.log) if t >= stopped]
        ok = next((t for t, err in after if err is None), None)
        if ok is not None:
            break
        time.sleep(0.01)
    failed = [err for t, err in after if err is not None and t <= ok]
    kinds = Counter(type(e).__name__ for e in failed)
    return new, {"signal": signal.Signals(sig).name, "first_call_after_ready_ms": (ok - ready) * 1000,
                 "down_s": ready - stopped, "failed_calls": len(failed), "errors": dict(kinds),
                 "first_error": str(failed[0]) if failed else ""}


def run(ctx: BenchContext) -> dict[str, Any]:
    rounds = 2 if ctx.smoke else 4 if ctx.quick else 8
    task = ctx.progress.add_task("reconnect: restart to first call", total=rounds)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tierd-br-", dir="/tmp") as tmp_s:  # short path: AF_UNIX limit
        tmp = Path(tmp_s)
        sock = str(tmp / "tierd.sock")
        config = tmp / "tierd.toml"
        config.write_text(f'[tiers.host]\nsize = "256MiB"\n[tiers.nvme]\npath = "{ctx.workdir / "nvme"}"\n'
                          f'size = "256MiB"\n[daemon]\nsocket = "{sock}"\nmetrics = ""\n')
        proc = spawn(config, env=env, log=subprocess.DEVNULL)
        store = tierd.connect(sock)
        caller = _Caller(store)
        try:
            for i in range(rounds):
                proc, res = restart_to_first_call(proc, config, caller, signal.SIGKILL if i % 2 == 0 else signal.SIGTERM,
                                                  env)
                rows.append(res)
                ctx.progress.advance(task)
        finally:
            caller.stop()
            store.close()
            proc.terminate()
            proc.wait(timeout=60)
    worst = max(r["first_call_after_ready_ms"] for r in rows)
    return {"rounds": rows, "worst_first_call_after_ready_ms": worst}


def markdown(res: dict[str, Any]) -> str:
    lines = ["| restart | daemon away s | failed calls | errors raised | first call served, ms after READY=1 |",
             "|---|---|---|---|---|"]
    for r in res["rounds"]:
        errors = ", ".join(f"{k} x{v}" for k, v in r["errors"].items()) or "none"
        lines.append(f"| {r['signal']} | {r['down_s']:.1f} | {r['failed_calls']} | {errors} | "
                     f"{r['first_call_after_ready_ms']:.0f} |")
    lines.append(f"\nWorst: {res['worst_first_call_after_ready_ms']:.0f} ms (goal <= 1000).")
    if res["rounds"]:
        lines.append(f"\nFirst error a caller saw: `{res['rounds'][0]['first_error']}`")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    return []


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "reconnect", argv)


if __name__ == "__main__":
    sys.exit(main())
