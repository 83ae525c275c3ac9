"""The ``nvme`` tier: preallocated slab files, O_DIRECT, chunked parallel I/O.

Layout of ``[tiers.nvme] path``::

    LOCK                 flock'ed by the one process that owns the directory
    slabs/slab-00000     slab files of ``slab_size`` bytes, fallocate'd when first used
    index.lmdb/          the durable index (owned by the engine, not by this tier)

An object is split into chunks of ``chunk_size`` raw bytes. Each chunk is
encoded on its own, gets its own 4 KiB-aligned extent in some slab and its
own xxh3 checksum of the stored bytes, and is written or read by one of
``io_threads`` workers: several requests are in flight for one large object,
and a fragmented tier still takes a large object (no contiguous run needed).

Note [O_DIRECT alignment]
    O_DIRECT wants the buffer address, the file offset and the length all
    aligned to the logical block size (4 KiB covers every device we meet).
    Extents are aligned by the allocator. A source that starts on a page
    boundary (the host arena always does) is written straight from its
    memory with the length rounded up to the page: the rounding never leaves
    the source's last page, so it never touches unmapped memory. Other
    sources, encoded chunks, and the partial last block of a read into a
    caller's buffer (whose bytes past the end belong to someone else) go
    through a per-thread aligned bounce buffer.

Note [durability]
    A durable write is acknowledged only after every slab it touched has been
    fdatasync'ed; the engine then commits the index entry in LMDB (which
    fsyncs too). Extents written but never committed are not in the index
    and are therefore free again when the tier is reopened.

Note [medium faults]
    The directory can go read-only (a filesystem remounted ro after errors,
    a read-only bind mount) or be removed while the daemon runs. Writes
    through slab files opened earlier may still "succeed" then: into files
    that no longer have a name, lost at the next start. So every write
    first asks statvfs whether the directory is still there and writable,
    and checks after writing that the slabs it touched are still linked;
    otherwise it fails with a MediaError naming the path and stores
    nothing. Reads go on: what was acknowledged stays readable through the
    open files while the daemon runs, and the host tier keeps serving.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import torch
import xxhash

from tierd._buffers import address_view, aligned_buffer
from tierd._io import pread_all, pwrite_all
from tierd.codecs import ChunkMode, Codec, decode_chunk
from tierd.errors import CorruptObject, MediaError, OutOfSpace, TierdError
from tierd.tiers.alloc import ExtentAllocator
from tierd.tiers.base import Tier, TierUsage

__all__ = ["NvmeTier", "NvmeLocation", "NvmeChunk"]

log = logging.getLogger("tierd.tiers.nvme")

BLOCK = 4096


class NvmeChunk(msgspec.Struct, frozen=True, array_like=True):
    """One stored chunk: ``stored`` bytes at ``offset`` of slab ``slab``."""

    slab: int
    offset: int
    stored: int
    raw: int
    mode: int
    checksum: int


class NvmeLocation(msgspec.Struct, frozen=True, array_like=True):
    chunks: tuple[NvmeChunk, ...]


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _io_error(exc: OSError, what: str, path: Path) -> TierdError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutOfSpace(f"the disk under nvme tier {str(path)!r} is full while {what}; free disk space or lower tiers.nvme.size")
    return MediaError(f"nvme tier {str(path)!r}: {what} failed: {exc.strerror or exc}")


def probe_direct(path: Path) -> str | None:
    """None if O_DIRECT works in ``path``, else why not."""
    probe = path / ".direct-probe"
    try:
        fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
    except OSError as exc:
        return f"open with O_DIRECT refused ({exc.strerror})"
    try:
        buf = aligned_buffer(BLOCK)
        os.pwritev(fd, [memoryview(buf)], 0)
        os.preadv(fd, [memoryview(buf)], 0)
        return None
    except OSError as exc:
        return f"O_DIRECT I/O refused ({exc.strerror})"
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)


class NvmeTier(Tier):
    """Slab files under ``path`` holding at most ``capacity_bytes``."""

    name = "nvme"
    persistent = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        capacity_bytes: int,
        *,
        slab_size: int = 1 << 30,
        chunk_size: int = 4 << 20,
        io_threads: int = 8,
        direct: bool = True,
    ) -> None:
        self.path = Path(path)
        self.slab_dir = self.path / "slabs"
        self.slab_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise TierdError(
                f"nvme directory {str(self.path)!r} is in use by another tierd store; "
                "connect to that one, or give this store its own tiers.nvme.path"
            ) from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())

        self.chunk_size = chunk_size
        self.direct = False
        self.direct_refused: str | None = None
        if direct:
            self.direct_refused = probe_direct(self.path)
            self.direct = self.direct_refused is None
            if not self.direct:
                log.warning("%s: %s; using buffered I/O", self.path, self.direct_refused)

        capacity = capacity_bytes // BLOCK * BLOCK
        slab_size = max(BLOCK, slab_size // BLOCK * BLOCK)
        self._slab_sizes = [min(slab_size, capacity - start) for start in range(0, capacity, slab_size)]
        self._allocs = [ExtentAllocator(size, block=BLOCK) for size in self._slab_sizes]
        self._capacity = capacity
        self._fds: dict[int, int] = {}
        self._cursor = 0  # slab tried first: keeps consecutive chunks close together
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="tierd-nvme")
        self._closed = False
        # Slabs that already exist (a reopen) are opened now so reads of
        # durable objects need no lazy creation.
        for i in range(len(self._slab_sizes)):
            if self._slab_path(i).exists():
                self._open_slab(i)

    # -- slabs ---------------------------------------------------------------

    def _slab_path(self, i: int) -> Path:
        return self.slab_dir / f"slab-{i:05d}"

    def _open_slab(self, i: int) -> int:
        """Open (creating and preallocating) slab ``i``; caller holds the lock or is __init__."""
        fd = self._fds.get(i)
        if fd is not None:
            return fd
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        path = self._slab_path(i)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise _io_error(exc, f"opening slab {path.name}", self.path) from exc
        try:
            if os.fstat(fd).st_size < self._slab_sizes[i]:
                os.posix_fallocate(fd, 0, self._slab_sizes[i])
        except OSError as exc:
            os.close(fd)
            raise _io_error(exc, f"preallocating slab {path.name}", self.path) from exc
        self._fds[i] = fd
        return fd

    def _alloc_extent(self, nbytes: int) -> tuple[int, int]:
        """(slab, offset) of a new extent; raises OutOfSpace."""
        with self._lock:
            if self._closed:
                raise TierdError("nvme tier is closed")
            order = [self._cursor, *range(len(self._allocs))]
            for i in order:
                offset = self._allocs[i].alloc(nbytes)
                if offset is None:
                    continue
                try:
                    self._open_slab(i)
                except TierdError:
                    self._allocs[i].free(offset)
                    raise
                self._cursor = i
                return i, offset
        raise OutOfSpace(
            f"nvme tier {str(self.path)!r} is full ({self._capacity} bytes); "
            "raise tiers.nvme.size or delete objects"
        )

    def _free_chunks(self, chunks: list[NvmeChunk]) -> None:
        with self._lock:
            for c in chunks:
                self._allocs[c.slab].free(c.offset)

    def reserve(self, location: NvmeLocation) -> None:
        """Mark a stored location as in use (rebuilding state from the index on open).

        Raises:
            ValueError: the location overlaps another or lies outside the tier.
        """
        done: list[NvmeChunk] = []
        with self._lock:
            try:
                for c in location.chunks:
                    if not 0 <= c.slab < len(self._allocs) or c.slab not in self._fds:
                        raise ValueError(f"slab {c.slab} is missing or outside tiers.nvme.size")
                    self._allocs[c.slab].reserve(c.offset, c.stored)
                    done.append(c)
            except ValueError:
                for c in done:
                    self._allocs[c.slab].free(c.offset)
                raise

    def _bounce(self) -> memoryview:
        buf = getattr(self._local, "bounce", None)
        if buf is None:
            buf = self._local.bounce = aligned_buffer(_padded(self.chunk_size))
        return memoryview(buf)

    # -- Tier ----------------------------------------------------------------

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def usage(self) -> TierUsage:
        with self._lock:
            used = sum(a.used_bytes for a in self._allocs)
            largest_each = [a.largest_free_bytes() for a in self._allocs]
        free = self._capacity - used
        # No extent spans slabs, so a slab boundary is not fragmentation:
        # measure how scattered the free space is within each slab.
        frag = 0.0 if free == 0 else 1.0 - sum(largest_each) / free
        largest = max(largest_each, default=0)
        return TierUsage(self._capacity, used, largest, frag)

    def _check_writable(self) -> None:
        """Refuse to write into a directory that is read-only or gone (Note [medium faults])."""
        try:
            flags = os.statvfs(self.slab_dir).f_flag
        except OSError as exc:
            raise MediaError(
                f"nvme tier {str(self.path)!r}: its slab directory is gone ({exc.strerror}); objects stored "
                "before stay readable until the daemon stops; restore the directory and restart the daemon"
            ) from exc
        if flags & os.ST_RDONLY:
            raise MediaError(
                f"nvme tier {str(self.path)!r} is on a read-only filesystem now; nothing more can be stored "
                "there (objects already there stay readable); remount it read-write"
            )

    def _check_linked(self, chunks: list[NvmeChunk]) -> None:
        for slab in sorted({c.slab for c in chunks}):
            if os.fstat(self._fds[slab]).st_nlink == 0:
                raise MediaError(
                    f"nvme tier {str(self.path)!r}: slab file {self._slab_path(slab).name} was removed while in "
                    "use; objects stored before stay readable until the daemon stops; restore the directory "
                    "and restart the daemon"
                )

    def write(self, src: torch.Tensor, *, codec: Codec, itemsize: int, durable: bool) -> NvmeLocation:
        self._check_writable()
        n = src.numel()
        starts = range(0, n, self.chunk_size)
        futures = [
            self._pool.submit(self._write_chunk, src[s : s + self.chunk_size], codec, itemsize)
            for s in starts
        ]
        chunks, error = self._gather(futures)
        if error is None:
            try:
                self._check_linked(chunks)
                if durable:
                    for slab in sorted({c.slab for c in chunks}):
                        os.fdatasync(self._fds[slab])  # Note [durability]
            except MediaError as exc:  # an OSError too: first
                error = exc
            except OSError as exc:
                error = _io_error(exc, "fdatasync", self.path)
        if error is not None:
            self._free_chunks(chunks)
            raise error
        return NvmeLocation(tuple(chunks))

    def _gather(self, futures: list[Future[NvmeChunk]]) -> tuple[list[NvmeChunk], BaseException | None]:
        chunks: list[NvmeChunk] = []
        error: BaseException | None = None
        for fut in futures:  # wait for all, even after a failure: none may still write
            try:
                chunks.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                error = error or exc
        return chunks, error

    def _write_chunk(self, src: torch.Tensor, codec: Codec, itemsize: int) -> NvmeChunk:
        raw_len = src.numel()
        data = address_view(src.data_ptr(), raw_len)
        mode, payload = codec.encode(data, itemsize)
        stored = len(payload)
        checksum = xxhash.xxh3_64_intdigest(payload)
        slab, offset = self._alloc_extent(stored)
        chunk = NvmeChunk(slab, offset, stored, raw_len, int(mode), checksum)
        try:
            fd = self._fds[slab]
            if not self.direct:
                pwrite_all(fd, memoryview(payload), offset)
            elif mode == ChunkMode.RAW and src.data_ptr() % BLOCK == 0:
                # Note [O_DIRECT alignment]: straight from the source's pages.
                pwrite_all(fd, address_view(src.data_ptr(), _padded(stored)), offset)
            else:
                bounce = self._bounce()
                bounce[:stored] = payload
                pwrite_all(fd, bounce[: _padded(stored)], offset)
        except OSError as exc:
            self._free_chunks([chunk])
            raise _io_error(exc, "writing a chunk", self.path) from exc
        return chunk

    def read_into(self, location: NvmeLocation, dest: torch.Tensor, *, itemsize: int) -> None:
        futures: list[Future[None]] = []
        pos = 0
        for c in location.chunks:
            futures.append(self._pool.submit(self._read_chunk, c, dest[pos : pos + c.raw], itemsize))
            pos += c.raw
        if pos != dest.numel():
            raise CorruptObject(f"stored chunks hold {pos} bytes, expected {dest.numel()}")
        for fut in futures:
            fut.result()

    def _read_chunk(self, c: NvmeChunk, dest: torch.Tensor, itemsize: int) -> None:
        fd = self._fds.get(c.slab)
        if fd is None:
            raise MediaError(f"nvme tier {str(self.path)!r}: slab {c.slab} is not open")
        out = address_view(dest.data_ptr(), c.raw)
        try:
            if c.mode == ChunkMode.RAW and (not self.direct or dest.data_ptr() % BLOCK == 0):
                # Whole blocks straight into the destination; a partial last
                # block through the bounce buffer (Note [O_DIRECT alignment]).
                whole = c.raw if not self.direct else c.raw // BLOCK * BLOCK
                pread_all(fd, out[:whole], c.offset)
                hasher = xxhash.xxh3_64(out[:whole])
                if whole < c.raw:
                    bounce = self._bounce()
                    pread_all(fd, bounce[:BLOCK], c.offset + whole)
                    out[whole:] = bounce[: c.raw - whole]
                    hasher.update(out[whole:])
                self._verify(c, hasher.intdigest())
                return
            bounce = self._bounce()
            span = _padded(c.stored) if self.direct else c.stored
            pread_all(fd, bounce[:span], c.offset)
            stored = bounce[: c.stored]
            self._verify(c, xxhash.xxh3_64_intdigest(stored))
            decode_chunk(c.mode, stored, out, itemsize)
        except OSError as exc:
            raise _io_error(exc, "reading a chunk", self.path) from exc

    def _verify(self, c: NvmeChunk, checksum: int) -> None:
        if checksum != c.checksum:
            raise CorruptObject(
                f"checksum mismatch in {self._slab_path(c.slab)} at offset {c.offset} "
                f"({c.stored} bytes): stored {c.checksum:016x}, read {checksum:016x}"
            )

    def free(self, location: NvmeLocation) -> None:
        self._free_chunks(list(location.chunks))

    def stored_nbytes(self, location: Any) -> int:
        return sum(c.stored for c in location.chunks)

    def slab_file(self, slab: int) -> Path:
        """Path of slab ``slab`` (for tools and tests that inspect the medium)."""
        return self._slab_path(slab)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.warning("fdatasync of a slab at close failed: %s", exc)
            os.close(fd)
        self._fds.clear()
        os.close(self._lock_fd)
