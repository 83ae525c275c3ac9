"""``tierd.connect()``: a :class:`Store` served by a ``tierd serve`` daemon.

The daemon hands over its host arena (a memfd) at the handshake to clients
of a uid it trusts with every object in it (its own uid, root, and
``daemon.trusted_uids``); such a client maps it and copies large tensors in
and out of it itself, so their bytes never cross the socket. Any other
client gets no arena and streams large objects through the socket in
frames; the Store interface is the same either way. Small objects travel
inline in the frames for everyone.

Calls from many threads share one connection with many requests in
flight; replies are matched to calls by request id (see ``_Link.wait``).

Note [reconnect]
    Everything one connection learned lives in one :class:`_Link`: the
    socket, the calls in flight, the arena mapping and the limits of its
    handshake. A link that breaks (the daemon killed, stopped, restarted)
    stays broken: every call in flight on it, and every later step of an
    operation that began on it (a put's commit, a lease's read or release,
    a staging's release), fails with ``DaemonUnavailable`` and never
    reaches another daemon, where its put and lease ids would name someone
    else's. The next call opens a new link, once, under ``_link_lock``: a
    new handshake and a new arena mapping. A link looks alive until a send
    on it fails; an operation whose first request could not leave starts
    over on a new link (``_retry``: no daemon saw any of it), so the first
    call after a daemon is back succeeds. Connect attempts are spaced (100 ms after any attempt,
    doubling after each failure up to 1 s), except that a new socket file
    (a daemon that has just bound it) may be tried 100 ms after the last
    attempt; between attempts calls fail at once. Connect and handshake
    have a timeout, so a call never waits on a daemon that is not there.
    The old arena stays mapped while anything still uses it (a staging
    buffer, a copy in progress) and is unmapped with its last user.
"""

from __future__ import annotations

import collections
import itertools
import logging
import mmap
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any, TypeVar

import msgspec
import torch

from tierd import protocol as p
from tierd.clients.base import Staging, Store, prefetch_keys, staging_key
from tierd.clients.remote_batch import RemoteBatches, ReplySource, _Unsent
from tierd.clients.transfer import Outgoing, read_value
from tierd.clients.values import Value
from tierd.config import default_socket_path
from tierd.engine.keys import namespace_of, validate_chain, validate_key
from tierd.errors import DaemonUnavailable, InvalidArgument, ProtocolError, StoreClosed, TierdError, error_class
from tierd.tiers.gpu import CopyEngine
from tierd.types import ObjectInfo, Stats

__all__ = ["RemoteStore", "connect"]



log = logging.getLogger("tierd.clients.remote")

_UNREAD_DECLARATIONS = 32  # declare_prefix replies a client leaves unread before it reads the oldest
_CONNECT_TIMEOUT_S = 5.0  # connect plus handshake (Note [reconnect])
_HEALTH_TIMEOUT_S = 1.0  # healthy()'s one round trip
CALL_TIMEOUT_S = 120.0  # the longest a send or a reply may stall before the link is given up
_RETRY_MIN_S = 0.1  # at most one connect attempt per this long
_RETRY_MAX_S = 1.0  # at most this long between attempts while calls come

_T = TypeVar("_T")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within the call timeout: the daemon is hung or overloaded (tierd.connect(timeout_s=))"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


class _Call:
    """A request waiting for its reply (and, for a streamed get, its chunks)."""

    __slots__ = ("future", "reply", "chunks", "expected")

    def __init__(self) -> None:
        self.future: Future[tuple[Any, list[bytes]]] = Future()
        self.reply: Any = None
        self.chunks: list[bytes] = []
        self.expected = 0


