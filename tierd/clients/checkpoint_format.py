"""The checkpoint format on disk: the manifest, the state dict's tree, finding and reading checkpoints.

A checkpoint directory holds safetensors shards (or compressed ``.tierd``
shards) and ``manifest.json``, written last (Note [checkpoint durability] in
:mod:`tierd.clients.checkpoint`). The manifest names every tensor's shard,
offset, size, dtype, shape and xxh3 checksum, the chunks of compressed
tensors (``[offset, stored, raw, mode]`` of each :class:`~tierd.codecs.Chunk`),
each shard's size, and the non-tensor rest of the state dict as a JSON tree.
"""

from __future__ import annotations

import base64
import logging
import math
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import torch

from tierd import checksums
from tierd._buffers import address_view, tensor_bytes
from tierd._io import fsync_dir, pread_all
from tierd.codecs import Chunk
from tierd.errors import CorruptObject, InvalidArgument, NotFound, TierdError

__all__ = ["MANIFEST", "FORMAT", "VERSION", "TensorEntry", "ShardEntry", "Manifest", "latest"]

log = logging.getLogger("tierd.checkpoint")

MANIFEST = "manifest.json"
FORMAT = "tierd-checkpoint"
VERSION = 1


# -- the state dict <-> (tensors, JSON tree) ------------------------------------------


def join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def entry_key(name: str, rank: int, world: int) -> str:
    """Manifest key of a tensor: ranks may hold tensors of the same name."""
    return name if world == 1 else f"rank{rank}:{name}"


def flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A JSON-able tree of ``obj`` with tensors moved into ``tensors`` by path."""
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided:
            raise InvalidArgument(f"{path}: only dense tensors can be checkpointed, got {obj.layout}")
        tensors[path] = obj  # the object itself: load(into=...) fills these very tensors
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": path}
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, Mapping):
        # Keys may be ints (optimizer state) or strings: keep their type.
        return {"__dict__": [[flatten(k, join(path, f"__key{i}"), tensors), flatten(v, join(path, k), tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, join(path, i), tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating)):
        return flatten(obj.item(), path, tensors)
    raise InvalidArgument(f"{path}: cannot checkpoint a {type(obj).__name__}; use tensors, numbers, strings, "
                          "bytes, lists, tuples and dicts")


def unflatten(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        t = tensors[tree["__ndarray__"]]
        return None if t is None else t.numpy()
    if "__float__" in tree:
        return float(tree["__float__"])
    if "__bytes__" in tree:
        return base64.b64decode(tree["__bytes__"])
    if "__tuple__" in tree:
        return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
    if "__dict__" in tree:
        return {unflatten(k, tensors): unflatten(v, tensors) for k, v in tree["__dict__"]}
    raise CorruptObject(f"manifest holds an unknown node {sorted(tree)!r}")


# -- manifest -------------------------------------------------------------------------


class TensorEntry(msgspec.Struct, kw_only=True):
    shard: str
    offset: int  # in the shard's data section (safetensors) or file (compressed)
    nbytes: int
    stored: int  # bytes in the file (== nbytes unless compressed)
    dtype: str
    shape: list[int]
    checksum: str  # xxh3-64 of the raw bytes, hex
    rank: int = 0
    chunks: list[list[int]] = []  # compressed: [offset, stored, raw, mode] of each Chunk (format v1)


class ShardEntry(msgspec.Struct, kw_only=True):
    bytes: int
    data_start: int
    rank: int = 0


class Manifest(msgspec.Struct, kw_only=True):
    format: str = FORMAT
    version: int = VERSION
    step: int | None = None
    created: float = 0.0
    world_size: int = 1
    codec: str = "none"
    metadata: dict[str, Any] = {}
    tensors: dict[str, TensorEntry] = {}
    shards: dict[str, ShardEntry] = {}
    tree: Any = None  # per rank: the non-tensor structure, see flatten
    trees: dict[str, Any] = {}


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file, write, fsync, rename, fsync the directory (Note [checkpoint durability])."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_manifest(path: Path) -> Manifest:
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        raise NotFound(f"{path} is not a complete checkpoint: it has no {MANIFEST}") from None
    try:
        manifest = msgspec.json.decode(raw, type=Manifest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptObject(f"{path / MANIFEST} does not parse: {exc}") from None
    if manifest.format != FORMAT or manifest.version > VERSION:
        raise CorruptObject(f"{path / MANIFEST} is format {manifest.format!r} v{manifest.version}, not ours")
    # Shard names come from the file: each must name a file in this very
    # directory, never a path out of it.
    for name in manifest.shards:
        if not name or name in (".", "..") or "/" in name or "\x00" in name:
            raise CorruptObject(f"{path / MANIFEST} names a shard {name!r} outside its directory")
    for key, entry in manifest.tensors.items():
        if entry.shard not in manifest.shards:
            raise CorruptObject(f"{path / MANIFEST}: tensor {key!r} lies in shard {entry.shard!r}, which it does not list")
    return manifest


# -- finding and reading --------------------------------------------------------------


def complete(path: Path) -> Manifest | None:
    try:
        manifest = read_manifest(path)
    except TierdError:
        return None
    for name, shard in manifest.shards.items():
        try:
            if (path / name).stat().st_size != shard.bytes:
                return None
        except OSError:
            return None
    return manifest


def checkpoints(root: Path) -> list[tuple[tuple[int, float], Path]]:
    found = []
    for child in root.iterdir() if root.is_dir() else []:
        if child.is_dir():
            manifest = complete(child)
            if manifest is not None:
                found.append(((manifest.step if manifest.step is not None else -1, manifest.created), child))
    return sorted(found)


def latest(root: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint under ``root`` (by step, then time), or None.

    Directories without a committed manifest, or whose shards are missing or
    of the wrong size, are not complete and are never returned.
    """
    found = checkpoints(Path(root))
    return found[-1][1] if found else None


