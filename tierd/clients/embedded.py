"""``tierd.open()``: the engine inside the calling process."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from tierd.clients.base import Store, prefetch_keys
from tierd.clients.values import (
    Value,
    check_out,
    encode_value,
    new_value,
    strided_source,
    tensor_meta,
    typed_view,
)
from tierd.config import Config, load_config
from tierd.daemon.engine import Engine, validate_key
from tierd.types import ObjectInfo, Stats

__all__ = ["EmbeddedStore", "open_store"]


class EmbeddedStore(Store):
    """The :class:`Store` whose engine runs in this process (no daemon)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine

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
        opts: dict[str, Any] = {"tier": tier, "durable": durable, "codec": codec, "pin": pin, "ttl": ttl}
        strided = strided_source(value)
        if strided is not None:
            # A slice of a larger tensor: copy it with its strides straight into the
            # staging extent, instead of making it contiguous first and copying again.
            meta = tensor_meta(strided)
            pending = self._engine.prepare_put(validate_key(key), strided.numel() * strided.element_size(), meta,
                                               **opts)
            if pending.staging is not None:
                try:
                    typed_view(self._engine.host.view(pending.staging), meta).copy_(strided)
                except BaseException:
                    self._engine.abort_put(pending)
                    raise
                self._engine.finish_put(pending)
                return
            self._engine.abort_put(pending)
        src, meta = encode_value(value)
        self._engine.put(validate_key(key), src, meta, **opts)

    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        with self._engine.lease(validate_key(key)) as rec:
            if out is not None:
                flat = check_out(out, rec.meta, key)
                if flat is not None:
                    self._engine.read_into(rec, flat)
                    return out
                if rec.host is not None:  # strided out: straight from the arena, one copy
                    loc = self._engine.read_location(rec)
                    if loc is not None:
                        out.copy_(typed_view(self._engine.host.view(loc), rec.meta))
                        return out
                tmp, tmp_flat = new_value(rec.meta)
                self._engine.read_into(rec, tmp_flat)
                out.copy_(tmp)
                return out
            value, dest = new_value(rec.meta)
            self._engine.read_into(rec, dest)
        return finish_value(value, device)

    def prefetch(self, keys: Iterable[str] | str, *, tier: str = "host") -> None:
        self._engine.prefetch(prefetch_keys(keys), tier)

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self._engine.declare_schedule([validate_key(k) for k in keys], cyclic=cyclic)

    def move(self, key: str, tier: str) -> None:
        self._engine.move(validate_key(key), tier)

    def delete(self, key: str) -> bool:
        return self._engine.delete(validate_key(key))

    def exists(self, key: str) -> bool:
        return self._engine.exists(validate_key(key))

    def info(self, key: str) -> ObjectInfo:
        return self._engine.info(validate_key(key))

    def keys(self, prefix: str = "") -> list[str]:
        return self._engine.keys(prefix)

    def stats(self) -> Stats:
        return self._engine.stats()

    def close(self) -> None:
        super().close()
        self._engine.close()


def finish_value(value: Any, device: str | torch.device | None) -> Any:
    """What get() returns for a freshly read value: bytes for bytes, the tensor on ``device``."""
    if isinstance(value, bytearray):
        return bytes(value)
    if device is not None and torch.device(device).type != "cpu":
        return value.to(device)
    return value


def open_store(config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None) -> EmbeddedStore:
    """Open the embedded store (see ``tierd.open``)."""
    return EmbeddedStore(Engine(load_config(config)))
