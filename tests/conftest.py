from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def small_config(path: Path, *, host: str = "64MiB", nvme: str = "256MiB", **extra: Any) -> dict[str, Any]:
    """A config with small tiers under ``path``; ``extra`` merges into the top level."""
    cfg: dict[str, Any] = {
        "tiers": {
            "host": {"size": host},
            "nvme": {"path": str(path), "size": nvme, "slab_size": "64MiB", "chunk_size": "1MiB"},
        }
    }
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    """Corrupt one byte of a file in place (what a bad sector or a stray write does)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ mask]))


@pytest.fixture
def nvme_dir(tmp_path: Path) -> Path:
    d = tmp_path / "nvme"
    d.mkdir()
    return d


@pytest.fixture
def daemon(nvme_dir: Path) -> Iterator[Any]:
    """A real ``tierd serve`` (32 MiB host tier, nvme under ``nvme_dir``), killed after the test."""
    from daemon import Daemon

    d = Daemon(nvme_dir).start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's TIERD_* variables must not change what the tests see.
    import os

    for var in list(os.environ):
        if var.startswith("TIERD_"):
            monkeypatch.delenv(var)


class RedisServer:
    """A real redis-server on a loopback port, started and stopped by the test."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        import shutil
        import socket
        import subprocess

        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
        if port is None:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(workdir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        for _ in range(200):  # redis has no readiness signal to wait on: PING until it answers
            try:
                if client.ping():
                    break
            except redis.ConnectionError:
                if self.proc.poll() is not None:
                    raise RuntimeError("redis-server exited at start") from None
                threading_event_wait(0.02)
        else:
            raise RuntimeError("redis-server did not answer PING")
        client.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def threading_event_wait(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    server = RedisServer(tmp_path)
    yield server
    server.stop()
