"""Checkpoints: ``save``, ``async_save``, ``load``, ``latest``.

A checkpoint is a directory::

    shard-00000.safetensors ...     tensors, at most ``shard_bytes`` each (safetensors format)
    shard-00000.tierd ...           the same, compressed (``codec="zstd"`` or ``"bytegroup"``)
    manifest.json                   written last: what is where, checksums, non-tensor state

Note [checkpoint durability]
    Shards are written with O_DIRECT from a page-aligned staging pool,
    truncated to their exact size and fdatasync'ed; then the manifest is
    written to a temporary file, fsync'ed, renamed into place, and the
    directory fsync'ed. A directory without ``manifest.json`` is incomplete
    and ``latest()`` ignores it, so a crash at any point leaves either the
    previous checkpoint or the new one, never half of one.

Note [staging]
    ``async_save`` returns once every tensor has been copied into the
    staging pool (the ``staged`` future): from then on training may change
    the parameters in place, the checkpoint is a snapshot. The pool is
    page-aligned memory reused from save to save (no allocation per save),
    and each shard's tensors lie back to back in it, so the shard's data
    section is written straight from the pool. One save is in flight at a
    time: the next ``async_save`` waits for the previous one to be durable.

Note [staging while training runs]
    Parameters and optimizer states change only in ``optimizer.step()``.
    Given ``optimizer=``, ``async_save`` copies at once only the tensors the
    optimizer does not own (buffers such as BatchNorm's running statistics,
    which forward changes; anything else in the state dict) and returns; the
    tensors that share storage with the optimizer's parameters or its state
    are copied on a background thread while forward and backward run. A
    step pre-hook on the optimizer (one per optimizer, registered once) waits
    for that copy before ``step()`` changes anything, so the checkpoint is
    still the state at the call: training blocks only when a step comes
    before the copy is done (``PendingSave.step_wait_s`` says how long it did).
    CUDA tensors are copied on a side stream ordered after the work queued
    before the call.

A safetensors file allows no holes between tensors, so tensors are packed
back to back; the header is padded with spaces (valid JSON whitespace) so
the data section starts on a 4 KiB boundary, which is what O_DIRECT needs.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time
import weakref
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import torch

from tierd import checksums
from tierd._buffers import address_view, aligned_buffer, tensor_bytes
from tierd._io import fsync_dir, pwrite_all
from tierd.clients.base import Store
from tierd.clients.checkpoint_format import (
    MANIFEST,
    Manifest,
    MissingAsNone,
    ShardEntry,
    TensorEntry,
    atomic_write,
    entry_key,
    flatten,
    latest,
    read_manifest,
    read_tensor,
    read_then_copy,
    retain,
    unflatten,
)
from tierd.clients.values import dtype_from_name
from tierd.codecs import Chunk, get_codec
from tierd.errors import InvalidArgument, MediaError, TierdError
from tierd.tiers.nvme import probe_direct

__all__ = ["save", "async_save", "load", "latest", "prepare", "PendingSave", "MANIFEST"]  # and StorageWriter, StorageReader (lazy)


def __getattr__(name: str) -> Any:
    # torch.distributed.checkpoint is imported only by those who use DCP.
    if name in ("StorageWriter", "StorageReader"):
        from tierd.clients import checkpoint_dcp

        return getattr(checkpoint_dcp, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

log = logging.getLogger("tierd.checkpoint")

BLOCK = 4096
CHUNK = 4 << 20  # unit of parallel writes and of compression
DEFAULT_SHARD_BYTES = 2 << 30

# safetensors dtype names
_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
    **{d: n for n, d in (("F8_E4M3", getattr(torch, "float8_e4m3fn", None)),
                          ("F8_E5M2", getattr(torch, "float8_e5m2", None))) if d is not None},
    **{d: n for n, d in (("U16", getattr(torch, "uint16", None)), ("U32", getattr(torch, "uint32", None)),
                          ("U64", getattr(torch, "uint64", None))) if d is not None},
}


# -- staging pool ---------------------------------------------------------------------


class _StagingPool:
    """Page-aligned host memory reused from save to save (Note [staging]).

    One pool per process (and one per DCP ``StorageWriter``), as large as the
    largest save so far, rounded to 4 KiB. :meth:`prefault` grows it ahead, with
    every page faulted in (MAP_POPULATE) on a background thread, so that the first
    save copies at the speed of later ones instead of paging the pool in.
    """

    def __init__(self) -> None:
        self._buf: mmap.mmap | None = None
        self._tensor: torch.Tensor | None = None
        self._lock = threading.Lock()
        self._growing: Future[None] | None = None

    @staticmethod
    def _size(nbytes: int) -> int:
        return max(BLOCK, -(-nbytes // BLOCK) * BLOCK)

    def _grow_locked(self, size: int, populate: bool) -> None:
        if self._buf is not None and len(self._buf) >= size:
            return
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
        buf = mmap.mmap(-1, size, flags=flags)  # zero-filled, page-aligned
        self._tensor = None
        if self._buf is not None:
            self._buf.close()
        self._buf, self._tensor = buf, torch.frombuffer(buf, dtype=torch.uint8)

    def prefault(self, nbytes: int) -> Future[None]:
        """Grow to ``nbytes`` with every page faulted in, on a background thread."""
        size = self._size(nbytes)

        def grow() -> None:
            with self._lock:
                self._grow_locked(size, populate=True)

        with self._lock:
            self._growing = _prefaulter.submit(grow)
            return self._growing

    def reserve(self, nbytes: int) -> torch.Tensor:
        size = self._size(nbytes)
        growing = self._growing
        if growing is not None:
            growing.result()  # a prefault under way: wait for it rather than map twice
        with self._lock:
            self._grow_locked(size, populate=False)
            assert self._tensor is not None
            return self._tensor[:size]

    @property
    def nbytes(self) -> int:
        return len(self._buf) if self._buf is not None else 0


_pool = _StagingPool()
_inflight_lock = threading.Lock()
_inflight: PendingSave | None = None
_writer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="tierd-ckpt")
_committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierd-ckpt-commit")
_prefaulter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierd-ckpt-prefault")


# -- saving ---------------------------------------------------------------------------


@dataclass
class _Shard:
    name: str
    names: list[str] = field(default_factory=list)
    nbytes: int = 0
    pool_offset: int = 0  # where its data starts in the staging pool (page-aligned)


@dataclass
class PendingSave:
    """An ``async_save`` in flight: ``staged`` then ``durable`` complete, in that order.

    Attributes:
        staged: done once every tensor is copied to host (training may go on).
        durable: done once the checkpoint is on disk, fsync'ed, manifest committed;
            its result is the checkpoint's path.
    """

    path: Path
    staged: Future[None] = field(default_factory=Future)
    durable: Future[Path] = field(default_factory=Future)
    #: seconds ``optimizer.step()`` waited for this save's staging (Note [staging while training runs])
    step_wait_s: float = 0.0

    def result(self, timeout: float | None = None) -> Path:
        """Wait until durable; return the path."""
        return self.durable.result(timeout)


class _StepGuard:
    """The step pre-hook of one optimizer: waits for the staging of the save in flight.

    Registered once per optimizer and never removed (a hook cannot remove itself
    while ``step()`` iterates the hooks); with no save staging it costs one check.
    """

    def __init__(self) -> None:
        self.pending: PendingSave | None = None

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self.pending
        if pending is None:
            return None
        if not pending.staged.done():
            t0 = time.perf_counter()
            pending.staged.exception()  # waits; a failed save reports through its own futures
            pending.step_wait_s += time.perf_counter() - t0
        self.pending = None
        return None


_guards: weakref.WeakKeyDictionary[Any, _StepGuard] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def _guard(optimizer: Any) -> _StepGuard:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgument(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    with _guards_lock:
        guard = _guards.get(optimizer)
        if guard is None:
            guard = _guards[optimizer] = _StepGuard()
            optimizer.register_step_pre_hook(guard)
        return guard


def _storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """Which memory ``t`` lies in; None for a tensor subclass without storage of its own (DTensor)."""
    try:
        return str(t.device), t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        return None


def _owned_storages(optimizer: Any) -> set[tuple[str, int] | None]:
    """The storages only ``optimizer.step()`` changes: its parameters' and its state's tensors."""
    owned = {_storage_key(p) for group in optimizer.param_groups for p in group["params"]}
    for state in optimizer.state.values():
        owned.update(_storage_key(v) for v in state.values() if isinstance(v, torch.Tensor))
    owned.discard(None)
    return owned


def _copy_in(staged: torch.Tensor, shards: list[_Shard], tensors: dict[str, torch.Tensor],
             only: set[str] | None, skip: set[str] | None) -> None:
    """Copy tensors (those in ``only``, or all but ``skip``) to their places in the staging region."""
    for shard in shards:
        pos = shard.pool_offset
        for name in shard.names:
            src = tensors[name]
            n = src.numel() * src.element_size()
            if n and (only is None or name in only) and (skip is None or name not in skip):
                staged[pos : pos + n].copy_(tensor_bytes(src.detach().contiguous()))  # from a GPU too
            pos += n


def _plan(tensors: dict[str, torch.Tensor], shard_bytes: int, rank: int, world: int) -> list[_Shard]:
    shards: list[_Shard] = []
    prefix = f"rank{rank:05d}-" if world > 1 else ""
    current: _Shard | None = None
    pool = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if current is None or (current.nbytes and current.nbytes + n > shard_bytes):
            pool = -(-pool // BLOCK) * BLOCK
            current = _Shard(f"{prefix}shard-{len(shards):05d}", pool_offset=pool)
            shards.append(current)
        current.names.append(name)
        current.nbytes += n
        pool += n
    return shards


def _header(shard: _Shard, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors header, padded so the data section starts on a 4 KiB boundary."""
    entries: dict[str, Any] = {"__metadata__": metadata}
    pos = 0
    for name in shard.names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        if t.dtype not in _ST_DTYPES:
            raise InvalidArgument(f"{name}: dtype {t.dtype} has no safetensors name; save it with codec='zstd'")
        entries[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + n]}
        pos += n
    body = msgspec.json.encode(entries)
    total = -(-(8 + len(body)) // BLOCK) * BLOCK
    body += b" " * (total - 8 - len(body))
    return struct.pack("<Q", len(body)) + body


def _open_for_write(path: Path, direct: bool) -> tuple[int, bool]:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    if direct:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644), True
        except OSError:
            pass
    return os.open(path, flags, 0o644), False


