"""``[trace] path``: every put, get and delete as a JSON line, for ``tierd simulate``."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import msgspec

__all__ = ["TraceWriter"]


class TraceWriter:
    """JSON lines ``{t, op, key, size, tier[, parent]}``; buffered, flushed at close. Thread-safe.

    ``parent``: the block before this one in its prefix, where a prefix namespace was told
    (``Store.declare_prefix``), so that ``tierd simulate`` can replay the prefix policies."""

    def __init__(self, path: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "ab", buffering=1 << 20)  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()

    def write(self, op: str, key: str, size: int, tier: str, parent: str = "") -> None:
        event = {"t": time.time(), "op": op, "key": key, "size": size, "tier": tier}
        if parent:
            event["parent"] = parent
        line = self._encoder.encode(event)
        with self._lock:
            if not self._fh.closed:
                self._fh.write(line + b"\n")

    def close(self) -> None:
        with self._lock:
            self._fh.close()
