"""``tierd.connect()``: a :class:`Store` served by a ``tierd serve`` daemon.

The daemon hands over its host arena (a memfd) at the handshake to clients
of a uid it trusts with every object in it (its own uid, root, and
``daemon.trusted_uids``); such a client maps it and copies large tensors in
and out of it itself, so their bytes never cross the socket. Any other
client gets no arena and streams large objects through the socket in
frames; the Store interface is the same either way. Small objects travel
inline in the frames for everyone.

Calls from many threads share one connection with many requests in
flight; replies are matched to calls by request id (see ``_wait``).
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import os
import socket
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future
from typing import Any

import msgspec
import torch

from tierd import protocol as p
from tierd.clients.base import Staging, Store, prefetch_keys, staging_key
from tierd.clients.remote_batch import RemoteBatches, ReplySource
from tierd.clients.transfer import Outgoing, read_value
from tierd.clients.values import Value
from tierd.config import default_socket_path
from tierd.engine.keys import namespace_of, validate_chain, validate_key
from tierd.errors import DaemonUnavailable, ProtocolError, StoreClosed, error_class
from tierd.tiers.gpu import CopyEngine
from tierd.types import ObjectInfo, Stats

__all__ = ["RemoteStore", "connect"]



log = logging.getLogger("tierd.clients.remote")

_UNREAD_DECLARATIONS = 32  # declare_prefix replies a client leaves unread before it reads the oldest

class _Call:
    """A request waiting for its reply (and, for a streamed get, its chunks)."""

    __slots__ = ("future", "reply", "chunks", "expected")

    def __init__(self) -> None:
        self.future: Future[tuple[Any, list[bytes]]] = Future()
        self.reply: Any = None
        self.chunks: list[bytes] = []
        self.expected = 0


class RemoteStore(RemoteBatches, Store):
    """The :class:`Store` of a running daemon; see :func:`connect`.

    ``has_arena`` says whether the daemon trusted this uid with its host
    arena (zero-copy) or large objects stream through the socket; ``uid``
    is this connection's uid as the daemon saw it (SO_PEERCRED).
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, client: str = "") -> None:
        super().__init__()
        self.socket_path = os.fspath(socket_path) if socket_path else str(default_socket_path())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(self.socket_path)
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(
                f"no tierd daemon answers on {self.socket_path} ({exc.strerror}); start one with `tierd serve`, "
                "or pass its socket path to tierd.connect()"
            ) from exc
        self._sock = sock
        self._send_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._calls_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._closed = False
        self._unhinted: dict[str, float] = {}  # namespace -> until when declare_prefix skips it
        self._declared: collections.deque[_Call] = collections.deque()  # declarations not waited for
        self._broken: BaseException | None = None
        self._decoder = msgspec.msgpack.Decoder(p.Reply)
        self._reader = p.FrameReader(sock, 1 << 30)
        try:
            self._handshake(client or f"pid {os.getpid()}")
        except BaseException:
            sock.close()
            raise
        self._recv_cond = threading.Condition()
        self._reading = False

    def _handshake(self, client: str) -> None:
        sock = self._sock
        try:
            sock.sendall(p.encode_frame(p.Hello(id=0, version=p.PROTOCOL_VERSION, client=client)))
        except OSError:
            pass  # refused at accept (a limit) and closed: the reason waits to be read below
        # The memfd arrives as ancillary data on the Welcome frame's first bytes.
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 1)
        except OSError as exc:
            raise DaemonUnavailable(f"the daemon on {self.socket_path} dropped the connection at the handshake: "
                                    f"{exc.strerror}") from exc
        if not data:
            raise DaemonUnavailable(f"the daemon on {self.socket_path} closed the connection at the handshake")
        self._reader.feed(data)
        reply = self._decoder.decode(self._reader.read())
        if isinstance(reply, p.Fail):
            for fd in fds:
                os.close(fd)
            raise error_class(reply.kind)(reply.message)
        if not isinstance(reply, p.Welcome) or len(fds) != (1 if reply.arena else 0):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("the daemon's handshake carried no arena although it announced one")
        self._map: mmap.mmap | None = None
        self._arena: torch.Tensor | None = None  # None: every large object streams through the socket
        if reply.arena:
            try:
                self._map = mmap.mmap(fds[0], reply.arena_bytes, flags=mmap.MAP_SHARED)
            finally:
                os.close(fds[0])
            self._arena = torch.frombuffer(self._map, dtype=torch.uint8)
        self._copies = CopyEngine(self._arena, pin=reply.gpu_pin, piece=reply.gpu_pin_piece)
        self.gpu_budget, self.gpu_fraction = reply.gpu_budget, reply.gpu_fraction  # for the gpu tier
        self.daemon_pid = reply.pid
        self.uid = reply.uid
        self.has_arena = reply.arena
        self._inline_max = reply.inline_max_bytes
        self._chunk_bytes = max(1, reply.max_frame_bytes // 2)
        self._reader.max_frame_bytes = reply.max_frame_bytes + (1 << 20)

    # -- transport -------------------------------------------------------------
    #
    # No reader thread: the thread waiting for a reply reads frames itself
    # (leader), completing other threads' calls as their replies pass by;
    # the others (followers) wait on a condition and take over reading when
    # the leader is done. A lone caller thus sends and receives on its own
    # thread, with no handoff, the way redis-py does.

    def _dispatch(self, reply: Any) -> None:
        call = self._calls.get(reply.id)
        if call is None:
            return  # nobody waits (a Fail with id 0)
        if isinstance(reply, p.Chunk):
            call.chunks.append(reply.data)
        elif isinstance(reply, p.GetReady) and reply.chunks:
            call.reply, call.expected = reply, reply.chunks
        else:
            call.reply = reply
        if call.reply is not None and len(call.chunks) >= call.expected:
            del self._calls[reply.id]
            call.future.set_result((call.reply, call.chunks))

    def _wait(self, call: _Call) -> tuple[Any, list[bytes]]:
        cond = self._recv_cond
        while True:
            with cond:
                while self._reading and not call.future.done():
                    cond.wait()
                if call.future.done():
                    return call.future.result()
                self._reading = True
            try:
                try:
                    reply = self._decoder.decode(self._reader.read())
                except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                    self._fail_all(exc)
                    raise self._broken if self._broken is not None else exc from None
                with self._calls_lock:
                    self._dispatch(reply)
            finally:
                with cond:
                    self._reading = False
                    cond.notify_all()

    def _fail_all(self, exc: BaseException) -> None:
        if self._broken is None:
            if self._closed:
                self._broken = StoreClosed("the store is closed")
            else:
                self._broken = DaemonUnavailable(
                    f"lost the connection to the tierd daemon on {self.socket_path}: {exc!s}")
        with self._calls_lock:
            calls = list(self._calls.values())
            self._calls.clear()
        for call in calls:
            if not call.future.done():
                call.future.set_exception(self._broken)

    def _send(self, msg: msgspec.Struct) -> None:
        if self._broken is not None:
            raise self._broken
        frame = p.encode_frame(msg)
        try:
            with self._send_lock:
                self._sock.sendall(frame)
        except OSError as exc:
            raise DaemonUnavailable(f"cannot reach the tierd daemon on {self.socket_path}: {exc.strerror}") from exc

    def _post(self, make: Any, **fields: Any) -> _Call:
        """Send ``make(id=..., **fields)``; its reply lands in the returned call when some caller reads it."""
        if self._closed:
            raise StoreClosed("the store is closed")
        rid = next(self._ids)
        call = _Call()
        with self._calls_lock:
            self._calls[rid] = call
        try:
            self._send(make(id=rid, **fields))
        except BaseException:
            with self._calls_lock:
                self._calls.pop(rid, None)
            raise
        return call

    def _call(self, make: Any, **fields: Any) -> tuple[Any, list[bytes]]:
        """Send ``make(id=..., **fields)`` and wait for its reply; raise its error."""
        reply, chunks = self._wait(self._post(make, **fields))
        if isinstance(reply, p.Fail):
            raise error_class(reply.kind)(reply.message)
        return reply, chunks

    # -- Store -----------------------------------------------------------------

    def put(
        self, key: str, value: Value, *, tier: str | None = None, durable: bool | None = None,
        codec: str | None = None, pin: bool = False, ttl: float | None = None,
    ) -> None:
        validate_key(key)
        if isinstance(value, bytes) and len(value) <= self._inline_max:
            # The common small case without a tensor round trip.
            meta = p.ObjectMeta("bytes", "uint8", (len(value),), 1)
            self._call(p.Put, key=key, nbytes=len(value), meta=meta, tier=tier, durable=durable, codec=codec,
                       pin=pin, ttl=ttl, data=value)
            return
        value_out = Outgoing(value)
        n = value_out.nbytes
        opts = {"key": key, "nbytes": n, "meta": value_out.meta, "tier": tier, "durable": durable, "codec": codec,
                "pin": pin, "ttl": ttl}
        if n <= self._inline_max:
            self._call(p.Put, data=value_out.flat().numpy().tobytes(), **opts)
            return
        ready, _ = self._call(p.Put, **opts)
        arena = self._arena
        try:
            if ready.offset is not None and arena is None:
                raise ProtocolError("the daemon named an arena offset to a client it gave no arena")
            if ready.offset is not None:
                assert arena is not None
                value_out.write_into(self._copies, arena[ready.offset : ready.offset + n])
            else:  # no room to stage in the arena: the bytes go through the socket
                view = value_out.flat().numpy()
                for start in range(0, n, self._chunk_bytes):
                    self._send(p.PutChunk(id=0, put_id=ready.put_id, offset=start,
                                          data=view[start : start + self._chunk_bytes].tobytes()))
        except BaseException:
            self._send(p.PutAbort(id=next(self._ids), put_id=ready.put_id))
            raise
        self._call(p.PutCommit, put_id=ready.put_id)

    def stage(self, nbytes: int) -> Staging | None:
        arena = self._arena
        if arena is None or nbytes <= 0:
            return None  # a uid the daemon does not trust with its arena stages in its own memory
        ready, _ = self._call(p.Put, key=staging_key(), nbytes=nbytes, meta=p.ObjectMeta("bytes", "uint8", (nbytes,), 1))

        def release() -> None:
            if not self._closed:  # a closed connection's prepared puts are the daemon's to free
                self._send(p.PutAbort(id=next(self._ids), put_id=ready.put_id))

        if ready.offset is None:
            release()
            return None
        return Staging(arena[ready.offset : ready.offset + nbytes], release)

    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        ready, chunks = self._call(p.Get, key=validate_key(key))
        try:
            if ready.offset is not None and self._arena is None:
                raise ProtocolError("the daemon named an arena offset to a client it gave no arena")
            return read_value(ReplySource(ready, chunks, self._arena, self._map), key, self._copies, device=device, out=out)
        finally:
            if ready.lease_id:
                self._send(p.Release(id=0, lease_id=ready.lease_id))

    def prefetch(self, keys: Iterable[str] | str, *, tier: str = "host") -> None:
        self._call(p.Prefetch, keys=prefetch_keys(keys), tier=tier)

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self._call(p.DeclareSchedule, keys=[validate_key(k) for k in keys], cyclic=cyclic)

    def declare_prefix(self, keys: Sequence[str], *, done: bool = False) -> None:
        chain = validate_chain(keys)
        if not chain:
            return
        # A namespace the daemon said keeps no hints is not asked again for a minute (a SIGHUP may
        # turn its prefix policies on): PrefixKVStore declares on every put, a round trip each.
        ns = namespace_of(chain[0])
        if time.monotonic() < self._unhinted.get(ns, 0.0):
            return
        # Not waited for: the daemon applies a declaration on its reading thread before it reads the
        # next frame (the put it comes with), and whichever call reads next takes the reply. Only so
        # many replies may wait unread: a client that only declares (a sweeper finishing sessions)
        # would otherwise fill the socket until the daemon blocks writing replies and stops reading.
        call = self._post(p.DeclarePrefix, keys=chain, done=done)
        call.future.add_done_callback(lambda heard: self._heard_declared(ns, heard))
        self._declared.append(call)
        while len(self._declared) > _UNREAD_DECLARATIONS:
            try:
                oldest = self._declared.popleft()
            except IndexError:  # another thread took it
                break
            self._wait(oldest)

    def _heard_declared(self, ns: str, heard: Future[tuple[Any, list[bytes]]]) -> None:
        if heard.exception() is not None:
            return  # the connection broke: the next call says so
        reply = heard.result()[0]
        if isinstance(reply, p.Fail):
            log.warning("tierd: a prefix chain in %r was not declared: %s", ns, reply.message)
        elif reply.value is False:
            self._unhinted[ns] = time.monotonic() + 60.0

    def move(self, key: str, tier: str) -> None:
        self._call(p.Move, key=validate_key(key), tier=tier)

    def delete(self, key: str) -> bool:
        return bool(self._call(p.Delete, key=validate_key(key))[0].value)

    def exists(self, key: str) -> bool:
        return bool(self._call(p.Exists, key=validate_key(key))[0].value)

    def info(self, key: str) -> ObjectInfo:
        return msgspec.convert(self._call(p.Info, key=validate_key(key))[0].value, ObjectInfo)

    def keys(self, prefix: str = "") -> list[str]:
        return list(self._call(p.Keys, prefix=prefix)[0].value)

    def stats(self) -> Stats:
        return msgspec.convert(self._call(p.GetStats)[0].value, Stats)

    def status(self) -> dict[str, Any]:
        """What ``tierd status`` shows: tiers, namespaces, clients, metrics port."""
        value = self._call(p.Status)[0].value
        value["stats"] = msgspec.convert(value["stats"], Stats)
        return dict(value)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._declared.clear()
        self._fail_all(StoreClosed("the store is closed"))  # replies nobody waits for (declarations) will not come now
        self._copies.close()  # unregister the arena before unmapping it
        self._arena = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # a tensor still aliases the mapping; it goes with the last one


def connect(socket_path: str | os.PathLike[str] | None = None) -> RemoteStore:
    """Connect to the daemon (see ``tierd.connect``)."""
    return RemoteStore(socket_path)
