"""The wire protocol between ``tierd.connect()`` and ``tierd serve``.

A frame is a 4-byte big-endian length followed by that many bytes of
msgpack: one tagged msgspec Struct. Clients send :data:`Request` frames, the
daemon answers with :data:`Reply` frames carrying the request's ``id``; many
requests may be in flight on one connection and replies may come in any
order.

Session:
    client -> Hello(version)          daemon -> Welcome (+ the host arena's
                                      memfd, as SCM_RIGHTS ancillary data, for
                                      a trusted uid only: ``arena`` says which)
Put, large object:
    Put(no data) -> PutReady(put_id, offset): the client copies the bytes
    into its mapping of the arena at ``offset`` (or, if ``offset`` is None,
    sends PutChunk frames, in order, covering every byte), then
    PutCommit(put_id) -> Ok. A client without the arena always gets None.
Put, small object: Put(data=...) -> Ok.
Get: Get -> GetReady with the bytes inline, or an arena ``offset`` under a
    lease that the client ends with Release (no reply) after copying, or
    ``chunks`` > 0: that many Chunk frames with the bytes follow (always, for
    a client without the arena, when the object is too large to go inline).
Batches: PutMany (inline items) -> Ok(per-item errors); GetMany -> GetManyReady
    (per key: inline bytes, an arena offset under one lease for the batch, a
    miss, or "too large: use Get"); ExistsMany (optionally leasing what it
    found, for a later GetMany(lease_id=...)), DeleteMany, PrefixLength -> Ok.

New fields get defaults so that an older client and a newer daemon still
talk; the handshake carries :data:`PROTOCOL_VERSION` and a daemon refuses a
client of another major version.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import msgspec

from tierd.engine.index import ObjectMeta
from tierd.errors import ProtocolError

__all__ = [
    "ObjectMeta", "PROTOCOL_VERSION", "HEADER", "Request", "Reply", "Hello", "Put", "PutCommit", "PutAbort", "PutChunk",
    "Get", "Release", "Delete", "Exists", "Info", "Keys", "GetStats", "Move", "Prefetch", "Status", "DeclareSchedule",
    "DeclarePrefix",
    "Welcome", "Ok", "Fail", "PutReady", "GetReady", "Chunk", "FrameReader", "encode_frame",
    "PutItem", "PutMany", "GetMany", "ExistsMany", "DeleteMany", "PrefixLength", "ItemReady", "GetManyReady",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct(">I")


class _Req(msgspec.Struct, tag=True, frozen=True, kw_only=True, forbid_unknown_fields=False):
    id: int


class Hello(_Req, frozen=True, kw_only=True):
    version: int
    client: str = ""


class _PutOptions(_Req, frozen=True, kw_only=True):
    """A put's options (``Store.put``'s keywords), for one object or a batch. Fields travel by name."""

    tier: str | None = None
    durable: bool | None = None
    codec: str | None = None
    pin: bool = False
    ttl: float | None = None


class Put(_PutOptions, frozen=True, kw_only=True):
    key: str
    nbytes: int
    meta: ObjectMeta
    data: bytes | None = None  # inline: small objects


class PutCommit(_Req, frozen=True, kw_only=True):
    put_id: int


class PutAbort(_Req, frozen=True, kw_only=True):
    put_id: int


class PutChunk(_Req, frozen=True, kw_only=True):
    """Bytes of a put with no staging extent; no reply (errors come at commit)."""

    put_id: int
    offset: int
    data: bytes


class Get(_Req, frozen=True, kw_only=True):
    key: str
    inline_ok: bool = True


class Release(_Req, frozen=True, kw_only=True):
    """End a lease; no reply."""

    lease_id: int


class Delete(_Req, frozen=True, kw_only=True):
    key: str


class Exists(_Req, frozen=True, kw_only=True):
    key: str


class Info(_Req, frozen=True, kw_only=True):
    key: str


class Keys(_Req, frozen=True, kw_only=True):
    prefix: str = ""


class GetStats(_Req, frozen=True, kw_only=True):
    pass


class Move(_Req, frozen=True, kw_only=True):
    key: str
    tier: str


class Prefetch(_Req, frozen=True, kw_only=True):
    keys: list[str]
    tier: str = "host"


class DeclareSchedule(_Req, frozen=True, kw_only=True):
    keys: list[str]
    cyclic: bool = True


class DeclarePrefix(_Req, frozen=True, kw_only=True):
    keys: list[str]  # one prefix chain, head first
    done: bool = False  # the chain is over: its unshared tail is not expected back


class PutItem(msgspec.Struct, frozen=True, array_like=True):
    """One object of a PutMany: its bytes always inline."""

    key: str
    meta: ObjectMeta
    data: bytes


class PutMany(_PutOptions, frozen=True, kw_only=True):
    """Store every item (options for all); reply Ok(value=[None or "Kind: message" per item])."""

    items: list[PutItem]


class GetMany(_Req, frozen=True, kw_only=True):
    """Read ``keys`` (or, with ``lease_id``, the versions an ExistsMany leased); reply GetManyReady."""

    keys: list[str]
    lease_id: int = 0
    inline_ok: bool = True


class ExistsMany(_Req, frozen=True, kw_only=True):
    """Reply Ok(value=[bool per key]); with ``lease``, Ok(value={"found": [...], "lease_id": n}):
    what was found stays pinned until Release(lease_id) or the connection closes."""

    keys: list[str]
    lease: bool = False


class DeleteMany(_Req, frozen=True, kw_only=True):
    keys: list[str]


class PrefixLength(_Req, frozen=True, kw_only=True):
    keys: list[str]


class Status(_Req, frozen=True, kw_only=True):
    """Everything ``tierd status`` shows: tiers, namespaces, clients."""


Request = (
    Hello | Put | PutCommit | PutAbort | PutChunk | Get | Release | Delete | Exists | Info | Keys | GetStats
    | Move | Prefetch | Status | DeclareSchedule | DeclarePrefix | PutMany | GetMany | ExistsMany | DeleteMany | PrefixLength
)


class _Rep(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    id: int


class Welcome(_Rep, frozen=True, kw_only=True):
    version: int
    arena_bytes: int
    pid: int
    uid: int
    inline_max_bytes: int
    max_frame_bytes: int
    arena: bool = True  # False: no memfd came with this frame; bytes travel in frames
    gpu_pin: bool = True  # how clients pin the arena ([tiers.gpu] pin, pin_piece)
    gpu_pin_piece: int = 1 << 30
    gpu_budget: int = 0  # the clients' gpu tier ([tiers.gpu] budget, fraction)
    gpu_fraction: float = 0.0


class Ok(_Rep, frozen=True, kw_only=True):
    value: Any = None


class Fail(_Rep, frozen=True, kw_only=True):
    kind: str  # a tierd error class name: NotFound, OutOfSpace, ...
    message: str


class PutReady(_Rep, frozen=True, kw_only=True):
    put_id: int
    offset: int | None  # None: send the bytes as PutChunk frames


class GetReady(_Rep, frozen=True, kw_only=True):
    meta: ObjectMeta
    data: bytes | None = None
    offset: int | None = None
    lease_id: int = 0
    chunks: int = 0


class ItemReady(msgspec.Struct, frozen=True, array_like=True):
    """One key of a GetManyReady: ``meta`` None for a miss (``error`` says why when it is not plain
    absence); else its bytes inline (``data``) or in the arena at ``offset`` (under the reply's
    lease), or neither: too large for the batch, read it with Get."""

    meta: ObjectMeta | None = None
    data: bytes | None = None
    offset: int | None = None
    error: str | None = None


class GetManyReady(_Rep, frozen=True, kw_only=True):
    items: list[ItemReady]
    lease_id: int = 0  # > 0: items with an offset are leased until Release(lease_id)


class Chunk(_Rep, frozen=True, kw_only=True):
    data: bytes


Reply = Welcome | Ok | Fail | PutReady | GetReady | GetManyReady | Chunk

_encoder = msgspec.msgpack.Encoder()


def encode_frame(msg: msgspec.Struct) -> bytearray:
    """The frame of ``msg``: encoded once, in place after its length (no copy for the prefix)."""
    frame = bytearray(HEADER.size)
    _encoder.encode_into(msg, frame, HEADER.size)
    HEADER.pack_into(frame, 0, len(frame) - HEADER.size)
    return frame


class FrameReader:
    """Reads whole frames from a stream socket, checking the size before the body.

    Raises ProtocolError for an oversized frame, EOFError at a clean end of
    stream, and ConnectionError for a stream cut inside a frame.
    """

    def __init__(self, sock: socket.socket, max_frame_bytes: int) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        """Bytes received by other means (with ancillary data) that precede the next frame."""
        self._buf += data

    def _fill(self, n: int, *, at_boundary: bool) -> None:
        while len(self._buf) < n:
            chunk = self.sock.recv(max(n - len(self._buf), 1 << 16))
            if not chunk:
                if at_boundary and not self._buf:
                    raise EOFError("peer closed the connection")
                raise ConnectionError(f"connection closed inside a frame ({len(self._buf)} of {n} bytes)")
            self._buf += chunk

    def read(self) -> bytes | bytearray:
        """The body of the next frame (bytes-like, for a msgspec decoder)."""
        self._fill(HEADER.size, at_boundary=True)
        (size,) = HEADER.unpack_from(self._buf)
        if size > self.max_frame_bytes:
            raise ProtocolError(f"frame of {size} bytes is over the limit of {self.max_frame_bytes}")
        have = len(self._buf) - HEADER.size
        if have >= size or size < (1 << 16):
            self._fill(HEADER.size + size, at_boundary=False)
            with memoryview(self._buf) as view:
                body = bytes(view[HEADER.size : HEADER.size + size])
            del self._buf[: HEADER.size + size]
            return body
        # A large frame (streamed object bytes): received straight into its
        # body, with no growing buffer to copy it out of (Note [heap growth]
        # in tierd/daemon/server.py).
        large = bytearray(size)
        with memoryview(self._buf) as view:
            large[:have] = view[HEADER.size :]
        self._buf.clear()
        with memoryview(large) as dest:
            pos = have
            while pos < size:
                n = self.sock.recv_into(dest[pos:])
                if not n:
                    raise ConnectionError(f"connection closed inside a frame ({HEADER.size + pos} of "
                                          f"{HEADER.size + size} bytes)")
                pos += n
        return large