def _write_region(fd: int, region: torch.Tensor, file_offset: int, direct: bool) -> None:
    """Write the page-aligned ``region`` at ``file_offset`` in parallel pieces (tail padded under O_DIRECT)."""
    n = region.numel()
    size = -(-n // BLOCK) * BLOCK if direct else n  # rounding stays inside the pool's pages
    base = region.data_ptr()
    futures = [
        _writer.submit(pwrite_all, fd, address_view(base + start, min(CHUNK, size - start)), file_offset + start)
        for start in range(0, size, CHUNK)
    ]
    for fut in futures:
        fut.result()


def _write_shard(directory: Path, shard: _Shard, tensors: dict[str, torch.Tensor], staged: torch.Tensor,
                 codec: str, direct: bool, rank: int, world: int, entries: dict[str, TensorEntry]) -> ShardEntry:
    region = staged[shard.pool_offset : shard.pool_offset + shard.nbytes]
    compressed = codec != "none"
    path = directory / (shard.name + (".tierd" if compressed else ".safetensors"))
    # Encoded chunks are neither aligned nor block-sized: compressed shards are
    # written buffered (and fdatasync'ed all the same).
    fd, direct = _open_for_write(path, direct and not compressed)
    try:
        if compressed:
            data_start, end = 0, _write_compressed(fd, shard, tensors, region, codec, rank, world, entries, path.name)
        else:
            header = _header(shard, tensors, {"format": "pt"})
            head = aligned_buffer(len(header))  # the header is a whole number of blocks
            head[: len(header)] = header
            pwrite_all(fd, memoryview(head)[: len(header)], 0)
            data_start = len(header)
            _write_region(fd, region, data_start, direct)
            end = data_start + shard.nbytes
            pos = 0
            for name in shard.names:
                t = tensors[name]
                n = t.numel() * t.element_size()
                entries[entry_key(name, rank, world)] = TensorEntry(
                    shard=path.name, offset=pos, nbytes=n, stored=n, dtype=str(t.dtype).removeprefix("torch."),
                    shape=list(t.shape), checksum=checksums.xxh3_hex(address_view(region.data_ptr() + pos, n)),
                    rank=rank,
                )
                pos += n
        os.ftruncate(fd, end)  # O_DIRECT wrote whole blocks: cut the padding
        os.fdatasync(fd)  # Note [checkpoint durability]
    except OSError as exc:
        raise MediaError(f"writing checkpoint shard {path} failed: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    return ShardEntry(bytes=end, data_start=data_start, rank=rank)


def _write_compressed(fd: int, shard: _Shard, tensors: dict[str, torch.Tensor], region: torch.Tensor, codec: str,
                      rank: int, world: int, entries: dict[str, TensorEntry], shard_name: str) -> int:
    enc = get_codec(codec)
    pos = 0
    file_pos = 0
    for name in shard.names:
        t = tensors[name]
        n = t.numel() * t.element_size()
        raw = address_view(region.data_ptr() + pos, n)
        itemsize = t.element_size()
        pieces = list(_writer.map(lambda s, raw=raw, k=itemsize: enc.encode(raw[s : s + CHUNK], k),
                                  range(0, n, CHUNK)))
        chunks: list[Chunk] = []
        for mode, payload in pieces:
            pwrite_all(fd, memoryview(payload), file_pos)
            chunks.append(Chunk(0, file_pos, len(payload), min(CHUNK, n - len(chunks) * CHUNK), int(mode)))
            file_pos += len(payload)
        entries[entry_key(name, rank, world)] = TensorEntry(
            shard=shard_name, offset=chunks[0].offset if chunks else file_pos, nbytes=n,
            stored=sum(c.stored for c in chunks), dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape),
            checksum=checksums.xxh3_hex(raw), rank=rank, chunks=[[c.offset, c.stored, c.raw, c.mode] for c in chunks],
        )
        pos += n
    return file_pos


def _dist() -> tuple[int, int, Any]:
    """(rank, world size, the dedicated gloo group) when torch.distributed is initialised."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0, 1, None
    global _gloo_group
    if _gloo_group is None:
        # A group of its own: the barrier never queues behind training collectives.
        _gloo_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=_BARRIER_TIMEOUT_S))
    return dist.get_rank(), dist.get_world_size(), _gloo_group


_gloo_group: Any = None
_BARRIER_TIMEOUT_S = float(os.environ.get("TIERD_CHECKPOINT_BARRIER_S", "600"))


def _barrier(group: Any, what: str) -> None:
    try:
        torch.distributed.monitored_barrier(group=group, timeout=timedelta(seconds=_BARRIER_TIMEOUT_S))
    except RuntimeError as exc:
        raise TierdError(f"checkpoint barrier ({what}) failed or timed out after {_BARRIER_TIMEOUT_S:.0f} s: {exc}") from exc


def async_save(
    state_dict: Mapping[str, Any], path: str | os.PathLike[str], *, store: Any = None, keep_last: int | None = None,
    codec: str | None = None, step: int | None = None, metadata: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES, optimizer: Any = None,
) -> PendingSave:
    """Start saving ``state_dict`` to the directory ``path``; see :class:`PendingSave`.

    Args:
        optimizer: the optimizer that updates the parameters in ``state_dict``:
            the save then returns at once and copies the parameters and optimizer
            states while forward and backward run; ``optimizer.step()`` waits if the
            copy is not done (Note [staging while training runs]). Without it the
            call returns once every tensor is copied.
        store: stage in this store's host arena (``tierd.open()`` or
            ``tierd.connect()``; the memory clients pin for GPUs) instead of the
            private staging pool; the pool is used when the arena has no room.
        keep_last: after this one is durable, delete all but the newest N
            complete checkpoints in ``path``'s parent directory.
        codec: ``None``/``"none"`` (safetensors shards), ``"zstd"`` or ``"bytegroup"``.
        step, metadata: recorded in the manifest (``metadata`` must be JSON-able).

    Raises:
        InvalidArgument: a value that cannot be checkpointed, or ``path`` exists already.
    """
    global _inflight
    codec_name = get_codec(codec).name
    directory = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    tree = flatten(dict(state_dict), "", tensors)
    rank, world, group = _dist()
    if keep_last is not None and keep_last < 1:
        raise InvalidArgument(f"keep_last must be >= 1, got {keep_last}")
    guard = _guard(optimizer) if optimizer is not None else None
    # At most one save in flight: wait for the previous one before using the pool again.
    with _inflight_lock:
        previous = _inflight
    if previous is not None:
        previous.durable.exception()  # waits; its own caller sees its error
    if rank == 0 and (directory / MANIFEST).exists():
        raise InvalidArgument(f"{directory} holds a checkpoint already; choose a new directory per save")
    directory.mkdir(parents=True, exist_ok=True)
    pending = PendingSave(directory)
    with _inflight_lock:
        _inflight = pending
    release: list[Any] = []
    try:
        shards = _plan(tensors, shard_bytes, rank, world)
        total = (shards[-1].pool_offset + shards[-1].nbytes) if shards else 0
        staged = _stage_in_store(store, total, release) if store is not None else None
        if staged is None:
            staged = _pool.reserve(total)
        deferred: set[str] = set()
        if guard is not None:  # Note [staging while training runs]
            owned = _owned_storages(optimizer)
            deferred = {name for name, t in tensors.items() if t.numel() and _storage_key(t) in owned}
        _copy_in(staged, shards, tensors, only=None, skip=deferred)  # the snapshot of the rest, now
        manifest = Manifest(step=step, created=time.time(), world_size=world, codec=codec_name,
                            metadata=msgspec.to_builtins(dict(metadata or {})))
        manifest.trees = {str(rank): tree}
        direct = probe_direct(directory) is None
        side = _side_stream(tensors, deferred)
    except BaseException as exc:
        _release(release)
        pending.staged.set_exception(exc)
        pending.durable.set_exception(exc)
        raise
    if not deferred:
        pending.staged.set_result(None)
    elif guard is not None:
        guard.pending = pending
    _committer.submit(_stage_then_finish, pending, deferred, side, shards, tensors, staged, manifest, codec_name,
                      direct, rank, world, group, keep_last, release)
    return pending


def _side_stream(tensors: dict[str, torch.Tensor], names: set[str]) -> Any:
    """A CUDA stream ordered after the work queued so far, for copying ``names``' CUDA tensors; or None."""
    devices = {tensors[n].device for n in names if tensors[n].device.type == "cuda"}
    if not devices:
        return None
    if len(devices) > 1:
        raise InvalidArgument(f"async_save(optimizer=...) stages from one GPU per process, got {sorted(map(str, devices))}")
    device = devices.pop()
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))  # the last step's updates land first
    return side


