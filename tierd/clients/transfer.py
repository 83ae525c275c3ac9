"""Values in and out of a store's buffers: the one decision tree both clients use.

A put hands its value over as an :class:`Outgoing`: a CUDA tensor or a large
strided CPU tensor is copied straight into the reserved arena bytes (one DMA,
or one strided copy; no host temporary), anything else is encoded to flat
bytes first. A get reads through a :class:`Source` (an engine lease for
``tierd.open()``, a daemon reply for ``tierd.connect()``) and
:func:`read_value` picks the path: a CUDA target gets one DMA from the arena
(or the source's own device read, GPUDirect Storage), a contiguous ``out=``
is filled in place, a strided one is copied from the arena with its
strides, and a new value is read into fresh memory.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tierd._buffers import copy_bytes
from tierd.clients.values import check_out, dtype_from_name, encode_value, new_value, tensor_meta, typed_view
from tierd.engine.index import ObjectMeta
from tierd.tiers.gpu import CopyEngine

__all__ = ["Outgoing", "Source", "read_value", "finish_value", "STRIDED_MIN_BYTES"]

STRIDED_MIN_BYTES = 64 << 10  # below this, a contiguous temporary costs less than the bookkeeping


class Outgoing:
    """A value on its way into a store: what it is, how many bytes, and how to write them."""

    __slots__ = ("_value", "direct", "meta", "nbytes", "_flat")

    def __init__(self, value: Any) -> None:
        self._value = value
        self.direct = _direct_source(value)  # copied straight into the arena when there is one
        self._flat: torch.Tensor | None = None
        if self.direct is not None:
            self.meta = tensor_meta(self.direct)
            self.nbytes = self.direct.numel() * self.direct.element_size()
        else:
            self._flat, self.meta = encode_value(value)
            self.nbytes = self._flat.numel()

    @property
    def on_cuda(self) -> bool:
        return self.direct is not None and self.direct.device.type == "cuda"

    def flat(self) -> torch.Tensor:
        """The value's bytes as a flat uint8 CPU tensor (encoded on first use for a direct source)."""
        if self._flat is None:
            self._flat, _ = encode_value(self._value)
        return self._flat

    def source(self) -> torch.Tensor:
        """The bytes to hand to a put without the arena: a CUDA tensor's own memory, else :meth:`flat`."""
        if self.on_cuda:
            assert self.direct is not None
            return self.direct.contiguous().reshape(-1).view(torch.uint8)
        return self.flat()

    def write_into(self, copies: CopyEngine, extent: torch.Tensor) -> None:
        """Copy the value into ``extent`` (flat reserved arena bytes of :attr:`nbytes`)."""
        direct = self.direct
        if direct is None:
            copy_bytes(extent, self.flat())
        elif direct.device.type == "cuda":
            copies.to_host(extent, direct)
        else:
            typed_view(extent, self.meta).copy_(direct)


class Source(Protocol):
    """One object being read (held readable until the reader is done)."""

    @property
    def meta(self) -> ObjectMeta: ...

    def arena_view(self) -> torch.Tensor | None:
        """The object's bytes in the host arena, readable in place; None when it has no host copy."""

    def read_into(self, dest: torch.Tensor) -> None:
        """Copy the object's bytes into the flat uint8 CPU tensor ``dest``."""

    def device_view(self) -> torch.Tensor | None:
        """As :meth:`arena_view`, asked before filling a CUDA target (a source that can read straight
        into device memory may answer None here and do it in :meth:`read_device`)."""

    def read_device(self, target: torch.Tensor) -> bool:
        """Fill CUDA tensor ``target`` without the host if this source can; False if not."""

    def inline_bytes(self) -> bytes | None:
        """The value as a ready bytes object when it came whole (a small daemon reply), else None."""


def read_value(src: Source, key: str, copies: CopyEngine, *, device: str | torch.device | None,
               out: torch.Tensor | None) -> Any:
    """The value ``get`` returns, read from ``src``: into ``out``, onto ``device``, or new."""
    meta = src.meta
    target = _device_target(meta, key, device, out)
    if target is not None:
        view = src.device_view()
        if view is not None:  # one DMA from the pinned arena
            copies.to_device(target, view)
        elif not src.read_device(target):
            _, tmp_flat = new_value(meta)
            src.read_into(tmp_flat)
            copies.to_device(target, tmp_flat)
        return target
    if out is not None:
        flat = check_out(out, meta, key)
        if flat is not None:
            src.read_into(flat)
            return out
        view = src.arena_view()
        if view is not None:  # strided out: straight from the arena, one copy
            out.copy_(typed_view(view, meta))
            return out
        tmp, tmp_flat = new_value(meta)
        src.read_into(tmp_flat)
        out.copy_(tmp)
        return out
    if meta.kind == "bytes":
        ready = src.inline_bytes()
        if ready is not None:
            return ready
    value, dest = new_value(meta)
    src.read_into(dest)
    return finish_value(value, device)


def finish_value(value: Any, device: str | torch.device | None) -> Any:
    """What get() returns for a freshly read value: bytes for bytes, the tensor on ``device``."""
    if isinstance(value, bytearray):
        return bytes(value)
    if device is not None and torch.device(device).type != "cpu":
        return value.to(device)
    return value


def _direct_source(value: Any) -> torch.Tensor | None:
    """``value`` if a store should copy it straight into an arena extent instead of encoding it first.

    That is a CUDA tensor (one DMA into the pinned arena, no host temporary)
    or a large, non-contiguous CPU tensor (copied with its strides, no
    contiguous temporary).
    """
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
        return None
    if value.device.type == "cuda":
        return value.detach()
    if (value.device.type == "cpu" and not value.is_contiguous()
            and value.numel() * value.element_size() >= STRIDED_MIN_BYTES):
        return value.detach()
    return None


def _device_target(meta: ObjectMeta, key: str, device: str | torch.device | None,
                   out: torch.Tensor | None) -> torch.Tensor | None:
    """The CUDA tensor a get fills (a CUDA ``out=``, or a new tensor for ``device="cuda:N"``), else None."""
    if out is not None:
        if out.device.type != "cuda":
            return None
        check_out(out, meta, key)
        return out
    if device is None or meta.kind != "tensor" or torch.device(device).type != "cuda":
        return None
    return torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype), device=device)
