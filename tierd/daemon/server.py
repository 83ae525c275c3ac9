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
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tierd import protocol as p
from tierd.config import Config, default_socket_path, load_config
from tierd.daemon.connection import Connection
from tierd.daemon.identity import Identity, SocketClaim, peer_credentials
from tierd.daemon.metrics import Metrics
from tierd.daemon.systemd import notify, watchdog_interval_s
from tierd.engine.core import Engine
from tierd.errors import TierdError

__all__ = ["Server", "run"]

log = logging.getLogger("tierd.daemon")

_QUICK = (p.Release, p.PutChunk, p.PutAbort, p.Exists, p.Info, p.Keys, p.GetStats, p.Status, p.Prefetch,
          p.DeclareSchedule, p.DeclarePrefix)


class Server:
    """The daemon. ``serve()`` runs it in the foreground until SIGTERM."""

    def __init__(self, config: Config, *, config_source: Any = None) -> None:
        self.config = config
        self._config_source = config_source
        self.socket_path = default_socket_path(config)
        self.engine: Engine | None = None
        self.capacity_bytes = 0  # all tiers together, once the engine is open
        self.metrics: Metrics | None = None
        self._listener: socket.socket | None = None
        self._claim: SocketClaim | None = None
        self.identity = Identity(config)
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="tierd-worker")
        self._inflight = 0
        self._inflight_zero = threading.Condition(self._conns_lock)
        self._stop = threading.Event()
        self.draining = False
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
                self.draining = True
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
            # What no object may exceed (tier sizes apply at the next restart only).
            self.capacity_bytes = sum(t.capacity_bytes for t in self.engine.tiers.values())
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
        self.identity = Identity(self.config)
        log.info("config reloaded")
        notify("RELOADING=0", f"STATUS=serving on {self.socket_path} (reloaded)")

    def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, finish acknowledged work within ``timeout_s``, close the index."""
        notify("STOPPING=1", "STATUS=draining")
        self.draining = True
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
            conn.close()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.metrics is not None:
            self.metrics.stop()
        if self.engine is not None:
            self.engine.close()  # durable data flushed, LMDB closed
        if self._claim is not None:
            self._claim.release()
        log.info("stopped")

    # -- connections -----------------------------------------------------------

    def _accept_loop(self) -> None:
        listener, engine = self._listener, self.engine
        assert listener is not None and engine is not None  # started by startup(), after both
        while not self.draining:
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
            conn = Connection(self, engine, sock, uid=uid, pid=pid)
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
            threading.Thread(target=conn.serve, name=f"tierd-conn-{pid}", daemon=True).start()

    def holds(self, conn: Connection) -> bool:
        """Whether ``conn`` is among the admitted connections."""
        with self._conns_lock:
            return conn in self._conns

    def forget(self, conn: Connection) -> None:
        """Drop closed ``conn`` from the admitted connections."""
        with self._conns_lock:
            if conn not in self._conns:
                return
            self._conns.discard(conn)
        if self.metrics:
            self.metrics.clients.dec()

    def connections(self) -> list[Connection]:
        with self._conns_lock:
            return list(self._conns)

    @property
    def inflight(self) -> int:
        """Requests handed to the worker pool and not answered yet."""
        return self._inflight

    def begin_request(self) -> None:
        with self._conns_lock:
            self._inflight += 1
        if self.metrics:
            self.metrics.inflight.inc()

    def end_request(self) -> None:
        with self._conns_lock:
            self._inflight -= 1
            if not self._inflight:
                self._inflight_zero.notify_all()
        if self.metrics:
            self.metrics.inflight.dec()

    def _janitor_loop(self) -> None:
        interval = watchdog_interval_s()
        tick = min(1.0, interval) if interval else 1.0
        while not self._stop.wait(tick):
            lease_s = self.config.daemon.lease_s
            now = time.monotonic()
            with self._conns_lock:
                conns = list(self._conns)
            for conn in conns:
                conn.expire_leases(lease_s, now)
            if interval and self._healthy():
                notify("WATCHDOG=1")
            _trim_heap()

    def _healthy(self) -> bool:
        return all(t.is_alive() for t in self._threads) and self.engine is not None and self.engine.healthy()

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


def run(config_source: Any = None) -> int:
    """Entry point of ``tierd serve``."""
    cfg = load_config(config_source)
    return Server(cfg, config_source=config_source).serve()

