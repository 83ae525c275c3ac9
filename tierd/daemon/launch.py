"""Start ``tierd serve`` as a child process and wait until it is ready.

For tests, benchmarks and scripts that want a private daemon: readiness comes
from the daemon's own ``READY=1`` on a ``NOTIFY_SOCKET`` that this function
listens on, the same signal systemd waits for, so nobody polls or sleeps.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from tierd.errors import DaemonUnavailable

__all__ = ["spawn"]


def spawn(
    config_path: str | os.PathLike[str] | None, *, env: Mapping[str, str] | None = None, timeout_s: float = 60.0,
    log: IO[bytes] | int | None = None, command: Sequence[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Run ``python -m tierd serve --config config_path``; return once it sent READY=1.

    ``config_path`` None serves the embedded default config (with the
    environment's ``TIERD_*`` overrides); ``command`` replaces
    ``python -m tierd serve`` (``["tierd", "serve"]``: the installed script).

    Raises:
        DaemonUnavailable: it exited or did not get ready within ``timeout_s``.
    """
    with tempfile.TemporaryDirectory(prefix="tierd-notify-") as tmp:
        path = Path(tmp) / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(path))
            notify.settimeout(0.5)
            child_env = dict(os.environ if env is None else env)
            child_env["NOTIFY_SOCKET"] = str(path)
            argv = list(command or [sys.executable, "-m", "tierd", "serve"])
            if config_path is not None:
                argv += ["--config", os.fspath(config_path)]
            proc = subprocess.Popen(argv, env=child_env, stdout=log, stderr=log)
            waited = 0.0
            while True:
                try:
                    fields = notify.recv(4096).decode().split("\n")
                except TimeoutError:
                    waited += 0.5
                    if proc.poll() is not None:
                        raise DaemonUnavailable(f"tierd serve exited with code {proc.returncode} before ready") from None
                    if waited >= timeout_s:
                        proc.kill()
                        raise DaemonUnavailable(f"tierd serve not ready within {timeout_s} s") from None
                    continue
                if "READY=1" in fields:
                    return proc
