"""``tierd.checkpoint.StorageWriter`` / ``StorageReader``: torch.distributed.checkpoint in tierd's format.

    import torch.distributed.checkpoint as dcp
    dcp.save(state_dict, storage_writer=tierd.checkpoint.StorageWriter(path))
    dcp.load(state_dict, storage_reader=tierd.checkpoint.StorageReader(path))

DCP plans what each rank writes (every tensor chunk once, replicated ones by
one rank) and, on load, what each rank reads (its planner reshards: a
checkpoint written by 2 ranks loads on 1 or on 4). These classes are only its
storage: each rank's items go into its own 4 KiB-aligned safetensors shards
(``rank00001-shard-00000.safetensors``), written with O_DIRECT from a
page-aligned staging pool, with an xxh3 per item, and fdatasync'ed before
the rank reports its results. The coordinator then writes DCP's metadata
(``dcp.metadata``, pickled as DCP's own file system writer does) and
commits ``manifest.json`` last (Note [checkpoint durability]): a directory
without it is not a checkpoint, for DCP's reader as for ``tierd.checkpoint.load``,
which reads a DCP-written checkpoint too (whole tensors, assembled from
their chunks).

An item's ``storage_data`` in DCP's metadata is its key in the manifest.
Non-tensor values (DCP serialises them with ``torch.save``) are stored as
uint8 items beside the tensors and unpickled by DCP's planner on load, as
with DCP's own files: load checkpoints you trust.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from pathlib import Path
from typing import Any

import msgspec
import torch
from torch.distributed.checkpoint import Metadata
from torch.distributed.checkpoint import StorageReader as _DcpReader
from torch.distributed.checkpoint import StorageWriter as _DcpWriter
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import WriteResult

from tierd._buffers import tensor_bytes
from tierd._io import fsync_dir
from tierd.clients import checkpoint as ckpt
from tierd.clients.checkpoint_format import MANIFEST, Manifest, TensorEntry, atomic_write, read_manifest, read_tensor
from tierd.errors import CorruptObject, InvalidArgument, NotFound
from tierd.tiers.nvme import probe_direct

__all__ = ["StorageWriter", "StorageReader", "load_dcp"]

DCP_METADATA = "dcp.metadata"


def _item_key(index: MetadataIndex) -> str:
    offsets = ",".join(str(o) for o in index.offset) if index.offset is not None else ""
    return f"{index.fqn}@{offsets}"


class StorageWriter(_DcpWriter):
    """DCP's storage writer for tierd's checkpoint format; see the module's docstring.

    Args:
        path: the checkpoint directory (new, or empty).
        shard_bytes: the most bytes in one shard file.
    """

    def __init__(self, path: str | os.PathLike[str], *, shard_bytes: int = ckpt.DEFAULT_SHARD_BYTES) -> None:
        super().__init__()
        self.path = Path(path)
        self.shard_bytes = shard_bytes
        self._pool = ckpt._StagingPool()  # this writer's own: DCP's saves and tierd's may overlap
        self._coordinator = False

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._coordinator = is_coordinator
        if is_coordinator and (self.path / MANIFEST).exists():
            raise InvalidArgument(f"{self.path} holds a checkpoint already; choose a new directory per save")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.path.mkdir(parents=True, exist_ok=True)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # Each plan's writer index and their count: shard names, and the manifest's world size.
        return [dataclasses.replace(plan, storage_data=(i, len(plans))) for i, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[list[WriteResult]]:
        rank, world = plan.storage_data if plan.storage_data is not None else (0, 1)
        tensors: dict[str, torch.Tensor] = {}
        index_of: dict[str, MetadataIndex] = {}
        for item in plan.items:
            data = planner.resolve_data(item)
            if item.type == WriteItemType.BYTE_IO:
                t = torch.frombuffer(bytearray(data.getbuffer()), dtype=torch.uint8)
            else:
                t = data.detach()
            key = _item_key(item.index)
            tensors[key], index_of[key] = t, item.index
        shards = ckpt._plan(tensors, self.shard_bytes, rank, max(world, 2))  # rank-prefixed names
        total = (shards[-1].pool_offset + shards[-1].nbytes) if shards else 0
        staged = self._pool.reserve(total)
        for shard in shards:
            pos = shard.pool_offset
            for name in shard.names:
                src = tensors[name]
                n = src.numel() * src.element_size()
                if n:
                    staged[pos : pos + n].copy_(tensor_bytes(src.contiguous().cpu()))
                pos += n
        part = Manifest(world_size=world, metadata={"dcp": True})
        direct = probe_direct(self.path) is None
        for shard in shards:
            entries: dict[str, TensorEntry] = {}
            part.shards[shard.name + ".safetensors"] = ckpt._write_shard(
                self.path, shard, tensors, staged, "none", direct, rank, 1, entries)
            part.tensors.update(entries)
        atomic_write(self.path / f"rank{rank:05d}.part.json", msgspec.json.encode(part))  # fsync'ed
        fsync_dir(self.path)
        results = [WriteResult(index=index_of[k], size_in_bytes=e.nbytes, storage_data=k)
                   for k, e in part.tensors.items()]
        fut: torch.futures.Future[list[WriteResult]] = torch.futures.Future()  # DCP waits on torch futures
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {wr.index: wr.storage_data for rank_results in results for wr in rank_results}
        metadata.storage_meta = self.storage_meta()
        manifest = Manifest(world_size=len(results), metadata={"dcp": True})
        for rank in range(len(results)):
            part = msgspec.json.decode((self.path / f"rank{rank:05d}.part.json").read_bytes(), type=Manifest)
            manifest.tensors.update(part.tensors)
            manifest.shards.update(part.shards)
        atomic_write(self.path / DCP_METADATA, pickle.dumps(metadata))
        atomic_write(self.path / MANIFEST, msgspec.json.encode(manifest))  # the commit point

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


class StorageReader(_DcpReader):
    """DCP's storage reader for checkpoints written by :class:`StorageWriter`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__()
        self.path = Path(path)
        self._manifest: Manifest | None = None
        self._storage_data: dict[MetadataIndex, str] = {}

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.path = Path(checkpoint_id)
        self._manifest = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        self._manifest = read_manifest(self.path)  # NotFound unless committed
        return _dcp_metadata(self.path)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._storage_data = metadata.storage_data
        if self._manifest is None:
            self._manifest = read_manifest(self.path)

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        manifest = self._manifest
        assert manifest is not None
        # Each stored item is read (and checked) once, in parallel, however many requests slice it.
        keys = list(dict.fromkeys(self._storage_data[req.storage_index] for req in plan.items))
        stored = dict(zip(keys, ckpt._writer.map(lambda k: _read_item(self.path, manifest, k), keys), strict=True))
        for req in plan.items:
            value = stored[self._storage_data[req.storage_index]]
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, io.BytesIO(value.numpy().tobytes()))
                continue
            for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
                value = value.narrow(dim, start, length)
            target = planner.resolve_tensor(req).detach()
            if target.shape != value.shape:
                raise CorruptObject(f"{req.storage_index.fqn}: the checkpoint's chunk is {tuple(value.shape)}, "
                                    f"the plan asks for {tuple(target.shape)}")
            target.copy_(value)
            planner.commit_tensor(req, target)
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return isinstance(checkpoint_id, (str, os.PathLike))


