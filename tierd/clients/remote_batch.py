"""``tierd.connect()``'s batched calls: one frame each way per batch (see :mod:`tierd.daemon.batches`).

Items travel inline, split into frames of at most half the daemon's frame
limit; a put item larger than ``inline_max_bytes`` and a get item the daemon
could not fit in its reply fall back to single calls, so a batch never fails
for size.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from tierd import protocol as p
from tierd._buffers import SMALL_COPY_BYTES, address_view, copy_bytes
from tierd.clients.base import check_outs, pairs_of
from tierd.clients.batch import BatchLease, Results
from tierd.clients.transfer import Outgoing, read_value
from tierd.clients.values import Value
from tierd.engine.keys import validate_key
from tierd.errors import NotFound, ProtocolError, TierdError, error_class

if TYPE_CHECKING:
    from tierd.clients.remote import RemoteStore

__all__ = ["RemoteBatches", "ReplySource"]


def _error(text: str) -> TierdError:
    """The error a batch reply names for one item ("Kind: message")."""
    kind, _, message = text.partition(": ")
    return error_class(kind)(message)


class ReplySource:
    """A get's :class:`~tierd.clients.transfer.Source` over the daemon's reply: the arena
    (``ready.offset``, leased until Release) or the bytes in the frames."""

    __slots__ = ("_ready", "_chunks", "_arena", "_map")

    def __init__(self, ready: p.GetReady | p.ItemReady, chunks: list[bytes], arena: torch.Tensor | None,
                 mapping: mmap.mmap | None = None) -> None:
        self._ready = ready
        self._chunks = chunks
        self._arena = arena
        self._map = mapping  # the same memory as ``arena``: small copies without a tensor view

    @property
    def meta(self) -> p.ObjectMeta:
        meta = self._ready.meta
        assert meta is not None
        return meta

    def arena_view(self) -> torch.Tensor | None:
        offset = self._ready.offset
        if offset is None or self._arena is None:
            return None
        return self._arena[offset : offset + self.meta.nbytes]

    device_view = arena_view

    def read_into(self, dest: torch.Tensor) -> None:
        ready = self._ready
        n = self.meta.nbytes
        if ready.offset is not None and self._map is not None and n < SMALL_COPY_BYTES and dest.device.type == "cpu":
            with memoryview(self._map) as arena:  # a few KiB: a memoryview copy, no tensor
                address_view(dest.data_ptr(), n)[:] = arena[ready.offset : ready.offset + n]
            return
        view = self.arena_view()
        if view is not None:
            copy_bytes(dest, view)
            return
        if ready.data is not None:
            if ready.data:
                dest.copy_(torch.frombuffer(bytearray(ready.data), dtype=torch.uint8))
            return
        pos = 0
        for data in self._chunks:
            dest[pos : pos + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            pos += len(data)

    def read_device(self, target: torch.Tensor) -> bool:
        return False

    def inline_bytes(self) -> bytes | None:
        ready = self._ready
        if ready.data is None and ready.offset is not None and self._map is not None:
            return self._map[ready.offset : ready.offset + self.meta.nbytes]  # one copy out of the arena
        return ready.data


class RemoteBatches:
    """Mixed into :class:`~tierd.clients.remote.RemoteStore`."""

    def put_many(self: RemoteStore, items: Mapping[str, Value] | Iterable[tuple[str, Value]], *,
                 tier: str | None = None, durable: bool | None = None, codec: str | None = None, pin: bool = False,
                 ttl: float | None = None) -> Results:
        pairs = pairs_of(items)
        opts = {"tier": tier, "durable": durable, "codec": codec, "pin": pin, "ttl": ttl}
        errors: dict[str, TierdError] = {}
        frame: list[p.PutItem] = []
        size = 0

        def flush() -> None:
            nonlocal frame, size
            if frame:
                results = self._call(p.PutMany, items=frame, **opts)[0].value
                for item, why in zip(frame, results, strict=True):
                    if why is not None:
                        errors[item.key] = _error(why)
            frame, size = [], 0

        for key, value in pairs:
            try:
                validate_key(key)
                if isinstance(value, bytes):
                    data, meta = value, p.ObjectMeta("bytes", "uint8", (len(value),), 1)
                else:
                    value_out = Outgoing(value)
                    if value_out.nbytes > self._inline_max:
                        self.put(key, value, **opts)  # large: through the arena, on its own
                        continue
                    data, meta = value_out.flat().numpy().tobytes(), value_out.meta
                if len(data) > self._inline_max:
                    self.put(key, value, **opts)
                    continue
            except TierdError as exc:
                errors[key] = exc
                continue
            if size + len(data) > self._chunk_bytes:
                flush()
            frame.append(p.PutItem(key, meta, data))
            size += len(data)
        flush()
        return Results([key not in errors for key, _ in pairs], errors)

    def get_many(self: RemoteStore, keys: Sequence[str], *, outs: Sequence[torch.Tensor | None] | None = None,
                 device: str | torch.device | None = None) -> Results:
        keys = list(keys)
        check_outs(keys, outs)
        return self._get_many(keys, [validate_key(k) for k in keys], outs, device, lease_id=0)

    def _get_many(self: RemoteStore, keys: list[str], wire_keys: list[str],
                  outs: Sequence[torch.Tensor | None] | None, device: Any, *, lease_id: int) -> Results:
        # With outs= the caller wants its buffers filled from the arena (one copy), not via frames.
        reply, _ = self._call(p.GetMany, keys=wire_keys, lease_id=lease_id, inline_ok=outs is None)
        values: list[Any] = []
        errors: dict[str, TierdError] = {}
        try:
            if len(reply.items) != len(keys):
                raise ProtocolError(f"GetMany of {len(keys)} keys answered {len(reply.items)} items")
            for i, (key, item) in enumerate(zip(keys, reply.items, strict=True)):
                out = outs[i] if outs is not None else None
                if item.meta is None:
                    if item.error is not None:
                        errors[key] = _error(item.error)
                    values.append(None)
                    continue
                try:
                    if item.data is None and item.offset is None:  # too large for the batch's frame
                        values.append(self.get(key, device=device, out=out))
                        continue
                    if item.offset is not None and self._arena is None:
                        raise ProtocolError("the daemon named an arena offset to a client it gave no arena")
                    values.append(read_value(ReplySource(item, [], self._arena, self._map), key, self._copies, device=device,
                                             out=out))
                except NotFound:
                    values.append(None)
                except TierdError as exc:
                    errors[key] = exc
                    values.append(None)
        finally:
            if reply.lease_id:
                self._send(p.Release(id=0, lease_id=reply.lease_id))
        return Results(values, errors)

    def exists_many(self: RemoteStore, keys: Sequence[str], *, lease: bool = False) -> Results:
        keys = list(keys)
        wire = [validate_key(k) for k in keys]
        if not lease:
            return Results(self._call(p.ExistsMany, keys=wire)[0].value)
        value = self._call(p.ExistsMany, keys=wire, lease=True)[0].value
        found, lease_id = list(value["found"]), int(value["lease_id"])

        def read(outs: Sequence[torch.Tensor | None] | None, device: Any) -> Results:
            if not lease_id:
                return Results([None] * len(keys))
            return self._get_many(keys, wire, outs, device, lease_id=lease_id)

        def release() -> None:
            if lease_id and not self._closed:  # a closed connection's leases are the daemon's to end
                self._send(p.Release(id=0, lease_id=lease_id))

        results = Results(found)
        results.lease = BatchLease(keys, found, read=read, release=release)
        return results

    def prefix_length(self: RemoteStore, keys: Sequence[str]) -> int:
        return int(self._call(p.PrefixLength, keys=[validate_key(k) for k in keys])[0].value)

    def delete_many(self: RemoteStore, keys: Sequence[str]) -> list[bool]:
        return list(self._call(p.DeleteMany, keys=[validate_key(k) for k in keys])[0].value)
