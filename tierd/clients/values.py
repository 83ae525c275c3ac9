"""Tensors and bytes <-> (flat uint8 tensor, ObjectMeta): shared by every client."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from tierd._buffers import tensor_bytes
from tierd.daemon.index import ObjectMeta
from tierd.errors import InvalidArgument

__all__ = ["Value", "encode_value", "new_value", "check_out", "dtype_from_name"]

Value = torch.Tensor | bytes | bytearray | memoryview

_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}


def dtype_from_name(name: str) -> torch.dtype:
    dtype = _DTYPES.get(name)
    if dtype is None:
        raise InvalidArgument(f"dtype {name!r} is not known to this torch ({torch.__version__})")
    return dtype


def encode_value(value: Any) -> tuple[torch.Tensor, ObjectMeta]:
    """The bytes to store for ``value`` and what it is.

    Tensors are made contiguous (a copy only if they are not) and brought to
    the CPU; the returned uint8 tensor aliases them, so the caller must not
    change ``value`` until the put finished.

    Raises:
        InvalidArgument: ``value`` is not a dense tensor or bytes-like.
    """
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized or value.is_nested:
            raise InvalidArgument(f"only dense (strided) tensors can be stored, got layout {value.layout}")
        if value.requires_grad:
            value = value.detach()
        if value.device.type != "cpu":
            value = value.cpu()
        t = value.contiguous()
        meta = ObjectMeta("tensor", str(t.dtype).removeprefix("torch."), tuple(t.shape), t.element_size())
        return tensor_bytes(t), meta
    if isinstance(value, (bytes, bytearray, memoryview)):
        view = memoryview(value).cast("B")
        meta = ObjectMeta("bytes", "uint8", (view.nbytes,), 1)
        if view.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8), meta
        with warnings.catch_warnings():  # read-only bytes: we only ever read them
            warnings.simplefilter("ignore", UserWarning)
            return torch.frombuffer(view, dtype=torch.uint8), meta
    raise InvalidArgument(f"values are torch.Tensor or bytes, got {type(value).__name__}")


def new_value(meta: ObjectMeta) -> tuple[Any, torch.Tensor]:
    """A fresh value to read into, and its flat uint8 view."""
    if meta.kind == "bytes":
        buf = bytearray(meta.shape[0])
        if not buf:
            return buf, torch.empty(0, dtype=torch.uint8)
        return buf, torch.frombuffer(buf, dtype=torch.uint8)
    t = torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype))
    return t, tensor_bytes(t)


def check_out(out: torch.Tensor, meta: ObjectMeta, key: str) -> torch.Tensor:
    """The flat uint8 view of ``out`` after checking it can take ``key``'s value.

    Raises:
        InvalidArgument: wrong dtype, element count, device or layout.
    """
    if meta.kind != "tensor":
        raise InvalidArgument(f"{key!r} holds raw bytes; out= takes tensor objects only")
    dtype = dtype_from_name(meta.dtype)
    numel = 1
    for dim in meta.shape:
        numel *= dim
    if out.dtype != dtype or out.numel() != numel:
        raise InvalidArgument(
            f"out= must have dtype {dtype} and {numel} elements for {key!r}, got {out.dtype} with {out.numel()}"
        )
    if out.device.type != "cpu":
        raise InvalidArgument(f"out= on {out.device} is not supported yet; pass a CPU tensor")
    if not out.is_contiguous():
        raise InvalidArgument("out= must be contiguous (get() fills it in place, without a temporary)")
    return tensor_bytes(out)
