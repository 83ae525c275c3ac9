"""``tierd.open()``: the engine inside the calling process."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from tierd.clients.base import Staging, Store, prefetch_keys, staging_key
from tierd.clients.values import (
    Value,
    check_out,
    device_target,
    direct_source,
    encode_value,
    fill_extent,
    new_value,
    tensor_meta,
    typed_view,
)
from tierd.config import Config, load_config
from tierd.engine.core import Engine
from tierd.engine.index import ObjectMeta
from tierd.engine.keys import validate_key
from tierd.tiers.gpu import CopyEngine
from tierd.types import ObjectInfo, Stats

__all__ = ["EmbeddedStore", "open_store"]


class EmbeddedStore(Store):
    """The :class:`Store` whose engine runs in this process (no daemon)."""

    def __init__(self, engine: Engine) -> None:
        super().__init__()
        self._engine = engine
        gpu = engine.config.tiers.gpu
        self._copies = CopyEngine(engine.host.arena, pin=gpu.pin, piece=gpu.pin_piece)

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
        direct = direct_source(value)
        if direct is not None:
            # A CUDA tensor or a slice of a larger one: copy it straight into the
            # staging extent (one DMA, or one strided copy) instead of encoding
            # it into a temporary first and copying again.
            meta = tensor_meta(direct)
            pending = self._engine.prepare_put(validate_key(key), direct.numel() * direct.element_size(), meta,
                                               **opts)
            try:
                # An nvme-bound CUDA tensor skips the arena when GPUDirect Storage can take it.
                to_file = direct.device.type == "cuda" and pending.top == "nvme" and self._engine.device_source_ok(pending)
                if pending.staging is not None and not to_file:
                    fill_extent(self._copies, self._engine.host.view(pending.staging), direct, meta)
                    src = None
                else:
                    self._engine.abort_put(pending)  # no staging: nvme-bound (GDS), or no room
                    src = (direct.contiguous().reshape(-1).view(torch.uint8) if direct.device.type == "cuda"
                           else encode_value(direct)[0])
            except BaseException:
                self._engine.abort_put(pending)
                raise
            self._engine.finish_put(pending, src)
            return
        src, meta = encode_value(value)
        self._engine.put(validate_key(key), src, meta, **opts)

    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        with self._engine.lease(validate_key(key)) as rec:
            target = device_target(rec.meta, key, device, out)
            if target is not None:
                self._get_device(rec, target)
                return target
            if out is not None:
                flat = check_out(out, rec.meta, key)
                if flat is not None:
                    self._engine.read_into(rec, flat)
                    return out
                if "host" in rec.copies:  # strided out: straight from the arena, one copy
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

    def _get_device(self, rec: Any, target: torch.Tensor) -> None:
        """Fill CUDA tensor ``target`` with leased ``rec``: one DMA from the arena, or nvme to device by GDS."""
        gds = self._engine.nvme.gds and "nvme" in rec.copies
        loc = self._engine.read_location(rec, promote=not gds)
        if loc is not None:
            self._copies.to_device(target, self._engine.host.view(loc))
        elif gds and target.is_contiguous():
            self._engine.read_into(rec, target.reshape(-1).view(torch.uint8), promote=False)
        else:
            tmp, tmp_flat = new_value(rec.meta)
            self._engine.read_into(rec, tmp_flat)
            self._copies.to_device(target, tmp_flat)

    def stage(self, nbytes: int) -> Staging | None:
        if nbytes <= 0:
            return None
        pending = self._engine.prepare_put(staging_key(), nbytes, ObjectMeta("bytes", "uint8", (nbytes,), 1),
                                           stage=True)
        if pending.staging is None:
            self._engine.abort_put(pending)
            return None
        return Staging(self._engine.host.view(pending.staging), lambda: self._engine.abort_put(pending))

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
        self._copies.close()  # unregister the arena before the engine unmaps it
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
    return EmbeddedStore(Engine(load_config(config), in_process=True))