class _Link:
    """One connection to one daemon process and what its handshake gave (Note [reconnect]).

    Raises (at construction) DaemonUnavailable when nobody answers within
    ``_CONNECT_TIMEOUT_S``, or the daemon's refusal (QuotaExceeded, ProtocolError).
    """

    def __init__(self, path: str, client: str, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(_CONNECT_TIMEOUT_S)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(f"no tierd daemon answers on {path} ({_reason(exc)})") from exc
        self.sock = sock
        self.send_lock = threading.Lock()
        self.calls: dict[int, _Call] = {}
        self.calls_lock = threading.Lock()
        self.ids = itertools.count(1)
        self.broken: TierdError | None = None  # set once, when the link dies (or the store closes)
        self.why = ""  # what broke it, in a few words
        self.declared: collections.deque[_Call] = collections.deque()  # declarations not waited for
        self.decoder = msgspec.msgpack.Decoder(p.Reply)
        self.reader = p.FrameReader(sock, 1 << 30)
        self.recv_cond = threading.Condition()
        self.reading = False
        self.map: mmap.mmap | None = None
        self.arena: torch.Tensor | None = None  # None: every large object streams through the socket
        try:
            self._handshake(client)
        except BaseException:
            sock.close()
            raise
        # A hung daemon (stopped, deadlocked) breaks the link after timeout_s of silence on a send or
        # a reply being read: no call waits longer; the next one reconnects.
        sock.settimeout(timeout_s)

    def _handshake(self, client: str) -> None:
        sock = self.sock
        try:
            sock.sendall(p.encode_frame(p.Hello(id=0, version=p.PROTOCOL_VERSION, client=client)))
        except OSError:
            pass  # refused at accept (a limit) and closed: the reason waits to be read below
        # The memfd arrives as ancillary data on the Welcome frame's first bytes.
        fds: list[int] = []
        try:
            data, fds, _flags, _addr = socket.recv_fds(sock, 1 << 16, 1)
            if not data:
                raise EOFError("closed")
            self.reader.feed(data)
            reply = self.decoder.decode(self.reader.read())
        except (OSError, EOFError) as exc:
            for fd in fds:  # an arena memfd received with a frame that never completed
                os.close(fd)
            raise DaemonUnavailable(f"the daemon on {self.path} dropped the connection at the handshake "
                                    f"({_reason(exc)})") from exc
        except (msgspec.DecodeError, ProtocolError) as exc:
            for fd in fds:
                os.close(fd)
            raise ProtocolError(f"the daemon on {self.path} answered the handshake with a bad frame: {exc}") from exc
        if isinstance(reply, p.Fail):
            for fd in fds:
                os.close(fd)
            raise error_class(reply.kind)(reply.message)
        if not isinstance(reply, p.Welcome) or len(fds) != (1 if reply.arena else 0):
            for fd in fds:
                os.close(fd)
            raise ProtocolError("the daemon's handshake carried no arena although it announced one")
        if reply.arena:
            try:
                self.map = mmap.mmap(fds[0], reply.arena_bytes, flags=mmap.MAP_SHARED)
            except OSError as exc:
                raise DaemonUnavailable(f"cannot map the host arena of the daemon on {self.path} "
                                        f"({reply.arena_bytes} bytes): {_reason(exc)}") from exc
            finally:
                os.close(fds[0])
            self.arena = torch.frombuffer(self.map, dtype=torch.uint8)
        self.copies = CopyEngine(self.arena, pin=reply.gpu_pin, piece=reply.gpu_pin_piece)
        self.welcome = reply
        self.inline_max = reply.inline_max_bytes
        self.chunk_bytes = max(1, reply.max_frame_bytes // 2)
        self.reader.max_frame_bytes = reply.max_frame_bytes + (1 << 20)

    def __del__(self) -> None:
        # The socket is closed only here, when no thread can be using it any more: a dead link
        # is shut down, not closed, so its descriptor number cannot be reused under a late send.
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()

    # -- death ---------------------------------------------------------------------

    def die(self, why: BaseException | None, error: TierdError | None = None) -> TierdError:
        """Mark the link broken (once), fail every call in flight, wake a reader, let the arena go."""
        with self.calls_lock:
            first = self.broken is None
            if first:
                self.why = _reason(why) if why is not None else "closed"
                self.broken = error or DaemonUnavailable(
                    f"lost the connection to the tierd daemon on {self.path} ({self.why}); "
                    "calls fail until a daemon serves there again, then the store reconnects by itself")
            calls = list(self.calls.values())
            self.calls.clear()
        broken = self.broken
        assert broken is not None
        for call in calls:
            try:
                call.future.set_exception(self.error())
            except InvalidStateError:
                pass
        if first:
            if error is None:
                log.warning("%s", broken)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)  # a reader blocked in recv returns now
            except OSError:
                pass
            self.declared.clear()
            # Unregister the arena for DMA; its memory stays mapped while a tensor still views it
            # (a staging buffer, a copy in progress) and goes with the last one.
            self.copies.close()
            self.arena = None
            self.map = None
        return broken

    def close(self) -> None:
        self.die(None, StoreClosed("the store is closed"))

    def error(self) -> TierdError:
        """A new instance of the error the link broke with (one per raise: threads raise it at once)."""
        assert self.broken is not None
        return type(self.broken)(str(self.broken))

    def check_arena(self, arena: torch.Tensor | None) -> torch.Tensor:
        """``arena`` (taken before a reply named an offset in it), or why there is none."""
        if arena is not None:
            return arena
        if self.broken is not None:
            raise self.error()
        raise ProtocolError("the daemon named an arena offset to a client it gave no arena")

    # -- transport -------------------------------------------------------------
    #
    # No reader thread: the thread waiting for a reply reads frames itself
    # (leader), completing other threads' calls as their replies pass by;
    # the others (followers) wait on a condition and take over reading when
    # the leader is done. A lone caller thus sends and receives on its own
    # thread, with no handoff, the way redis-py does.

    def _dispatch(self, reply: Any) -> None:
        call = self.calls.get(reply.id)
        if call is None:
            return  # nobody waits (a Fail with id 0, a timed-out ping)
        if isinstance(reply, p.Chunk):
            call.chunks.append(reply.data)
        elif isinstance(reply, p.GetReady) and reply.chunks:
            call.reply, call.expected = reply, reply.chunks
        else:
            call.reply = reply
        if call.reply is not None and len(call.chunks) >= call.expected:
            del self.calls[reply.id]
            call.future.set_result((call.reply, call.chunks))

    def wait(self, call: _Call, timeout_s: float | None = None) -> tuple[Any, list[bytes]] | None:
        """The call's reply and chunks; None if ``timeout_s`` passed first (the reply is then dropped)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        cond = self.recv_cond
        while True:
            with cond:
                while self.reading and not call.future.done():
                    if deadline is None:
                        cond.wait()
                    elif not cond.wait(max(0.0, deadline - time.monotonic())):
                        break
                if call.future.done():
                    return call.future.result()
                if deadline is not None and (self.reading or time.monotonic() >= deadline):
                    self._forget(call)
                    return None
                self.reading = True
            try:
                if deadline is not None and not self._readable(deadline):
                    continue  # the deadline is checked above, once leadership is given back
                try:
                    reply = self.decoder.decode(self.reader.read())
                except BaseException as exc:  # noqa: BLE001 - every waiter must hear of it
                    self.die(exc)
                    raise self.error() from None
                with self.calls_lock:
                    self._dispatch(reply)
            finally:
                with cond:
                    self.reading = False
                    cond.notify_all()

    def _readable(self, deadline: float) -> bool:
        """Whether a frame can be read without waiting past ``deadline`` (or the socket ended)."""
        if len(self.reader._buf) >= p.HEADER.size:  # a frame already received with the last one
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN | select.POLLRDHUP)
        return bool(poller.poll(max(0, int((deadline - time.monotonic()) * 1000))))

    def _forget(self, call: _Call) -> None:
        with self.calls_lock:
            for rid, waiting in list(self.calls.items()):
                if waiting is call:
                    del self.calls[rid]

    def send(self, msg: msgspec.Struct) -> None:
        if self.broken is not None:
            raise self.error()
        frame = p.encode_frame(msg)
        try:
            with self.send_lock:
                self.sock.sendall(frame)
        except OSError as exc:  # a frame may be half sent: the stream is unusable
            self.die(exc)
            raise self.error() from None

    def post(self, make: Any, **fields: Any) -> _Call:
        """Send ``make(id=..., **fields)``; its reply lands in the returned call when some caller reads it."""
        rid = next(self.ids)
        call = _Call()
        with self.calls_lock:
            if self.broken is not None:
                raise self.error()
            self.calls[rid] = call
        try:
            self.send(make(id=rid, **fields))
        except BaseException:
            with self.calls_lock:
                self.calls.pop(rid, None)
            raise
        return call

    def post_first(self, make: Any, **fields: Any) -> _Call:
        """:meth:`post` for an operation's first request: _Unsent if it cannot leave."""
        try:
            return self.post(make, **fields)
        except DaemonUnavailable as exc:  # nothing was delivered: the daemon behind is gone
            raise _Unsent(exc) from None

    def call(self, make: Any, **fields: Any) -> tuple[Any, list[bytes]]:
        """Send ``make(id=..., **fields)`` and wait for its reply; raise its error."""
        return self.reply(self.post(make, **fields))

    def call_first(self, make: Any, **fields: Any) -> tuple[Any, list[bytes]]:
        """:meth:`call` for an operation's first request: _Unsent if it cannot leave."""
        return self.reply(self.post_first(make, **fields))

    def reply(self, call: _Call) -> tuple[Any, list[bytes]]:
        done = self.wait(call)
        assert done is not None  # no timeout
        reply, chunks = done
        if isinstance(reply, p.Fail):
            raise error_class(reply.kind)(reply.message)
        return reply, chunks

    def release(self, lease_id: int) -> None:
        """End a lease; on a dead link a no-op (its leases went with the connection)."""
        if self.broken is None:
            try:
                self.send(p.Release(id=0, lease_id=lease_id))
            except TierdError:
                pass

    def abort(self, put_id: int) -> None:
        """Give back a prepared put; on a dead link a no-op (its puts went with the connection)."""
        if self.broken is None:
            try:
                self.send(p.PutAbort(id=next(self.ids), put_id=put_id))
            except TierdError:
                pass


def _socket_identity(path: str) -> tuple[int, int, int] | None:
    """Which socket file is at ``path`` now (a daemon that binds it makes a new one), or None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_ctime_ns)


class RemoteStore(RemoteBatches, Store):
    """The :class:`Store` of a running daemon; see :func:`connect` and Note [reconnect].

    ``has_arena`` says whether the daemon trusted this uid with its host
    arena (zero-copy) or large objects stream through the socket; ``uid``
    is this connection's uid as the daemon saw it (SO_PEERCRED). Both, and
    ``daemon_pid``, describe the daemon of the latest connection.
    """

    def __init__(self, socket_path: str | os.PathLike[str] | None = None, *, client: str = "",
                 timeout_s: float = CALL_TIMEOUT_S) -> None:
        super().__init__()
        if not timeout_s > 0:
            raise InvalidArgument(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        self._timeout_s = timeout_s
        self.socket_path = os.fspath(socket_path) if socket_path else str(default_socket_path())
        self._client = client or f"pid {os.getpid()}"
        self._closed = False
        self._unhinted: dict[str, float] = {}  # namespace -> until when declare_prefix skips it
        self._link_lock = threading.Lock()  # one reconnect at a time
        self._tried_at = time.monotonic()  # the last connect attempt
        self._retry_s = _RETRY_MIN_S  # the wait after the last attempt (doubles per failure)
        self._tried_socket: tuple[int, int, int] | None = _socket_identity(self.socket_path)
        self._why = ""  # why the last connect attempt failed, if it did
        try:
            self._link = _Link(self.socket_path, self._client, self._timeout_s)
        except DaemonUnavailable as exc:
            self._async.shutdown(wait=False)
            raise DaemonUnavailable(f"{exc}; start one with `tierd serve`, or pass its socket path to "
                                    "tierd.connect()") from exc.__cause__
        except BaseException:
            self._async.shutdown(wait=False)
            raise

    # -- the connection (Note [reconnect]) --------------------------------------

    def _use(self) -> _Link:
        """The live link, reconnecting if the last one broke; raises StoreClosed or DaemonUnavailable."""
        if self._closed:
            raise StoreClosed("the store is closed")
        link = self._link
        if link.broken is None:
            return link
        return self._reconnect()

    def _reconnect(self) -> _Link:
        if not self._link_lock.acquire(timeout=_CONNECT_TIMEOUT_S + 1.0):
            raise DaemonUnavailable(f"still reconnecting to the tierd daemon on {self.socket_path}")
        try:
            if self._closed:
                raise StoreClosed("the store is closed")
            link = self._link
            if link.broken is None:
                return link  # another thread reconnected
            now = time.monotonic()
            found = _socket_identity(self.socket_path)
            new_socket = found is not None and found != self._tried_socket
            if now < self._tried_at + (_RETRY_MIN_S if new_socket else self._retry_s):
                wait_ms = (self._tried_at + self._retry_s - now) * 1000
                raise DaemonUnavailable(
                    f"no tierd daemon answers on {self.socket_path} ({self._why or link.why}); this store "
                    f"reconnects by itself at a call in {wait_ms:.0f} ms or later")
            self._tried_at, self._tried_socket = now, found
            try:
                new = _Link(self.socket_path, self._client, self._timeout_s)
            except TierdError as exc:
                self._retry_s = min(self._retry_s * 2, _RETRY_MAX_S)
                self._why = _reason(exc.__cause__) if exc.__cause__ is not None else str(exc)
                if isinstance(exc, DaemonUnavailable):
                    raise DaemonUnavailable(f"{exc}; this store reconnects by itself once a daemon serves there "
                                            "again") from exc.__cause__
                raise
            self._retry_s, self._why = _RETRY_MIN_S, ""
            self._unhinted.clear()  # what the old daemon said of its namespaces
            self._link = new
            if self._closed:  # close() ran meanwhile and may have seen the old link
                new.close()
                raise StoreClosed("the store is closed")
            log.warning("reconnected to the tierd daemon on %s (pid %d)", self.socket_path, new.welcome.pid)
            return new
        finally:
            self._link_lock.release()

    def _retry(self, op: Callable[[_Link], _T]) -> _T:
        """``op(link)`` on the live link; once more on a new link if its first request could not leave.

        That is how the first call after a daemon restart succeeds: the old link looks alive
        until a send on it fails, and then no daemon has seen anything of the call.
        """
        try:
            return op(self._use())
        except _Unsent:
            pass
        try:
            return op(self._use())
        except _Unsent as exc:  # the new link died at once too
            raise exc.error from None

    def _call(self, make: Any, **fields: Any) -> tuple[Any, list[bytes]]:
        """Send ``make(id=..., **fields)`` and wait for its reply; raise its error."""
        return self._retry(lambda link: link.call_first(make, **fields))

    def _send(self, msg: msgspec.Struct) -> None:
        """Send a request that has no reply (a PutChunk) on the live link."""
        self._use().send(msg)

    @property
    def daemon_pid(self) -> int:
        return int(self._link.welcome.pid)

    @property
    def uid(self) -> int:
        return int(self._link.welcome.uid)

    @property
    def has_arena(self) -> bool:
        return bool(self._link.welcome.arena)

    @property
    def gpu_budget(self) -> int:  # for the gpu tier
        return int(self._link.welcome.gpu_budget)

    @property
    def gpu_fraction(self) -> float:
        return float(self._link.welcome.gpu_fraction)

    @property
    def _copies(self) -> CopyEngine:
        return self._link.copies

    @property
    def _calls(self) -> dict[int, _Call]:
        """The calls waiting for a reply on the live link (tests look)."""
        return self._link.calls

    # -- Store -----------------------------------------------------------------

    def put(
        self, key: str, value: Value, *, tier: str | None = None, durable: bool | None = None,
        codec: str | None = None, pin: bool = False, ttl: float | None = None,
    ) -> None:
        validate_key(key)
        opts = {"tier": tier, "durable": durable, "codec": codec, "pin": pin, "ttl": ttl}
        self._retry(lambda link: self._put_on(link, key, value, **opts))

    def _put_on(self, link: _Link, key: str, value: Value, **options: Any) -> None:
        """A put over ``link`` from its first frame to its commit (Note [reconnect])."""
        if isinstance(value, bytes) and len(value) <= link.inline_max:
            # The common small case without a tensor round trip.
            meta = p.ObjectMeta("bytes", "uint8", (len(value),), 1)
            link.call_first(p.Put, key=key, nbytes=len(value), meta=meta, data=value, **options)
            return
        value_out = Outgoing(value)
        n = value_out.nbytes
        opts = {"key": key, "nbytes": n, "meta": value_out.meta, **options}
        if n <= link.inline_max:
            link.call_first(p.Put, data=value_out.flat().numpy().tobytes(), **opts)
            return
        arena = link.arena
        ready, _ = link.call_first(p.Put, **opts)
        try:
            if ready.offset is not None:
                extent = link.check_arena(arena)[ready.offset : ready.offset + n]
                value_out.write_into(link.copies, extent)
            else:  # no room to stage in the arena: the bytes go through the socket
                view = value_out.flat().numpy()
                for start in range(0, n, link.chunk_bytes):
                    link.send(p.PutChunk(id=0, put_id=ready.put_id, offset=start,
                                         data=view[start : start + link.chunk_bytes].tobytes()))
        except BaseException:
            link.abort(ready.put_id)
            raise
        link.call(p.PutCommit, put_id=ready.put_id)

    def stage(self, nbytes: int) -> Staging | None:
        # None while the daemon is away, as for a daemon that shares no arena: the caller stages
        # in its own memory. A staging outlives its connection: its buffer stays mapped, and its
        # release after a reconnect does nothing (the old daemon's reservations went with it).
        if nbytes <= 0:
            return None
        try:
            return self._retry(lambda link: self._stage_on(link, nbytes))
        except DaemonUnavailable:
            return None

    def _stage_on(self, link: _Link, nbytes: int) -> Staging | None:
        arena = link.arena
        if arena is None:
            if link.broken is not None:
                raise _Unsent(link.error())
            return None  # a uid the daemon does not trust with its arena stages in its own memory
        ready, _ = link.call_first(p.Put, key=staging_key(), nbytes=nbytes,
                                   meta=p.ObjectMeta("bytes", "uint8", (nbytes,), 1))
        if ready.offset is None:
            link.abort(ready.put_id)
            return None
        return Staging(arena[ready.offset : ready.offset + nbytes], lambda: link.abort(ready.put_id))

    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        validate_key(key)
        return self._retry(lambda link: self._get_on(link, key, device=device, out=out, first=True))

    def _get_on(self, link: _Link, key: str, *, device: Any = None, out: torch.Tensor | None = None,
                first: bool = False) -> Any:
        """A get over ``link``: its reply, its read from the arena, and its lease's release."""
        arena, mapping = link.arena, link.map
        ready, chunks = (link.call_first if first else link.call)(p.Get, key=key)
        try:
            if ready.offset is not None:
                link.check_arena(arena)
            return read_value(ReplySource(ready, chunks, arena, mapping), key, link.copies, device=device, out=out)
        finally:
            if ready.lease_id:
                link.release(ready.lease_id)

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
        link, call = self._retry(lambda link: (link, link.post_first(p.DeclarePrefix, keys=chain, done=done)))
        call.future.add_done_callback(lambda heard: self._heard_declared(link, ns, heard))
        link.declared.append(call)
        while len(link.declared) > _UNREAD_DECLARATIONS:
            try:
                oldest = link.declared.popleft()
            except IndexError:  # another thread took it
                break
            link.wait(oldest)

    def _heard_declared(self, link: _Link, ns: str, heard: Future[tuple[Any, list[bytes]]]) -> None:
        if heard.exception() is not None:
            return  # the connection broke: the next call says so
        reply = heard.result()[0]
        if isinstance(reply, p.Fail):
            log.warning("tierd: a prefix chain in %r was not declared: %s", ns, reply.message)
        elif reply.value is False and link is self._link:  # a later daemon may keep hints
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

    def healthy(self) -> bool:
        """Whether the daemon answers now: reconnects if it may (Note [reconnect]), then one
        cheap round trip, bounded by a short timeout. Never raises."""
        if self._link.broken is not None and self._link_lock.locked():
            return False  # another thread is trying to reconnect: not served now, and no waiting here
        try:
            done = self._retry(lambda link: link.wait(link.post_first(p.GetStats), timeout_s=_HEALTH_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - an answer, never an error
            return False
        return done is not None and isinstance(done[0], p.Ok)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._closed = True
        link = self._link  # a reconnect finishing now sees _closed and closes its own link
        link.close()  # calls in flight fail with StoreClosed; the arena goes with its last user
        try:
            link.sock.close()
        except OSError:
            pass


def connect(socket_path: str | os.PathLike[str] | None = None, *, timeout_s: float = CALL_TIMEOUT_S) -> RemoteStore:
    """Connect to the daemon (see ``tierd.connect``)."""
    return RemoteStore(socket_path, timeout_s=timeout_s)
