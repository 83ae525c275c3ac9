"""``[trace] path``: every put, get and delete as a JSON line, for ``tierd simulate``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec

__all__ = ["TraceWriter"]


class TraceWriter:
    """JSON lines ``{t, op, key, size, tier}``; buffered, flushed at close. Thread-safe."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "ab", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()

    def write(self, op: str, key: str, size: int, tier: str) -> None:
        line = self._encoder.encode({"t": time.time(), "op": op, "key": key, "size": size, "tier": tier})
        with self._lock:
            if not self._fh.closed:
                self._fh.write(line + b"\n")

    def close(self) -> None:
        with self._lock:
            self._fh.close()
