"""Tensors and bytes <-> (flat uint8 tensor, ObjectMeta): shared by every client."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from tierd._buffers import tensor_bytes
from tierd.engine.index import ObjectMeta
from tierd.errors import InvalidArgument

__all__ = ["Value", "encode_value", "new_value", "check_out", "dtype_from_name", "typed_view", "tensor_meta"]

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
        return tensor_bytes(t), tensor_meta(t)
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


def check_out(out: torch.Tensor, meta: ObjectMeta, key: str) -> torch.Tensor | None:
    """Check that ``out`` can take ``key``'s value; its flat uint8 view if contiguous, else None.

    A non-contiguous ``out`` (a slice of a larger tensor) must have the object's
    shape; the store then copies into it with its strides, without a temporary
    where it can.

    Raises:
        InvalidArgument: wrong dtype, element count or shape, device or layout.
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
    if out.device.type not in ("cpu", "cuda"):
        raise InvalidArgument(f"out= on {out.device} is not supported; pass a CPU or CUDA tensor")
    if out.is_contiguous() and out.device.type == "cpu":
        return tensor_bytes(out)
    if not out.is_contiguous() and tuple(out.shape) != tuple(meta.shape):
        raise InvalidArgument(f"a non-contiguous out= must have the object's shape {tuple(meta.shape)}, "
                              f"got {tuple(out.shape)}")
    return None


def typed_view(raw: torch.Tensor, meta: ObjectMeta) -> torch.Tensor:
    """The stored bytes ``raw`` (flat uint8) seen as the object's dtype and shape, without a copy."""
    return raw.view(dtype_from_name(meta.dtype)).view(meta.shape)


def tensor_meta(t: torch.Tensor) -> ObjectMeta:
    return ObjectMeta("tensor", str(t.dtype).removeprefix("torch."), tuple(t.shape), t.element_size())