def _stage_then_finish(pending: PendingSave, deferred: set[str], side: Any, shards: list[_Shard],
                       tensors: dict[str, torch.Tensor], staged: torch.Tensor, *rest: Any) -> None:
    if deferred:
        try:
            if side is not None:
                with torch.cuda.stream(side):
                    _copy_in(staged, shards, tensors, only=deferred, skip=None)
                side.synchronize()
            else:
                _copy_in(staged, shards, tensors, only=deferred, skip=None)
        except BaseException as exc:  # noqa: BLE001 - delivered through the futures
            _release(rest[-1])
            pending.staged.set_exception(exc)
            pending.durable.set_exception(exc)
            return
        pending.staged.set_result(None)
    _finish(pending, shards, tensors, staged, *rest)


def _stage_in_store(store: Any, nbytes: int, release: list[Any]) -> torch.Tensor | None:
    """A page-aligned staging region in ``store``'s host arena (:meth:`Store.stage`), or None.

    The region is given back by ``_release`` once the shards are durable.
    """
    if not isinstance(store, Store):
        raise InvalidArgument(f"store must come from tierd.open() or tierd.connect(), got {type(store).__name__}")
    staging = store.stage(nbytes)
    if staging is None:
        return None
    release.append(staging.release)
    return staging.buffer