def retain(root: Path, keep_last: int) -> None:
    found = checkpoints(root)
    for _, path in found[:-keep_last]:
        log.info("keep_last=%d: deleting %s", keep_last, path)
        (path / MANIFEST).unlink()  # first: a half-deleted checkpoint is already incomplete
        fsync_dir(path)
        shutil.rmtree(path, ignore_errors=True)


def read_tensor(directory: Path, entry: TensorEntry, shard: ShardEntry, name: str, out: torch.Tensor) -> None:
    path = directory / entry.shard
    raw = tensor_bytes(out)
    dest = address_view(raw.data_ptr(), entry.nbytes)
    try:
        with open(path, "rb", buffering=0) as fh:
            fd = fh.fileno()
            if not entry.chunks:
                try:
                    pread_all(fd, dest, shard.data_start + entry.offset)
                except OSError as exc:
                    raise CorruptObject(f"tensor {name!r}: shard {path.name} is truncated") from exc
            else:
                pos = 0
                for file_off, stored, rawlen, mode in entry.chunks:
                    c = Chunk(0, file_off, stored, rawlen, mode)  # the tensor's xxh3 covers its chunks
                    payload = os.pread(fd, c.stored, c.offset)
                    if len(payload) != c.stored:
                        raise CorruptObject(f"tensor {name!r}: shard {path.name} is truncated")
                    c.decode_into(memoryview(payload), dest[pos : pos + c.raw], out.element_size())
                    pos += c.raw
    except FileNotFoundError:
        raise CorruptObject(f"tensor {name!r}: shard {path.name} is missing") from None
    except CorruptObject as exc:
        raise CorruptObject(f"tensor {name!r} in shard {path.name}: {exc}") from None
    if checksums.xxh3_hex(dest) != entry.checksum:
        raise CorruptObject(f"tensor {name!r} in shard {path.name} fails its checksum: the shard is corrupt")


def read_then_copy(directory: Path, entry: TensorEntry, shard: ShardEntry, name: str, target: torch.Tensor) -> None:
    tmp = torch.empty(tuple(entry.shape), dtype=target.dtype)
    read_tensor(directory, entry, shard, name, tmp)
    target.copy_(tmp)


class MissingAsNone(dict):  # type: ignore[type-arg]
    """Tensors not read (``into`` did not ask for them) come back as None."""

    def __missing__(self, key: str) -> None:
        return None
