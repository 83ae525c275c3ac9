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
from tierd.clients.batch import BatchLease, Results, per_key
from tierd.clients.transfer import Outgoing, read_value
from tierd.clients.values import Value
from tierd.engine.keys import validate_key
from tierd.errors import DaemonUnavailable, NotFound, ProtocolError, TierdError, error_class

if TYPE_CHECKING:
    from tierd.clients.remote import RemoteStore, _Link

__all__ = ["RemoteBatches", "ReplySource"]


class _Unsent(Exception):
    """An operation's first request could not leave: its link was already dead, so no daemon saw
    any of the operation and it may start over on a new link (Note [reconnect] in remote.py). Never escapes
    :class:`RemoteStore`."""

    def __init__(self, error: TierdError) -> None:
        super().__init__(str(error))
        self.error = error


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
    """Mixed into :class:`~tierd.clients.remote.RemoteStore`.

    A batch runs on one connection from its first frame to its last: if the
    connection breaks halfway, the rest fails with ``DaemonUnavailable``
    rather than reaching a restarted daemon (Note [reconnect] in remote.py).
    """

    def put_many(self: RemoteStore, items: Mapping[str, Value] | Iterable[tuple[str, Value]], *,
                 tier: str | None = None, durable: bool | None = None, codec: str | None = None, pin: bool = False,
                 ttl: float | None = None) -> Results:
        pairs = pairs_of(items)
        opts = {"tier": tier, "durable": durable, "codec": codec, "pin": pin, "ttl": ttl}
        return self._retry(lambda link: self._put_many_on(link, pairs, opts))

    def _put_many_on(self: RemoteStore, link: _Link, pairs: list[tuple[str, Value]], opts: dict[str, Any]) -> Results:
        errors: dict[str, TierdError] = {}
        frame: list[p.PutItem] = []
        size = 0
        sent = False  # whether a request of the batch left: before, it may start over on a new link
        stored = False  # whether any item is stored: after that a lost connection fails item by item

        def lost(keys: Iterable[str], exc: DaemonUnavailable | _Unsent) -> None:
            if isinstance(exc, _Unsent):
                if not sent:
                    raise exc
                exc = exc.error  # type: ignore[assignment]
            if not stored:
                raise exc  # nothing of the batch is stored: the call fails as a single put would
            for key in keys:
                errors[key] = exc  # type: ignore[assignment]

        def flush() -> None:
            nonlocal frame, size, stored, sent
            if frame:
                try:
                    results = link.call_first(p.PutMany, items=frame, **opts)[0].value
                except (DaemonUnavailable, _Unsent) as exc:
                    lost([item.key for item in frame], exc)
                else:
                    sent = True
                    for item, why in zip(frame, results, strict=True):
                        if why is not None:
                            errors[item.key] = _error(why)
                        else:
                            stored = True
            frame, size = [], 0

        for key, value in pairs:
            try:
                validate_key(key)
                if isinstance(value, bytes):
                    data, meta = value, p.ObjectMeta("bytes", "uint8", (len(value),), 1)
                    large = len(data) > link.inline_max
                else:
                    value_out = Outgoing(value)
                    large = value_out.nbytes > link.inline_max
                    if not large:
                        data, meta = value_out.flat().numpy().tobytes(), value_out.meta
            except TierdError as exc:
                errors[key] = exc
                continue
            if large:  # through the arena (or streamed), on its own
                try:
                    self._put_on(link, key, value, **opts)
                except (DaemonUnavailable, _Unsent) as exc:
                    lost([key], exc)
                except TierdError as exc:
                    sent = True
                    errors[key] = exc
                else:
                    sent = stored = True
                continue
            if size + len(data) > link.chunk_bytes:
                flush()
            frame.append(p.PutItem(key, meta, data))
            size += len(data)
        flush()
        return Results([key not in errors for key, _ in pairs], errors)

    @per_key(None)
    def get_many(self: RemoteStore, keys: Sequence[str], *, outs: Sequence[torch.Tensor | None] | None = None,
                 device: str | torch.device | None = None) -> Results:
        keys = list(keys)
        check_outs(keys, outs)
        wire = [validate_key(k) for k in keys]
        return self._retry(lambda link: self._get_many(link, keys, wire, outs, device, lease_id=0))

    def _get_many(self: RemoteStore, link: _Link, keys: list[str], wire_keys: list[str],
                  outs: Sequence[torch.Tensor | None] | None, device: Any, *, lease_id: int) -> Results:
        # With outs= the caller wants its buffers filled from the arena (one copy), not via frames.
        # A batch lease's read stays on the lease's link: never a first request that may move.
        arena, mapping = link.arena, link.map
        call = link.call if lease_id else link.call_first
        reply, _ = call(p.GetMany, keys=wire_keys, lease_id=lease_id, inline_ok=outs is None)
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
                        values.append(self._get_on(link, key, device=device, out=out))
                        continue
                    if item.offset is not None:
                        link.check_arena(arena)
                    values.append(read_value(ReplySource(item, [], arena, mapping), key, link.copies, device=device,
                                             out=out))
                except NotFound:
                    values.append(None)
                except TierdError as exc:
                    errors[key] = exc
                    values.append(None)
        finally:
            if reply.lease_id:
                link.release(reply.lease_id)
        return Results(values, errors)

    @per_key(False)
    def exists_many(self: RemoteStore, keys: Sequence[str], *, lease: bool = False) -> Results:
        keys = list(keys)
        wire = [validate_key(k) for k in keys]
        if not lease:
            return Results(self._call(p.ExistsMany, keys=wire)[0].value)
        link, value = self._retry(lambda link: (link, link.call_first(p.ExistsMany, keys=wire, lease=True)[0].value))
        found, lease_id = list(value["found"]), int(value["lease_id"])

        def read(outs: Sequence[torch.Tensor | None] | None, device: Any) -> Results:
            if not lease_id:
                return Results([None] * len(keys))
            return self._get_many(link, keys, wire, outs, device, lease_id=lease_id)  # DaemonUnavailable once gone

        results = Results(found)
        results.lease = BatchLease(keys, found, read=read, release=lambda: link.release(lease_id) if lease_id else None)
        return results

    @per_key(int)
    def prefix_length(self: RemoteStore, keys: Sequence[str]) -> int:
        return int(self._call(p.PrefixLength, keys=[validate_key(k) for k in keys])[0].value)

    @per_key(False)
    def delete_many(self: RemoteStore, keys: Sequence[str]) -> list[bool]:
        return list(self._call(p.DeleteMany, keys=[validate_key(k) for k in keys])[0].value)