def _dcp_metadata(path: Path) -> Metadata:
    try:
        with open(path / DCP_METADATA, "rb") as fh:
            return pickle.load(fh)  # DCP's own metadata format (its FileSystemReader unpickles it too)
    except FileNotFoundError:
        raise NotFound(f"{path} is not a checkpoint written through DCP (no {DCP_METADATA})") from None


def _read_item(path: Path, manifest: Manifest, key: str) -> torch.Tensor:
    entry = manifest.tensors.get(key)
    if entry is None:
        raise CorruptObject(f"{path}: DCP's metadata names {key!r}, which the manifest does not hold")
    from tierd.clients.values import dtype_from_name

    out = torch.empty(tuple(entry.shape), dtype=dtype_from_name(entry.dtype))
    read_tensor(path, entry, manifest.shards[entry.shard], key, out)
    return out


def load_dcp(path: Path, manifest: Manifest) -> dict[str, Any]:
    """A DCP-written checkpoint as ``tierd.checkpoint.load`` returns it: the state dict, tensors whole."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = _dcp_metadata(path)
    flat: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata):
            raw = _read_item(path, manifest, metadata.storage_data[MetadataIndex(fqn)])
            flat[fqn] = torch.load(io.BytesIO(raw.numpy().tobytes()), weights_only=False)
        elif isinstance(md, TensorStorageMetadata):
            whole = torch.empty(md.size, dtype=md.properties.dtype)
            for chunk in md.chunks:
                part = _read_item(path, manifest, metadata.storage_data[MetadataIndex(fqn, chunk.offsets)])
                view = whole
                for dim, (start, length) in enumerate(zip(chunk.offsets, chunk.sizes, strict=True)):
                    view = view.narrow(dim, start, length)
                view.copy_(part)
            flat[fqn] = whole
    mapping = metadata.planner_data
    if isinstance(mapping, dict) and mapping and all(isinstance(v, tuple) for v in mapping.values()):
        from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

        return unflatten_state_dict(flat, mapping)
    return flat
