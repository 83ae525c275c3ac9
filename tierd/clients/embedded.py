"""``tierd.open()``: the engine inside the calling process."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from tierd.clients.values import Value, check_out, encode_value, new_value
from tierd.config import Config, load_config
from tierd.daemon.engine import Engine
from tierd.types import ObjectInfo, Stats

__all__ = ["Store", "open_store"]


class Store:
    """A tensor store over tiers. Thread-safe; use as a context manager or call :meth:`close`.

    Keys are strings ``namespace/name``; the namespace picks defaults from
    the config's ``[namespaces.NAME]``. Values are tensors (any dtype, shape
    and strides; returned contiguous, same shape) or raw bytes (returned as
    ``bytes``).
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._async = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tierd-async")

    @property
    def config(self) -> Config:
        return self._engine.config

    @property
    def engine(self) -> Engine:
        return self._engine

    def put(
        self, key: str, value: Value, *, tier: str | None = None, durable: bool | None = None,
        codec: str | None = None, pin: bool = False, ttl: float | None = None,
    ) -> None:
        """Store ``value`` under ``key``, replacing any earlier value.

        Args:
            tier: highest tier it may land in (default: the namespace's, else host).
            durable: fsync to nvme and keep across restarts (default: the namespace's).
            codec: ``"none"``, ``"zstd"`` or ``"bytegroup"``, used on nvme.
            pin: never evict it from the tier it lands in.
            ttl: seconds until it is deleted.

        Raises:
            InvalidArgument, QuotaExceeded, OutOfSpace (nothing stored before is lost).
        """
        src, meta = encode_value(value)
        self._engine.put(key, src, meta, tier=tier, durable=durable, codec=codec, pin=pin, ttl=ttl)

    def put_async(self, key: str, value: Value, **kwargs: Any) -> Future[None]:
        """:meth:`put` in the background; do not modify ``value`` until the future is done."""
        return self._async.submit(self.put, key, value, **kwargs)

    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        """The value stored under ``key``: a new tensor, ``out`` filled in place, or bytes.

        Raises:
            NotFound: no such key. CorruptObject: stored bytes fail their checksum.
            InvalidArgument: ``out`` does not match the object.
        """
        with self._engine.lease(key) as rec:
            if out is not None:
                self._engine.read_into(rec, check_out(out, rec.meta, key))
                return out
            value, dest = new_value(rec.meta)
            self._engine.read_into(rec, dest)
        if isinstance(value, bytearray):
            return bytes(value)
        if device is not None and torch.device(device).type != "cpu":
            value = value.to(device)
        return value

    def get_async(self, key: str, **kwargs: Any) -> Future[Any]:
        """:meth:`get` in the background."""
        return self._async.submit(self.get, key, **kwargs)

    def prefetch(self, keys: Iterable[str] | str, *, tier: str = "host") -> None:
        """Start bringing ``keys`` up to ``tier``; returns at once (a hint: missing keys are ignored)."""
        self._engine.prefetch([keys] if isinstance(keys, str) else keys, tier)

    def move(self, key: str, tier: str) -> None:
        """Promote or demote ``key`` to ``tier`` now. Raises NotFound, OutOfSpace."""
        self._engine.move(key, tier)

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed. Readers already copying finish undisturbed."""
        return self._engine.delete(key)

    def exists(self, key: str) -> bool:
        return self._engine.exists(key)

    def info(self, key: str) -> ObjectInfo:
        """Where and how ``key`` is stored. Raises NotFound."""
        return self._engine.info(key)

    def keys(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""
        return self._engine.keys(prefix)

    def stats(self) -> Stats:
        return self._engine.stats()

    def close(self) -> None:
        """Finish pending async work, flush, release files; idempotent."""
        self._async.shutdown(wait=True)
        self._engine.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None) -> Store:
    """Open the embedded store (see ``tierd.open``)."""
    return Store(Engine(load_config(config)))
