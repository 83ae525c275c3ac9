"""A real ``tierd serve`` process for tests, on a real socket, with readiness from sd_notify."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import msgspec

import tierd
from tierd.daemon.launch import spawn


def _toml(value: dict[str, Any], prefix: str = "") -> str:
    lines, tables = [], []
    for k, v in value.items():
        if isinstance(v, dict):
            tables.append((f"{prefix}{k}", v))
        else:
            lines.append(f"{k} = {msgspec.json.encode(v).decode()}")
    out = "\n".join(lines) + "\n"
    for name, table in tables:
        out += f"\n[{name}]\n" + _toml(table, f"{name}.")
    return out


class Daemon:
    """``tierd serve`` in a subprocess; ``start()`` returns once it sent READY=1."""

    def __init__(self, nvme_dir: Path, *, host: str = "32MiB", nvme: str = "256MiB", **extra: Any) -> None:
        # Socket paths are limited to 108 bytes: keep them short, outside pytest's tmp_path.
        self.run_dir = Path(tempfile.mkdtemp(prefix="tierd-t", dir="/tmp"))
        self.socket = self.run_dir / "tierd.sock"
        cfg: dict[str, Any] = {
            "tiers": {"host": {"size": host},
                      "nvme": {"path": str(nvme_dir), "size": nvme, "slab_size": "64MiB", "chunk_size": "1MiB"}},
            "daemon": {"socket": str(self.socket), "metrics": "127.0.0.1:0", "drain_timeout_s": 20.0},
        }
        for key, value in extra.items():
            cfg.setdefault(key, {}).update(value)
        self.config_path = self.run_dir / "tierd.toml"
        self.config_path.write_text(_toml(cfg))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.run_dir / "daemon.log"

    def start(self, timeout_s: float = 60.0) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
        with open(self.log, "ab") as log:
            try:
                self.proc = spawn(self.config_path, env=env, timeout_s=timeout_s, log=log)
            except tierd.DaemonUnavailable as exc:
                raise RuntimeError(f"{exc}:\n{self.log.read_text()}") from None
        return self

    def connect(self) -> tierd.RemoteStore:
        return tierd.connect(self.socket)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout_s)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.run_dir, ignore_errors=True)


def client_process(code: str, *, uid: int | None = None, stdin: bool = False) -> subprocess.Popen[str]:
    """A client process running ``code`` (with sys, os, torch and tierd imported), text pipes.

    ``uid``: the process becomes that uid (and gid) after its imports, before
    ``code`` runs, so SO_PEERCRED reports it; Python cannot start as another
    uid here (/root is 0700), and it need not: identity is what the socket sees.
    """
    head = f"import sys, os, torch, tierd\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
    if uid is not None:
        head += f"os.setgid({uid}); os.setuid({uid})\n"
    return subprocess.Popen([sys.executable, "-c", head + textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else None, text=True)


def open_to_all(daemon: Daemon) -> None:
    """Test only: let any uid reach the socket (the daemon makes it 0660 in a 0700 directory)."""
    os.chmod(daemon.run_dir, 0o755)
    os.chmod(daemon.socket, 0o666)
