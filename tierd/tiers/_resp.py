"""GET replies read off a redis-py connection's socket straight into the caller's memory.

redis-py (with or without hiredis) turns every bulk reply into a new ``bytes``:
for a 1 MiB chunk that is two copies on top of the kernel's (the parser's buffer,
then the object), and the remote tier made a third into the destination. Here
the pipelined GETs go out through redis-py's connection (its auth, TLS, database
and cluster routing stay redis-py's), and each reply's payload is received with
``recv_into`` into the destination itself: one copy, the kernel's.

Only what this reader can be sure of is handled: ``$<n>`` bulk strings of
the expected length and nils (``$-1``, RESP3's ``_``); a RESP3 push (``>``)
or any other reply is left to redis-py. Anything else raises :class:`Unexpected`
after the connection is disconnected (its stream position is unknown), with a
``kind`` saying what the caller may do:

* ``"protocol"``: an error reply (MOVED, ASK, ...), a length other than the
  chunk's, a reply that is not RESP2: read the batch again through redis-py,
  which follows redirects and refreshes a cluster's topology;
* ``"connection"``: the node did not answer (refused, reset, timed out): one
  server's error to report; on a cluster, redis-py's read is what tells it to
  look for the new topology;
* ``"unsupported"``: this connection can never be read this way (no plain
  socket, as with client-side caching): stop trying.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["Unexpected", "get_into"]

_SCRATCH = 1 << 16


class Unexpected(Exception):
    """The fast path cannot serve this batch; ``kind`` is ``protocol``, ``connection`` or ``unsupported``."""

    def __init__(self, why: str, kind: str = "protocol") -> None:
        super().__init__(why)
        self.kind = kind


class _Reader:
    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.buf = bytearray(_SCRATCH)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):  # a line longer than what is left: move it to the front
            n = self.end - self.start
            self.buf[:n] = self.buf[self.start : self.end]
            self.start, self.end = 0, n
            if n == len(self.buf):
                raise Unexpected("a reply header longer than 64 KiB")
        got = self.sock.recv_into(self.view[self.end :])
        if got == 0:
            raise Unexpected("the server closed the connection", "connection")
        self.end += got

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.start, self.end)
            if i >= 0:
                out = bytes(self.buf[self.start : i])
                self.start = i + 2
                return out
            self._fill()

    def read_into(self, dest: memoryview) -> None:
        n = len(dest)
        have = min(n, self.end - self.start)
        dest[:have] = self.view[self.start : self.start + have]
        self.start += have
        while have < n:
            got = self.sock.recv_into(dest[have:])
            if got == 0:
                raise Unexpected("the server closed the connection", "connection")
            have += got

    def expect_crlf(self) -> None:
        # Into the scratch buffer, not a 2-byte read of its own: the same recv brings the next
        # reply's header (and the start of its payload), one syscall a chunk fewer.
        while self.end - self.start < 2:
            self._fill()
        if self.buf[self.start : self.start + 2] != b"\r\n":
            raise Unexpected("a bulk reply without its CRLF")
        self.start += 2


def get_into(pool: Any, keys: Sequence[str], sink: Callable[[int, int], memoryview | None]) -> list[int | None]:
    """GET ``keys`` in one pipeline on a connection from redis-py ``pool``.

    ``sink(i, n)`` says where reply ``i``'s ``n`` bytes go: a memoryview of
    exactly ``n`` bytes, or None when ``n`` is not what the caller expects
    (``Unexpected``, before anything is read). Returns each reply's length,
    None for a missing key.

    Raises:
        Unexpected: the fast path cannot serve this batch (see the module's text).
    """
    try:
        conn = pool.get_connection()
    except Exception as exc:  # noqa: BLE001 - a dead node: the caller decides (its kind says so)
        raise Unexpected(str(exc), "connection") from exc
    try:
        if not hasattr(conn, "pack_commands"):
            raise Unexpected(f"{type(conn).__name__} does not pack commands", "unsupported")
        conn.connect()  # a no-op when connected; a pooled connection may not be yet
        sock = getattr(conn, "_sock", None)
        if sock is None:
            raise Unexpected(f"{type(conn).__name__} has no plain socket", "unsupported")
        conn.send_packed_command(conn.pack_commands([("GET", k) for k in keys]))
        reader = _Reader(sock)
        lengths: list[int | None] = []
        for i in range(len(keys)):
            header = reader.line()
            if header == b"_":  # RESP3's null (redis-py 8 speaks RESP3 where the server does)
                lengths.append(None)
                continue
            if header[:1] != b"$":
                raise Unexpected(f"reply {header[:80]!r}")  # -MOVED, -ASK, -ERR...: redis-py's to handle
            n = int(header[1:])
            if n < 0:
                lengths.append(None)
                continue
            dest = sink(i, n)
            if dest is None:
                raise Unexpected(f"reply {i} holds {n} bytes, not the chunk's")
            reader.read_into(dest)
            reader.expect_crlf()
            lengths.append(n)
        if reader.start != reader.end:
            raise Unexpected("bytes after the last reply")
    except BaseException as exc:
        try:
            conn.disconnect()  # where the stream stands is unknown: this connection is not reused as it is
        finally:
            pool.release(conn)
        if isinstance(exc, Unexpected) or not isinstance(exc, Exception):
            raise
        kind = "connection" if isinstance(exc, OSError) or "Connection" in type(exc).__name__ \
            or "Timeout" in type(exc).__name__ else "protocol"
        raise Unexpected(str(exc), kind) from exc  # a socket error, a timeout, redis-py's own errors
    pool.release(conn)
    return lengths
