"""``tierd.open()``: the engine inside the calling process."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from tierd.clients.base import Staging, Store, check_outs, pairs_of, prefetch_keys, staging_key
from tierd.clients.batch import BatchLease, Results, per_key
from tierd.clients.transfer import Outgoing, read_value
from tierd.clients.values import Value, dtype_from_name
from tierd.config import Config, load_config
from tierd.engine.core import Engine
from tierd.engine.handles import Lease
from tierd.engine.index import ObjectMeta
from tierd.engine.keys import validate_chain, validate_key
from tierd.engine.small import ABSENT
from tierd.errors import TierdError
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
        value_out = Outgoing(value)
        key = validate_key(key)
        if value_out.direct is None:
            self._engine.put(key, value_out.flat(), value_out.meta, **opts)
            return
        # A CUDA tensor or a slice of a larger one: copied straight into the reserved
        # arena bytes (one DMA, or one strided copy), not encoded into a temporary first.
        with self._engine.reserve(key, value_out.nbytes, value_out.meta, **opts) as res:
            view = res.view
            # An nvme-bound CUDA tensor skips the arena when GPUDirect Storage can take it.
            if view is not None and not (value_out.on_cuda and res.top == "nvme" and res.device_direct):
                value_out.write_into(self._copies, view)
                res.commit()
            else:
                res.unstage()  # nvme-bound (GDS), or no room in the arena
                res.commit(value_out.source())

    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        with self._engine.lease(validate_key(key)) as lease:
            return read_value(_LeaseSource(lease, self._engine.nvme.gds), key, self._copies, device=device, out=out)

    # -- batches: one engine pass each ------------------------------------------

    def put_many(self, items: Mapping[str, Value] | Iterable[tuple[str, Value]], *, tier: str | None = None,
                 durable: bool | None = None, codec: str | None = None, pin: bool = False,
                 ttl: float | None = None) -> Results:
        pairs = pairs_of(items)
        batch, where = [], []
        errors: dict[str, TierdError] = {}
        for key, value in pairs:
            try:
                validate_key(key)
                if isinstance(value, bytes):  # no tensor for bytes: the engine takes a memoryview
                    src: Any = memoryview(value)
                    meta = ObjectMeta("bytes", "uint8", (len(value),), 1)
                else:
                    value_out = Outgoing(value)
                    src, meta = value_out.source(), value_out.meta
            except TierdError as exc:
                errors[key] = exc
                continue
            batch.append((key, src, meta))
            where.append(key)
        if not (durable or pin or ttl is not None):  # small volatile items: one engine pass
            small = [i for i, (_, src, _) in enumerate(batch) if src.nbytes <= SMALL_PUT_BYTES
                     and (isinstance(src, memoryview) or src.device.type == "cpu")]
            if small:
                done = self._engine.write_small_many(
                    [(k, v if isinstance(v, memoryview) else v.numpy(), m) for k, v, m in (batch[i] for i in small)],
                    tier=tier, codec=codec)
                stored = {i for i, ok in zip(small, done, strict=True) if ok}
                batch = [b for i, b in enumerate(batch) if i not in stored]
                where = [k for i, k in enumerate(where) if i not in stored]
        if batch:
            results = self._engine.put_many(batch, tier=tier, durable=durable, codec=codec, pin=pin, ttl=ttl)
            for key, err in zip(where, results, strict=True):
                if err is not None:
                    errors[key] = err
        return Results([key not in errors for key, _ in pairs], errors)

    @per_key(None)
    def get_many(self, keys: Sequence[str], *, outs: Sequence[torch.Tensor | None] | None = None,
                 device: str | torch.device | None = None) -> Results:
        keys = list(keys)
        check_outs(keys, outs)
        scoped = [validate_key(k) for k in keys]
        values: list[Any] = [None] * len(keys)
        rest = list(range(len(keys)))
        if outs is None and (device is None or torch.device(device).type == "cpu"):
            # Small objects on host: copied out in one engine pass, no lease (outs= and devices
            # take the leased path: one copy straight from the arena into their memory).
            rest = []
            for i, got in enumerate(self._engine.read_small_many(scoped, SMALL_GET_BYTES, mutable=True)):
                if isinstance(got, tuple):
                    values[i] = _from_bytes(*got)
                elif got is not ABSENT:
                    rest.append(i)
        if not rest:
            return Results(values)
        leases = self._engine.acquire_many([scoped[i] for i in rest])
        try:
            sub = self._read_leased([keys[i] for i in rest], leases,
                                    [outs[i] for i in rest] if outs is not None else None, device)
        finally:
            for lease in leases:
                if lease is not None:
                    lease.release()
        for i, value in zip(rest, sub, strict=True):
            values[i] = value
        return Results(values, sub.errors)

    def _read_leased(self, keys: Sequence[str], leases: Sequence[Lease | None],
                     outs: Sequence[torch.Tensor | None] | None, device: Any) -> Results:
        values: list[Any] = []
        errors: dict[str, TierdError] = {}
        gds = self._engine.nvme.gds
        to_cuda = (device is not None and torch.device(device).type == "cuda") or any(
            o is not None and o.device.type == "cuda" for o in outs or ())
        if not (gds and to_cuda):
            # Promote what is below host side by side first (the reads below then copy from host);
            # an error here comes back when that key is read.
            self._engine.host_locations(leases, evict=False)
        for i, (key, lease) in enumerate(zip(keys, leases, strict=True)):
            if lease is None:
                values.append(None)
                continue
            try:
                values.append(read_value(_LeaseSource(lease, gds), key, self._copies, device=device,
                                         out=outs[i] if outs is not None else None))
            except TierdError as exc:  # a corrupt block is this key's miss, never bad data
                errors[key] = exc
                values.append(None)
        return Results(values, errors)

    @per_key(False)
    def exists_many(self, keys: Sequence[str], *, lease: bool = False) -> Results:
        keys = list(keys)
        scoped = [validate_key(k) for k in keys]
        if not lease:
            return Results(self._engine.exists_many(scoped))
        leases = self._engine.acquire_many(scoped)
        found = [held is not None for held in leases]

        def release() -> None:
            for held in leases:
                if held is not None:
                    held.release()

        results = Results(found)
        results.lease = BatchLease(keys, found, read=lambda outs, device: self._read_leased(keys, leases, outs, device),
                                   release=release)
        return results

    @per_key(int)
    def prefix_length(self, keys: Sequence[str]) -> int:
        return self._engine.prefix_length([validate_key(k) for k in keys])

    @per_key(False)
    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        return self._engine.delete_many([validate_key(k) for k in keys])

    def stage(self, nbytes: int) -> Staging | None:
        if nbytes <= 0:
            return None
        res = self._engine.reserve(staging_key(), nbytes, ObjectMeta("bytes", "uint8", (nbytes,), 1), stage=True)
        view = res.view
        if view is None:
            res.abort()
            return None
        return Staging(view, res.abort)

    def prefetch(self, keys: Iterable[str] | str, *, tier: str = "host") -> None:
        self._engine.prefetch(prefetch_keys(keys), tier)

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self._engine.declare_schedule([validate_key(k) for k in keys], cyclic=cyclic)

    def declare_prefix(self, keys: Sequence[str], *, done: bool = False) -> None:
        self._engine.declare_prefix(validate_chain(keys), done=done)

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

    def healthy(self) -> bool:
        return self._engine.healthy()

    def close(self) -> None:
        super().close()
        self._copies.close()  # unregister the arena before the engine unmaps it
        self._engine.close()


def open_store(config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None) -> EmbeddedStore:
    """Open the embedded store (see ``tierd.open``)."""
    return EmbeddedStore(Engine(load_config(config), in_process=True))


class _LeaseSource:
    """A get's :class:`~tierd.clients.transfer.Source` over an engine lease."""

    __slots__ = ("_lease", "_gds")

    def __init__(self, lease: Lease, gds: bool) -> None:
        self._lease = lease
        self._gds = gds and lease.on("nvme")  # nvme can read straight into device memory

    @property
    def meta(self) -> ObjectMeta:
        return self._lease.meta

    def arena_view(self) -> torch.Tensor | None:
        return self._lease.host_view() if self._lease.on("host") else None

    def read_into(self, dest: torch.Tensor) -> None:
        self._lease.read_into(dest)

    def device_view(self) -> torch.Tensor | None:
        # With GPUDirect Storage, an nvme copy goes to the device directly: no promotion for it.
        return self._lease.host_view(promote=not self._gds)

    def read_device(self, target: torch.Tensor) -> bool:
        if not (self._gds and target.is_contiguous()):
            return False
        self._lease.read_into(target.reshape(-1).view(torch.uint8), promote=False)
        return True

    def inline_bytes(self) -> bytes | None:
        return None


# Batched objects up to these sizes take the engine's one-pass small paths. A small get copies under the
# catalog's lock, so it stays at the daemon's inline size; a small put copies before taking it.
SMALL_GET_BYTES = 64 << 10
SMALL_PUT_BYTES = 256 << 10


def _from_bytes(meta: ObjectMeta, data: bytes | bytearray) -> Any:
    """The value ``get`` returns for an object read as ``data`` (a tensor owns a bytearray: no copy)."""
    if meta.kind == "bytes":
        return data
    if not data:
        return torch.empty(meta.shape, dtype=dtype_from_name(meta.dtype))
    return torch.frombuffer(data, dtype=torch.uint8).view(dtype_from_name(meta.dtype)).view(meta.shape)