def _release(release: list[Any]) -> None:
    for fn in release:
        try:
            fn()
        except TierdError as exc:
            log.warning("could not give back checkpoint staging space: %s", exc)
    release.clear()


def _finish(pending: PendingSave, shards: list[_Shard], tensors: dict[str, torch.Tensor], staged: torch.Tensor,
            manifest: Manifest, codec: str, direct: bool, rank: int, world: int, group: Any,
            keep_last: int | None, release: list[Any]) -> None:
    directory = pending.path
    try:
        for shard in shards:
            manifest.shards[shard.name + (".tierd" if codec != "none" else ".safetensors")] = _write_shard(
                directory, shard, tensors, staged, codec, direct, rank, world, manifest.tensors)
        fsync_dir(directory)
        if world > 1:
            # Each rank's part is durable before rank 0 may commit the whole.
            atomic_write(directory / f"rank{rank:05d}.part.json", msgspec.json.encode(manifest))
            _barrier(group, "parts written")
            if rank == 0:
                for r in range(1, world):
                    part = msgspec.json.decode((directory / f"rank{r:05d}.part.json").read_bytes(), type=Manifest)
                    manifest.tensors.update(part.tensors)
                    manifest.shards.update(part.shards)
                    manifest.trees.update(part.trees)
        if rank == 0:
            atomic_write(directory / MANIFEST, msgspec.json.encode(manifest))  # the commit point
        if world > 1:
            _barrier(group, "manifest committed")
        if keep_last is not None and rank == 0:
            retain(directory.parent, keep_last)
    except BaseException as exc:  # noqa: BLE001 - delivered through the future
        _release(release)
        pending.durable.set_exception(exc)
        return
    _release(release)
    pending.durable.set_result(directory)


