"""``tierd serve``: the engine behind a Unix domain socket.

Threads
    * the main thread waits for a signal (SIGTERM/SIGINT: drain and stop,
      SIGHUP: reload namespaces and quotas; see Note [signals] in serve);
    * one acceptor; one reader per connection, which decodes frames and
      runs quick requests itself (so a PutChunk is stored before the
      PutCommit behind it is read) and hands the rest to a worker pool (so
      many requests of one connection are in flight at once);
    * a janitor that expires leases older than ``daemon.lease_s`` and sends
      the systemd watchdog ping while the daemon is healthy.

Client state
    Each connection owns its prepared puts (staging extents in the host
    arena) and its leases (objects whose host copy it is reading). When the
    socket closes, for whatever reason, both are given back at once.

Identity
    SO_PEERCRED gives the peer's uid. Keys of a namespace not marked
    ``shared`` are scoped to the uid: two uids may both use ``acts/x`` and
    never see each other's objects.

Note [arena trust]
    The host arena is one memfd holding every uid's host-tier objects, and
    whoever maps it can read all of them: scoping keys would not help. So
    the memfd goes only to trusted uids (the daemon's own, root, and
    ``daemon.trusted_uids``), which read and write large objects in place.
    Every other client gets a Welcome without it (``arena=False``) and moves
    bytes through the socket: its puts arrive as PutChunk frames, written
    straight into the staging extent, and its gets leave as Chunk frames.
    Such a client never learns an arena offset, and a streamed put must
    cover every byte (chunks in order, counted) before it commits, so no
    stale arena bytes of another uid can ever be read back through it.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
import torch

from tierd import protocol as p
from tierd._buffers import address_view
from tierd.config import Config, default_socket_path, load_config
from tierd.daemon.identity import Identity, SocketClaim, peer_credentials
from tierd.daemon.metrics import Metrics
from tierd.daemon.systemd import notify, watchdog_interval_s
from tierd.engine.core import Engine, PendingPut
from tierd.engine.index import ObjectRecord
from tierd.engine.keys import user_key
from tierd.errors import InvalidArgument, OutOfSpace, ProtocolError, TierdError

__all__ = ["Server", "run"]

log = logging.getLogger("tierd.daemon")

_QUICK = (p.Release, p.PutChunk, p.PutAbort, p.Exists, p.Info, p.Keys, p.GetStats, p.Status, p.Prefetch,
          p.DeclareSchedule)


@dataclass(eq=False)
class _StreamedPut:
    """A prepared put whose bytes come in PutChunk frames (Note [arena trust])."""

    pending: PendingPut
    buffer: torch.Tensor | None  # where chunks land: the staging extent, or daemon memory; None: the client
    # writes into the arena itself (trusted)
    received: int = 0
    error: str | None = None


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    uid: int
    pid: int
    reader: p.FrameReader
    inflight: threading.Semaphore
    trusted: bool = False  # holds the arena memfd (Note [arena trust])
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    state_lock: threading.Lock = field(default_factory=threading.Lock)
    puts: dict[int, _StreamedPut] = field(default_factory=dict)
    leases: dict[int, tuple[ObjectRecord, float]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    welcomed: bool = False
    closed: bool = False
    since: float = field(default_factory=time.time)
    requests: int = 0

    def send(self, msg: msgspec.Struct) -> None:
        frame = p.encode_frame(msg)
        with self.send_lock:
            if self.closed:
                return
            try:
                self.sock.sendall(frame)
            except OSError:
                self.closed = True  # the reader sees the socket die and cleans up


class Server:
    """The daemon. ``serve()`` runs it in the foreground until SIGTERM."""

    def __init__(self, config: Config, *, config_source: Any = None) -> None:
        self.config = config
        self._config_source = config_source
        self.socket_path = default_socket_path(config)
        self.engine: Engine | None = None
        self.metrics: Metrics | None = None
        self._listener: socket.socket | None = None
        self._claim: SocketClaim | None = None
        self._identity = Identity(config)
        self._conns: set[_Conn] = set()
        self._conns_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tierd-worker")
        self._inflight = 0
        self._inflight_zero = threading.Condition(self._conns_lock)
        self._stop = threading.Event()
        self._draining = False
        self._threads: list[threading.Thread] = []

    # -- life cycle ------------------------------------------------------------

    def serve(self) -> int:
        """Start, wait for a signal, drain, stop. Only call from the main thread.

        Note [signals]
            SIGTERM, SIGINT and SIGHUP are blocked before any thread starts (so
            every thread inherits the mask) and taken synchronously with
            sigwait here. A Python-level handler would run between bytecodes of
            whatever the main thread is doing, and calling Event.set() from it
            can deadlock on the event's own lock; sigwait has no such window.
            The drain runs on its own thread so that a second SIGINT can still
            force the exit.
        """
        sigs = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
        signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
        self.startup()
        stopper: threading.Thread | None = None
        try:
            while True:
                if stopper is None:
                    signum = signal.sigwait(sigs)
                else:
                    info = signal.sigtimedwait(sigs, 0.2)
                    if info is None:
                        if not stopper.is_alive():
                            break
                        continue
                    signum = info.si_signo
                if signum == signal.SIGHUP:
                    if stopper is None:
                        self.reload()
                    continue
                if stopper is not None:
                    if signum == signal.SIGINT:
                        log.warning("second SIGINT: exiting without draining")
                        os._exit(1)
                    continue
                log.info("%s: draining", signal.Signals(signum).name)
                self._draining = True
                self._stop.set()
                stopper = threading.Thread(target=self.shutdown, args=(self.config.daemon.drain_timeout_s,),
                                           name="tierd-drain")
                stopper.start()
        finally:
            if stopper is None:
                self.shutdown(self.config.daemon.drain_timeout_s)
            else:
                stopper.join()
        return 0

    def startup(self) -> None:
        """Take the socket, open the engine, start serving, tell systemd READY=1."""
        self._claim = SocketClaim(self.socket_path)
        try:
            self.engine = Engine(self.config)
        except BaseException:
            self._claim.release()
            raise
        self.metrics = Metrics(self.engine.stats)
        try:
            self.metrics.start(self.config.daemon.metrics)
        except OSError as exc:
            log.warning("metrics endpoint %s not started: %s", self.config.daemon.metrics, exc)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o660)
        listener.listen(128)
        self._listener = listener
        self._spawn(self._accept_loop, "tierd-accept")
        self._spawn(self._janitor_loop, "tierd-janitor")
        log.info("serving on %s (pid %d)", self.socket_path, os.getpid())
        notify("READY=1", f"STATUS=serving on {self.socket_path}", f"MAINPID={os.getpid()}")

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def reload(self) -> None:
        """SIGHUP: re-read the config file; namespaces, quotas and lease time apply at once."""
        assert self.engine is not None
        try:
            new = load_config(self._config_source)
        except TierdError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            notify(f"STATUS=reload failed: {exc}")
            return
        self.engine.apply_config(new)
        self.config = self.engine.config
        self._identity = Identity(self.config)
        log.info("config reloaded")
        notify("RELOADING=0", f"STATUS=serving on {self.socket_path} (reloaded)")

    def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, finish acknowledged work within ``timeout_s``, close the index."""
        notify("STOPPING=1", "STATUS=draining")
        self._draining = True
        if self._listener is not None:
            self._listener.close()  # the acceptor's accept() fails and it exits
            self._listener = None
        deadline = time.monotonic() + timeout_s
        with self._conns_lock:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._inflight_zero.wait(left)
            if self._inflight:
                log.warning("%d requests still running after %.0f s; stopping anyway", self._inflight, timeout_s)
            conns = list(self._conns)
        for conn in conns:
            self._close_conn(conn)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.metrics is not None:
            self.metrics.stop()
        if self.engine is not None:
            self.engine.close()  # durable data flushed, LMDB closed
        if self._claim is not None:
            self._claim.release()
        log.info("stopped")

    # -- connections -----------------------------------------------------------

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._draining:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # listener closed
            try:
                pid, uid, _gid = peer_credentials(sock)
            except OSError:
                sock.close()
                continue
            d = self.config.daemon
            conn = _Conn(sock=sock, uid=uid, pid=pid, reader=p.FrameReader(sock, d.max_frame_bytes),
                         inflight=threading.Semaphore(d.max_inflight))
            with self._conns_lock:
                same_uid = sum(1 for c in self._conns if c.uid == uid)
                if same_uid >= d.max_connections_per_uid:
                    refuse = True
                else:
                    refuse = False
                    self._conns.add(conn)
            if refuse:
                conn.send(p.Fail(id=0, kind="QuotaExceeded",
                                 message=f"uid {uid} has {same_uid} connections, the limit is "
                                         f"{d.max_connections_per_uid} (daemon.max_connections_per_uid)"))
                sock.close()
                continue
            if self.metrics:
                self.metrics.clients.inc()
            threading.Thread(target=self._read_loop, args=(conn,), name=f"tierd-conn-{pid}", daemon=True).start()

    def _read_loop(self, conn: _Conn) -> None:
        decoder = msgspec.msgpack.Decoder(p.Request)
        try:
            while not conn.closed:
                try:
                    body = conn.reader.read()
                except ProtocolError as exc:  # oversized: the stream cannot be trusted further
                    conn.send(p.Fail(id=0, kind="ProtocolError", message=str(exc)))
                    return
                try:
                    req = decoder.decode(body)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    # The frame boundary is intact: answer and keep serving.
                    conn.send(p.Fail(id=_peek_id(body), kind="ProtocolError", message=f"malformed request: {exc}"))
                    continue
                if not conn.welcomed and not isinstance(req, p.Hello):
                    conn.send(p.Fail(id=req.id, kind="ProtocolError", message="send Hello first"))
                    return
                if self._draining and not isinstance(req, (p.Release, p.PutAbort)):
                    conn.send(p.Fail(id=req.id, kind="DaemonUnavailable", message="the daemon is shutting down"))
                    continue
                conn.requests += 1
                if isinstance(req, p.Hello):
                    self._hello(conn, req)
                elif isinstance(req, _QUICK) or self._is_quick(conn, req):
                    # On this thread: no handoff for what takes microseconds
                    # (and PutChunks stay ordered before their PutCommit).
                    self._run(conn, req)
                else:
                    conn.inflight.acquire()  # back-pressure: stop reading at max_inflight
                    self._begin_request()
                    try:
                        self._pool.submit(self._run_pooled, conn, req)
                    except RuntimeError:  # pool shut down
                        conn.inflight.release()
                        self._end_request()
                        return
        except (EOFError, ConnectionError, OSError):
            pass
        finally:
            self._close_conn(conn)

    def _is_quick(self, conn: _Conn, req: Any) -> bool:
        """A small put or get that stays in memory: cheaper to serve than to hand off."""
        assert self.engine is not None
        if isinstance(req, p.Put):
            return req.data is not None and not req.durable and req.tier in (None, "host")
        if isinstance(req, p.Get):
            try:
                key = self._identity.scope(req.key, conn.uid)
            except TierdError:
                return True  # the error reply is quick too
            return self.engine.is_small_on_host(key, self.config.daemon.inline_max_bytes)
        return False

    def _begin_request(self) -> None:
        with self._conns_lock:
            self._inflight += 1
        if self.metrics:
            self.metrics.inflight.inc()

    def _end_request(self) -> None:
        with self._conns_lock:
            self._inflight -= 1
            if not self._inflight:
                self._inflight_zero.notify_all()
        if self.metrics:
            self.metrics.inflight.dec()

    def _run_pooled(self, conn: _Conn, req: Any) -> None:
        try:
            self._run(conn, req)
        finally:
            conn.inflight.release()
            self._end_request()

    def _run(self, conn: _Conn, req: Any) -> None:
        handler = self._handlers[type(req)]
        started = time.perf_counter()
        try:
            reply = handler(self, conn, req)
        except TierdError as exc:
            reply = p.Fail(id=req.id, kind=type(exc).__name__, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - one bad request must not take the daemon down
            log.exception("request %s failed", type(req).__name__)
            reply = p.Fail(id=req.id, kind="TierdError", message=f"internal error: {type(exc).__name__}: {exc}")
        if reply is not None:
            conn.send(reply)
        if self.metrics:
            self.metrics.observe(type(req).__name__, time.perf_counter() - started)

    def _close_conn(self, conn: _Conn) -> None:
        with conn.state_lock:
            if conn.closed and not conn.puts and not conn.leases and conn not in self._conns:
                return
            conn.closed = True
            puts, leases = list(conn.puts.values()), list(conn.leases.values())
            conn.puts.clear()
            conn.leases.clear()
        # A dead client's uncommitted allocations and leases go back at once.
        assert self.engine is not None
        for put in puts:
            self.engine.abort_put(put.pending)
        for rec, _ in leases:
            self.engine.release(rec)
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()
        with self._conns_lock:
            if conn in self._conns:
                self._conns.discard(conn)
                if self.metrics:
                    self.metrics.clients.dec()
        if puts or leases:
            log.info("client pid %d (uid %d) went away: %d allocations and %d leases reclaimed",
                     conn.pid, conn.uid, len(puts), len(leases))

    def _janitor_loop(self) -> None:
        interval = watchdog_interval_s()
        tick = min(1.0, interval) if interval else 1.0
        while not self._stop.wait(tick):
            lease_s = self.config.daemon.lease_s
            now = time.monotonic()
            with self._conns_lock:
                conns = list(self._conns)
            for conn in conns:
                with conn.state_lock:
                    expired = [lid for lid, (_, t) in conn.leases.items() if now - t > lease_s]
                    recs = [conn.leases.pop(lid)[0] for lid in expired]
                for rec in recs:
                    log.warning("lease on %r by pid %d expired after %.0f s", user_key(rec.key), conn.pid, lease_s)
                    assert self.engine is not None
                    self.engine.release(rec)
            if interval and self._healthy():
                notify("WATCHDOG=1")
            _trim_heap()

    def _healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads) and self.engine is not None and self.engine.healthy()

    # -- requests --------------------------------------------------------------

    def _hello(self, conn: _Conn, req: p.Hello) -> None:
        if req.version != p.PROTOCOL_VERSION:
            conn.send(p.Fail(id=req.id, kind="ProtocolError",
                             message=f"client speaks protocol {req.version}, this daemon {p.PROTOCOL_VERSION}; "
                                     "upgrade the older side"))
            conn.closed = True
            return
        assert self.engine is not None
        d, gpu = self.config.daemon, self.config.tiers.gpu
        conn.trusted = self._identity.trusted(conn.uid)
        welcome = p.encode_frame(p.Welcome(
            id=req.id, version=p.PROTOCOL_VERSION, arena_bytes=self.engine.host.capacity_bytes, pid=os.getpid(),
            uid=conn.uid, inline_max_bytes=d.inline_max_bytes, max_frame_bytes=d.max_frame_bytes,
            arena=conn.trusted, gpu_pin=gpu.pin, gpu_pin_piece=gpu.pin_piece, gpu_budget=gpu.budget,
            gpu_fraction=gpu.fraction,
        ))
        # The arena's memfd rides on the Welcome frame: only admitted clients
        # of a trusted uid get it (Note [arena trust]).
        with conn.send_lock:
            if conn.trusted:
                socket.send_fds(conn.sock, [welcome], [self.engine.host.fd])
            else:
                conn.sock.sendall(welcome)
        conn.welcomed = True

    def _put(self, conn: _Conn, req: p.Put) -> Any:
        assert self.engine is not None
        key = self._identity.scope(req.key, conn.uid)
        numel = 1
        for dim in req.meta.shape:
            numel *= dim
        if req.nbytes < 0 or req.nbytes != numel * req.meta.itemsize:
            raise InvalidArgument(f"nbytes {req.nbytes} does not match shape {req.meta.shape} x {req.meta.itemsize}")
        capacity = sum(t.capacity_bytes for t in self.engine.tiers.values())
        if req.nbytes > capacity:  # before any buffer is sized by it
            raise OutOfSpace(f"an object of {req.nbytes} bytes is larger than all tiers together ({capacity} bytes)")
        opts: dict[str, Any] = {"tier": req.tier, "durable": req.durable, "codec": req.codec, "pin": req.pin, "ttl": req.ttl,
                "owner": conn.uid}
        if req.data is not None:
            if len(req.data) != req.nbytes:
                raise InvalidArgument(f"inline data holds {len(req.data)} bytes, nbytes says {req.nbytes}")
            self.engine.put(key, memoryview(req.data), req.meta, **opts)
            return p.Ok(id=req.id)
        pending = self.engine.prepare_put(key, req.nbytes, req.meta, stage=True, **opts)
        buffer: torch.Tensor | None = None
        if pending.staging is not None:
            # Untrusted: the chunks go straight into the staging extent.
            buffer = None if conn.trusted else self.engine.host.view(pending.staging)
        elif req.nbytes:
            buffer = torch.empty(req.nbytes, dtype=torch.uint8)
        put_id = next(conn.ids)
        with conn.state_lock:
            if conn.closed:
                self.engine.abort_put(pending)
                return None
            conn.puts[put_id] = _StreamedPut(pending, buffer)
        offset = pending.staging.offset if pending.staging is not None and buffer is None else None
        return p.PutReady(id=req.id, put_id=put_id, offset=offset)

    def _put_chunk(self, conn: _Conn, req: p.PutChunk) -> None:
        with conn.state_lock:
            put = conn.puts.get(req.put_id)
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

    def _put_commit(self, conn: _Conn, req: p.PutCommit) -> Any:
        with conn.state_lock:
            put = conn.puts.pop(req.put_id, None)
        if put is None:
            raise ProtocolError(f"no prepared put {req.put_id} on this connection (aborted or committed)")
        assert self.engine is not None
        if put.buffer is not None and put.error is None and put.received != put.buffer.numel():
            put.error = f"only {put.received} of {put.buffer.numel()} bytes were sent before the commit"
        if put.error is not None:
            self.engine.abort_put(put.pending)
            raise InvalidArgument(f"put of {user_key(put.pending.rec.key)!r} refused: {put.error}")
        # Bytes written into the staging extent are already in place.
        src = put.buffer if put.pending.staging is None else None
        self.engine.finish_put(put.pending, src)
        return p.Ok(id=req.id)

    def _put_abort(self, conn: _Conn, req: p.PutAbort) -> Any:
        with conn.state_lock:
            put = conn.puts.pop(req.put_id, None)
        if put is not None:
            assert self.engine is not None
            self.engine.abort_put(put.pending)
        return p.Ok(id=req.id)

    def _get(self, conn: _Conn, req: p.Get) -> Any:
        engine = self.engine
        assert engine is not None
        rec = engine.acquire(self._identity.scope(req.key, conn.uid))
        keep = False
        try:
            n = rec.nbytes
            if n <= self.config.daemon.inline_max_bytes and req.inline_ok:
                buf = bytearray(n)
                engine.read_into(rec, memoryview(buf))
                return p.GetReady(id=req.id, meta=rec.meta, data=bytes(buf))
            # A client without the arena still promotes (for the next reader),
            # but never makes room for it by demoting others.
            loc = engine.read_location(rec, promote=True, evict=conn.trusted)
            if loc is not None and conn.trusted:
                lease_id = next(conn.ids)
                with conn.state_lock:
                    if conn.closed:
                        return None
                    conn.leases[lease_id] = (rec, time.monotonic())
                    keep = True
                return p.GetReady(id=req.id, meta=rec.meta, offset=loc.offset, lease_id=lease_id)
            if loc is not None:
                data = engine.host.view(loc)  # valid while our lease on rec lasts (until finally)
            else:  # larger than the arena can take now
                data = torch.empty(n, dtype=torch.uint8)
                engine.read_into(rec, data, promote=False)
            # Stream it in frames.
            step = max(1, self.config.daemon.max_frame_bytes // 2)
            chunks = -(-n // step)
            conn.send(p.GetReady(id=req.id, meta=rec.meta, chunks=chunks))
            view = address_view(data.data_ptr(), n)  # data (and our lease) outlive the loop
            for i in range(chunks):
                # A memoryview is encoded as msgpack bin like bytes, without copying it first.
                conn.send(p.Chunk(id=req.id, data=cast(bytes, view[i * step : (i + 1) * step])))
            return None
        finally:
            if not keep:
                engine.release(rec)

    def _release(self, conn: _Conn, req: p.Release) -> None:
        with conn.state_lock:
            entry = conn.leases.pop(req.lease_id, None)
        if entry is not None:
            assert self.engine is not None
            self.engine.release(entry[0])
        return None

    def _delete(self, conn: _Conn, req: p.Delete) -> Any:
        assert self.engine is not None
        return p.Ok(id=req.id, value=self.engine.delete(self._identity.scope(req.key, conn.uid)))

    def _exists(self, conn: _Conn, req: p.Exists) -> Any:
        assert self.engine is not None
        return p.Ok(id=req.id, value=self.engine.exists(self._identity.scope(req.key, conn.uid)))

    def _info(self, conn: _Conn, req: p.Info) -> Any:
        assert self.engine is not None
        info = self.engine.info(self._identity.scope(req.key, conn.uid))
        return p.Ok(id=req.id, value=msgspec.structs.replace(info, key=req.key))

    def _keys(self, conn: _Conn, req: p.Keys) -> Any:
        assert self.engine is not None
        keys = [k for k in (self._identity.visible(e, conn.uid) for e in self.engine.keys(req.prefix)) if k is not None]
        return p.Ok(id=req.id, value=sorted(keys))

    def _stats(self, conn: _Conn, req: p.GetStats) -> Any:
        assert self.engine is not None
        return p.Ok(id=req.id, value=self.engine.stats())

    def _move(self, conn: _Conn, req: p.Move) -> Any:
        assert self.engine is not None
        self.engine.move(self._identity.scope(req.key, conn.uid), req.tier)
        return p.Ok(id=req.id)

    def _prefetch(self, conn: _Conn, req: p.Prefetch) -> Any:
        assert self.engine is not None
        keys = []
        for key in req.keys:
            try:
                keys.append(self._identity.scope(key, conn.uid))
            except InvalidArgument:
                continue  # a hint: bad keys are ignored like missing ones
        self.engine.prefetch(keys, req.tier)
        return p.Ok(id=req.id)

    def _declare_schedule(self, conn: _Conn, req: p.DeclareSchedule) -> Any:
        assert self.engine is not None
        self.engine.declare_schedule([self._identity.scope(k, conn.uid) for k in req.keys], cyclic=req.cyclic)
        return p.Ok(id=req.id)

    def _status(self, conn: _Conn, req: p.Status) -> Any:
        assert self.engine is not None
        # Another uid's processes and namespaces are none of an untrusted client's business.
        with self._conns_lock:
            clients = [{"pid": c.pid, "uid": c.uid, "since": c.since, "requests": c.requests,
                        "leases": len(c.leases), "puts": len(c.puts)} for c in self._conns
                       if conn.trusted or c.uid == conn.uid]
        return p.Ok(id=req.id, value={
            "pid": os.getpid(), "socket": str(self.socket_path), "stats": self.engine.stats(),
            "namespaces": self.engine.namespace_usage() if conn.trusted else {}, "clients": clients,
            "metrics_port": self.metrics.port if self.metrics else None, "inflight": self._inflight,
        })

    _handlers: dict[type, Callable[..., Any]] = {
        p.Put: _put, p.PutChunk: _put_chunk, p.PutCommit: _put_commit, p.PutAbort: _put_abort, p.Get: _get,
        p.Release: _release, p.Delete: _delete, p.Exists: _exists, p.Info: _info, p.Keys: _keys,
        p.GetStats: _stats, p.Move: _move, p.Prefetch: _prefetch, p.Status: _status,
        p.DeclareSchedule: _declare_schedule,
    }


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None
_MALLOC_TRIM = getattr(_LIBC, "malloc_trim", None)  # glibc only


def _trim_heap() -> None:
    """Give memory freed by the worker threads back to the system (Note [heap growth])."""
    # Note [heap growth]
    #     Frames of streamed objects are megabytes each, allocated and freed by
    #     many threads. glibc keeps such freed blocks in per-thread arenas (its
    #     mmap threshold rises past them after the first frees), so a daemon
    #     serving streamed clients grew by hundreds of MiB within a minute in
    #     tests/faults/test_soak.py without holding more data. A fixed mmap
    #     threshold stops that but halves the throughput (fresh pages on every
    #     frame); trimming once a tick keeps both.
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _peek_id(body: bytes | bytearray) -> int:
    """The ``id`` of a frame that failed to decode as a request, if it has one."""
    try:
        obj = msgspec.msgpack.decode(body)
    except msgspec.DecodeError:
        return 0
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, int) else 0


def run(config_source: Any = None) -> int:
    """Entry point of ``tierd serve``."""
    cfg = load_config(config_source)
    return Server(cfg, config_source=config_source).serve()

