"""One client connection of the daemon: its read loop, its requests' answers, its puts and leases.

The daemon (server.py) accepts, admits and counts connections and owns the
engine's life; a :class:`Connection` is built once the engine is open, so it
always has one. Requests that take microseconds (small gets, chunks,
releases) are answered on the connection's own thread; the rest go to the
server's worker pool, at most ``daemon.max_inflight`` at a time per client.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import msgspec
import torch

from tierd import protocol as p
from tierd._buffers import address_view
from tierd.daemon import batches
from tierd.daemon.batches import Held, release_held
from tierd.engine.core import Engine
from tierd.engine.handles import Reservation
from tierd.engine.keys import user_key, validate_chain
from tierd.errors import InvalidArgument, OutOfSpace, ProtocolError, TierdError

if TYPE_CHECKING:
    from tierd.daemon.server import Server

__all__ = ["Connection", "StreamedPut"]

log = logging.getLogger("tierd.daemon")

_QUICK = (p.Release, p.PutChunk, p.PutAbort, p.Exists, p.Info, p.Keys, p.GetStats, p.Status, p.Prefetch,
          p.DeclareSchedule, p.DeclarePrefix)


@dataclass(eq=False)
class StreamedPut:
    """A prepared put whose bytes come in PutChunk frames (Note [arena trust])."""

    res: Reservation
    buffer: torch.Tensor | None  # where chunks land: the staging extent, or daemon memory; None: the client
    # writes into the arena itself (trusted)
    received: int = 0
    error: str | None = None


class Connection:
    """A client's connection: who it is (SO_PEERCRED), what it holds, and the answers to its requests."""

    def __init__(self, server: Server, engine: Engine, sock: socket.socket, *, uid: int, pid: int) -> None:
        d = server.config.daemon
        self.server = server
        self.engine = engine
        self.sock = sock
        self.uid = uid
        self.pid = pid
        self.reader = p.FrameReader(sock, d.max_frame_bytes)
        self.inflight = threading.Semaphore(d.max_inflight)
        self.trusted = False  # holds the arena memfd (Note [arena trust] in server.py)
        self.send_lock = threading.Lock()
        self.state_lock = threading.Lock()
        self.puts: dict[int, StreamedPut] = {}
        self.leases: dict[int, tuple[Held, float]] = {}  # a get's lease, or a batch's leases
        self.ids = itertools.count(1)
        self.welcomed = False
        self.closed = False
        self.since = time.time()
        self.requests = 0

    def send(self, msg: msgspec.Struct) -> None:
        frame = p.encode_frame(msg)
        with self.send_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(frame)
            except OSError:
                self.closed = True  # the reader sees the socket die and cleans up

    def expire_leases(self, lease_s: float, now: float) -> None:
        """Release leases held longer than ``lease_s`` (a client that never sent Release)."""
        with self.state_lock:
            expired = [lid for lid, (_, t) in self.leases.items() if now - t > lease_s]
            gone = [self.leases.pop(lid)[0] for lid in expired]
        for held in gone:
            what = f"{len(held)} keys" if isinstance(held, list) else repr(user_key(held.key))
            log.warning("lease on %s by pid %d expired after %.0f s", what, self.pid, lease_s)
            release_held(held)

    def serve(self) -> None:
        """Read and answer requests until the client goes away or breaks the protocol; then clean up."""
        decoder = msgspec.msgpack.Decoder(p.Request)
        try:
            while not self.closed:
                try:
                    body = self.reader.read()
                except ProtocolError as exc:  # oversized: the stream cannot be trusted further
                    self.send(p.Fail(id=0, kind="ProtocolError", message=str(exc)))
                    return
                try:
                    req = decoder.decode(body)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    # The frame boundary is intact: answer and keep serving.
                    self.send(p.Fail(id=_peek_id(body), kind="ProtocolError", message=f"malformed request: {exc}"))
                    continue
                if not self.welcomed and not isinstance(req, p.Hello):
                    self.send(p.Fail(id=req.id, kind="ProtocolError", message="send Hello first"))
                    return
                if self.server.draining and not isinstance(req, (p.Release, p.PutAbort)):
                    self.send(p.Fail(id=req.id, kind="DaemonUnavailable", message="the daemon is shutting down"))
                    continue
                self.requests += 1
                if isinstance(req, p.Hello):
                    self._hello(req)
                elif isinstance(req, p.Get) and req.inline_ok and self._small_get(req):
                    pass  # answered whole, on this thread
                elif isinstance(req, p.GetMany):
                    finish = batches.start_get_many(self, req)  # the small part, on this thread
                    if finish is not None and not self._hand_off(req, finish):
                        return
                elif isinstance(req, _QUICK) or self._is_quick(req):
                    # On this thread: no handoff for what takes microseconds
                    # (and PutChunks stay ordered before their PutCommit).
                    self._run(req)
                elif not self._hand_off(req, _HANDLERS[type(req)]):
                    return
        except (EOFError, ConnectionError, OSError):
            pass
        finally:
            self.close()

    def _is_quick(self, req: Any) -> bool:
        """A small put or get that stays in memory: cheaper to serve than to hand off."""
        if isinstance(req, p.Put):
            return req.data is not None and not req.durable and req.tier in (None, "host")
        if isinstance(req, p.Get):
            return False  # not small on host (_small_get said so): it may read a lower tier
        return batches.is_quick(self, req)

    def _small_get(self, req: p.Get) -> bool:
        """Answer a get of a small object on host in one engine pass; False: take the usual path."""
        started = time.perf_counter()
        try:
            key = self.server.identity.scope(req.key, self.uid)
            small = self.engine.read_small(key, self.server.config.daemon.inline_max_bytes)
        except TierdError:
            return False  # the usual path reports it
        if small is None:
            return False
        self.send(p.GetReady(id=req.id, meta=small[0], data=small[1]))
        if self.server.metrics:
            self.server.metrics.observe("Get", time.perf_counter() - started)
        return True

    def _hand_off(self, req: Any, handler: Callable[[Connection, Any], Any]) -> bool:
        """Run ``handler`` for ``req`` on the pool; False if the pool is shut down (the daemon stops)."""
        self.inflight.acquire()  # back-pressure: stop reading at max_inflight
        self.server.begin_request()
        try:
            self.server.pool.submit(self._run_pooled, req, handler)
        except RuntimeError:  # pool shut down
            self.inflight.release()
            self.server.end_request()
            return False
        return True

    def _run_pooled(self, req: Any, handler: Callable[[Connection, Any], Any]) -> None:
        try:
            self._run(req, handler)
        finally:
            self.inflight.release()
            self.server.end_request()

    def _run(self, req: Any, handler: Callable[[Connection, Any], Any] | None = None) -> None:
        handler = handler or _HANDLERS[type(req)]
        started = time.perf_counter()
        try:
            reply = handler(self, req)
        except TierdError as exc:
            reply = p.Fail(id=req.id, kind=type(exc).__name__, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the daemon down
            log.exception("request %s failed", type(req).__name__)
            reply = p.Fail(id=req.id, kind="TierdError", message=f"internal error: {type(exc).__name__}: {exc}")
        if reply is not None:
            self.send(reply)
        if self.server.metrics:
            self.server.metrics.observe(type(req).__name__, time.perf_counter() - started)

    def close(self) -> None:
        """Close the socket and give back this client's uncommitted puts and leases; idempotent."""
        with self.state_lock:
            if self.closed and not self.puts and not self.leases and not self.server.holds(self):
                return
            self.closed = True
            puts, leases = list(self.puts.values()), list(self.leases.values())
            self.puts.clear()
            self.leases.clear()
        # A dead client's uncommitted allocations and leases go back at once.
        for put in puts:
            put.res.abort()
        for held, _ in leases:
            release_held(held)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.server.forget(self)
        if puts or leases:
            log.info("client pid %d (uid %d) went away: %d allocations and %d leases reclaimed",
                     self.pid, self.uid, len(puts), len(leases))

    # -- requests ----------------------------------------------------------------

    def _hello(self, req: p.Hello) -> None:
        if req.version != p.PROTOCOL_VERSION:
            self.send(p.Fail(id=req.id, kind="ProtocolError",
                             message=f"client speaks protocol {req.version}, this daemon {p.PROTOCOL_VERSION}; "
                                     "upgrade the older side"))
            self.closed = True
            return
        d, gpu = self.server.config.daemon, self.server.config.tiers.gpu
        self.trusted = self.server.identity.trusted(self.uid)
        welcome = p.encode_frame(p.Welcome(
            id=req.id, version=p.PROTOCOL_VERSION, arena_bytes=self.engine.host.capacity_bytes, pid=os.getpid(),
            uid=self.uid, inline_max_bytes=d.inline_max_bytes, max_frame_bytes=d.max_frame_bytes,
            arena=self.trusted, gpu_pin=gpu.pin, gpu_pin_piece=gpu.pin_piece, gpu_budget=gpu.budget,
            gpu_fraction=gpu.fraction,
        ))
        # The arena's memfd rides on the Welcome frame: only admitted clients
        # of a trusted uid get it (Note [arena trust]).
        with self.send_lock:
            if self.trusted:
                socket.send_fds(self.sock, [welcome], [self.engine.host.fd])
            else:
                self.sock.sendall(welcome)
        self.welcomed = True

    def _put(self, req: p.Put) -> Any:
        key = self.server.identity.scope(req.key, self.uid)
        numel = 1
        for dim in req.meta.shape:
            numel *= dim
        if req.nbytes < 0 or req.nbytes != numel * req.meta.itemsize:
            raise InvalidArgument(f"nbytes {req.nbytes} does not match shape {req.meta.shape} x {req.meta.itemsize}")
        capacity = self.server.capacity_bytes
        if req.nbytes > capacity:  # before any buffer is sized by it
            raise OutOfSpace(f"an object of {req.nbytes} bytes is larger than all tiers together ({capacity} bytes)")
        opts: dict[str, Any] = {"tier": req.tier, "durable": req.durable, "codec": req.codec, "pin": req.pin, "ttl": req.ttl,
                "owner": self.uid}
        if req.data is not None:
            if len(req.data) != req.nbytes:
                raise InvalidArgument(f"inline data holds {len(req.data)} bytes, nbytes says {req.nbytes}")
            if not (req.durable or req.pin or req.ttl is not None) and self.engine.write_small(
                    key, req.data, req.meta, tier=req.tier, codec=req.codec, owner=self.uid):
                return p.Ok(id=req.id)  # stored in one engine pass
            self.engine.put(key, memoryview(req.data), req.meta, **opts)
            return p.Ok(id=req.id)
        res = self.engine.reserve(key, req.nbytes, req.meta, stage=True, **opts)
        buffer = res.view
        if buffer is not None:
            # Trusted: the client writes into the arena itself; untrusted: the chunks go straight there.
            if self.trusted:
                buffer = None
        elif req.nbytes:
            buffer = torch.empty(req.nbytes, dtype=torch.uint8)
        put_id = next(self.ids)
        with self.state_lock:
            if self.closed:
                res.abort()
                return None
            self.puts[put_id] = StreamedPut(res, buffer)
        offset = res.offset if buffer is None else None
        return p.PutReady(id=req.id, put_id=put_id, offset=offset)

    def _put_chunk(self, req: p.PutChunk) -> None:
        with self.state_lock:
            put = self.puts.get(req.put_id)
        if put is None or put.buffer is None or put.error is not None:
            return None  # reported at commit
        end = req.offset + len(req.data)
        # In order and within bounds: then "received == nbytes" at commit means
        # every byte came from the client (Note [arena trust]).
        if req.offset != put.received or end > put.buffer.numel():
            put.error = (f"chunk at offset {req.offset} of {len(req.data)} bytes does not follow the "
                         f"{put.received} bytes received (object of {put.buffer.numel()} bytes)")
            return None
        if req.data:  # straight from the frame into place: no tensor, no extra copy
            address_view(put.buffer.data_ptr() + req.offset, len(req.data))[:] = req.data
        put.received = end
        return None

    def _put_commit(self, req: p.PutCommit) -> Any:
        with self.state_lock:
            put = self.puts.pop(req.put_id, None)
        if put is None:
            raise ProtocolError(f"no prepared put {req.put_id} on this connection (aborted or committed)")
        if put.buffer is not None and put.error is None and put.received != put.buffer.numel():
            put.error = f"only {put.received} of {put.buffer.numel()} bytes were sent before the commit"
        if put.error is not None:
            put.res.abort()
            raise InvalidArgument(f"put of {user_key(put.res.key)!r} refused: {put.error}")
        # Bytes written into the staging extent are already in place.
        put.res.commit(put.buffer if put.res.view is None else None)
        return p.Ok(id=req.id)

    def _put_abort(self, req: p.PutAbort) -> Any:
        with self.state_lock:
            put = self.puts.pop(req.put_id, None)
        if put is not None:
            put.res.abort()
        return p.Ok(id=req.id)

    def _get(self, req: p.Get) -> Any:
        lease = self.engine.acquire(self.server.identity.scope(req.key, self.uid))
        keep = False
        try:
            n = lease.nbytes
            if n <= self.server.config.daemon.inline_max_bytes and req.inline_ok:
                buf = bytearray(n)
                lease.read_into(memoryview(buf))
                return p.GetReady(id=req.id, meta=lease.meta, data=bytes(buf))
            # A client without the arena still promotes (for the next reader),
            # but never makes room for it by demoting others.
            loc = lease.host_location(promote=True, evict=self.trusted)
            if loc is not None and self.trusted:
                lease_id = next(self.ids)
                with self.state_lock:
                    if self.closed:
                        return None
                    self.leases[lease_id] = (lease, time.monotonic())
                    keep = True
                return p.GetReady(id=req.id, meta=lease.meta, offset=loc.offset, lease_id=lease_id)
            if loc is not None:
                data = self.engine.host.view(loc)  # valid while our lease lasts (until finally)
            else:  # larger than the arena can take now
                data = torch.empty(n, dtype=torch.uint8)
                lease.read_into(data, promote=False)
            # Stream it in frames.
            step = max(1, self.server.config.daemon.max_frame_bytes // 2)
            chunks = -(-n // step)
            self.send(p.GetReady(id=req.id, meta=lease.meta, chunks=chunks))
            view = address_view(data.data_ptr(), n)  # data (and our lease) outlive the loop
            for i in range(chunks):
                # A memoryview is encoded as msgpack bin like bytes, without copying it first.
                self.send(p.Chunk(id=req.id, data=cast(bytes, view[i * step : (i + 1) * step])))
            return None
        finally:
            if not keep:
                lease.release()

    def _release(self, req: p.Release) -> None:
        with self.state_lock:
            entry = self.leases.pop(req.lease_id, None)
        if entry is not None:
            release_held(entry[0])
        return None

    def _delete(self, req: p.Delete) -> Any:
        return p.Ok(id=req.id, value=self.engine.delete(self.server.identity.scope(req.key, self.uid)))

    def _exists(self, req: p.Exists) -> Any:
        return p.Ok(id=req.id, value=self.engine.exists(self.server.identity.scope(req.key, self.uid)))

    def _info(self, req: p.Info) -> Any:
        info = self.engine.info(self.server.identity.scope(req.key, self.uid))
        return p.Ok(id=req.id, value=msgspec.structs.replace(info, key=req.key))

    def _keys(self, req: p.Keys) -> Any:
        keys = [k for k in (self.server.identity.visible(e, self.uid) for e in self.engine.keys(req.prefix)) if k is not None]
        return p.Ok(id=req.id, value=sorted(keys))

    def _stats(self, req: p.GetStats) -> Any:
        return p.Ok(id=req.id, value=self.engine.stats())

    def _move(self, req: p.Move) -> Any:
        self.engine.move(self.server.identity.scope(req.key, self.uid), req.tier)
        return p.Ok(id=req.id)

    def _prefetch(self, req: p.Prefetch) -> Any:
        keys = []
        for key in req.keys:
            try:
                keys.append(self.server.identity.scope(key, self.uid))
            except InvalidArgument:
                continue  # a hint: bad keys are ignored like missing ones
        self.engine.prefetch(keys, req.tier)
        return p.Ok(id=req.id)

    def _declare_schedule(self, req: p.DeclareSchedule) -> Any:
        self.engine.declare_schedule([self.server.identity.scope(k, self.uid) for k in req.keys], cyclic=req.cyclic)
        return p.Ok(id=req.id)

    def _declare_prefix(self, req: p.DeclarePrefix) -> Any:
        scoped = [self.server.identity.scope(k, self.uid) for k in req.keys]  # each key validated here
        used = self.engine.declare_prefix(validate_chain(scoped, each=False), done=req.done)
        return p.Ok(id=req.id, value=used)  # False: the namespace keeps no hints (the client may stop)

    def _status(self, req: p.Status) -> Any:
        # Another uid's processes and namespaces are none of an untrusted client's business.
        clients = [{"pid": c.pid, "uid": c.uid, "since": c.since, "requests": c.requests,
                    "leases": len(c.leases), "puts": len(c.puts)} for c in self.server.connections()
                   if self.trusted or c.uid == self.uid]
        return p.Ok(id=req.id, value={
            "pid": os.getpid(), "socket": str(self.server.socket_path), "stats": self.engine.stats(),
            "namespaces": self.engine.namespace_usage() if self.trusted else {}, "clients": clients,
            "policies": self.engine.namespace_policies() if self.trusted else {},
            "metrics_port": self.server.metrics.port if self.server.metrics else None, "inflight": self.server.inflight,
        })


_HANDLERS: dict[type, Callable[[Connection, Any], Any]] = {
    p.Put: Connection._put, p.PutChunk: Connection._put_chunk, p.PutCommit: Connection._put_commit,
    p.PutAbort: Connection._put_abort, p.Get: Connection._get, p.Release: Connection._release,
    p.Delete: Connection._delete, p.Exists: Connection._exists, p.Info: Connection._info, p.Keys: Connection._keys,
    p.GetStats: Connection._stats, p.Move: Connection._move, p.Prefetch: Connection._prefetch,
    p.Status: Connection._status, p.DeclareSchedule: Connection._declare_schedule,
    p.DeclarePrefix: Connection._declare_prefix,
    **batches.HANDLERS,
}


def _peek_id(body: bytes | bytearray) -> int:
    """The ``id`` of a frame that failed to decode as a request, if it has one."""
    try:
        obj = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return 0
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, int) else 0