def prepare(state_dict: Mapping[str, Any] | int) -> Future[None]:
    """Size the staging pool for ``state_dict`` (or a byte count) and fault it in, in the background.

    Call it once at start (after building the model and optimizer, before the
    first step): the first :func:`async_save` then blocks no longer than later
    ones, instead of paging in a pool as large as the state. The pool stays this
    size (one per process, reused by every save); the returned future is done once
    every page is in.
    """
    if isinstance(state_dict, int):
        nbytes = state_dict
    else:
        tensors: dict[str, torch.Tensor] = {}
        flatten(dict(state_dict), "", tensors)
        rank, world, _ = _dist()
        shards = _plan(tensors, DEFAULT_SHARD_BYTES, rank, world)
        nbytes = (shards[-1].pool_offset + shards[-1].nbytes) if shards else 0
    with _inflight_lock:
        previous = _inflight
    if previous is not None:
        previous.durable.exception()  # its shards are written from the pool: never remap under them
    return _pool.prefault(nbytes)


def save(state_dict: Mapping[str, Any], path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """Save ``state_dict`` and return once it is durable (the blocking :func:`async_save`)."""
    return async_save(state_dict, path, **kwargs).durable.result()


def load(path: str | os.PathLike[str], *, map_location: Any = None, into: Mapping[str, Any] | None = None) -> Any:
    """Load a checkpoint saved by :func:`save` / :func:`async_save`, or through DCP with :class:`StorageWriter`
    (then whole tensors, assembled from every rank's chunks, in the state dict DCP was given).

    Args:
        map_location: device for fresh tensors (``"cpu"`` by default).
        into: a state dict whose tensors are filled in place (``into=model.state_dict()``).
            Only its tensors are read, so shards holding none of them are never
            opened; other tensors of the checkpoint come back as None.

    Returns:
        The saved state dict; with ``into``, its tensors are ``into``'s own objects.

    Raises:
        NotFound: no complete checkpoint at ``path``.
        CorruptObject: a shard is missing, truncated, or fails a checksum (names tensor and shard).
    """
    directory = Path(path)
    manifest = read_manifest(directory)
    if manifest.metadata.get("dcp"):
        if into is not None:
            raise InvalidArgument(f"{directory} was written through DCP: load it in place with "
                                  "dcp.load(state_dict, storage_reader=tierd.checkpoint.StorageReader(path))")
        from tierd.clients.checkpoint_dcp import load_dcp

        state = load_dcp(directory, manifest)
        if map_location is not None:
            state = torch.utils._pytree.tree_map_only(torch.Tensor, lambda t: t.to(map_location), state)
        return state
    rank, world, _ = _dist()
    if world != manifest.world_size and manifest.world_size > 1:
        raise InvalidArgument(f"{directory} was saved by {manifest.world_size} ranks; load it with as many")
    tree = manifest.trees.get(str(rank), manifest.tree)
    wanted: dict[str, torch.Tensor] = {}
    if into is not None:
        flatten(dict(into), "", wanted)
    device = torch.device(map_location) if map_location is not None else torch.device("cpu")
    tensors: dict[str, torch.Tensor] = {}
    reads: list[Future[None]] = []  # tensors are read (and checked) in parallel
    for key, entry in manifest.tensors.items():
        if entry.rank != rank:
            continue
        name = key.partition(":")[2] if manifest.world_size > 1 else key
        target = wanted.get(name)
        dtype = dtype_from_name(entry.dtype)
        shape = tuple(entry.shape)
        if target is not None:
            if target.dtype != dtype or tuple(target.shape) != shape:
                raise InvalidArgument(f"into[{name!r}] is {target.dtype} {tuple(target.shape)}, the checkpoint "
                                      f"holds {dtype} {shape}")
            if target.device.type == "cpu" and target.is_contiguous():
                reads.append(_writer.submit(read_tensor, directory, entry, manifest.shards[entry.shard], name, target))
            else:
                reads.append(_writer.submit(read_then_copy, directory, entry, manifest.shards[entry.shard], name,
                                            target))
            tensors[name] = target
        elif into is None:
            fresh = torch.empty(shape, dtype=dtype)
            reads.append(_writer.submit(read_tensor, directory, entry, manifest.shards[entry.shard], name, fresh))
            tensors[name] = fresh
    for fut in reads:
        fut.result()
    if into is None and device.type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return unflatten(tree, MissingAsNone(tensors))

