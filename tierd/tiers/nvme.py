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

Note [GPUDirect Storage]
    With ``gds`` on (kvikio imports and a CUDA device is present), chunks of
    CUDA tensors are written and read file <-> device memory by kvikio: by
    DMA where the GDS driver is loaded, through kvikio's own POSIX path
    (compatibility mode) otherwise; either way no tierd host copy. Their
    bytes never pass the CPU, so xxh3 cannot cover them: those chunks carry
    a device checksum (``device_checksum`` in tiers/gpu.py, computed with torch
    where the bytes are), marked by ``Chunk.kind``. Raw chunks written
    from host memory while ``gds`` is on get the device checksum too, so a
    GPU can read them without the CPU; a POSIX read verifies either kind.
    Compressed chunks stay on the POSIX path (decoding runs on the CPU).

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

from tierd import checksums
from tierd._buffers import address_view, aligned_buffer
from tierd._io import pread_all, pwrite_all
from tierd.codecs import Chunk, ChunkMode, Codec
from tierd.errors import Busy, CorruptObject, InvalidArgument, MediaError, OutOfSpace, StoreClosed, TierdError
from tierd.tiers.alloc import ExtentAllocator
from tierd.tiers.base import Tier, TierUsage
from tierd.tiers.gpu import gds_status

__all__ = ["NvmeTier", "NvmeLocation", "CHECKSUM_XXH3", "CHECKSUM_DEVICE"]

log = logging.getLogger("tierd.tiers.nvme")

BLOCK = 4096


CHECKSUM_XXH3 = checksums.XXH3  # the kinds of Chunk.kind
CHECKSUM_DEVICE = checksums.DEVICE


class NvmeLocation(msgspec.Struct, frozen=True, array_like=True):
    """An object's chunks on nvme (the durable index stores this, positionally: keep the layout)."""

    chunks: tuple[Chunk, ...]


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
        gds: bool = False,
    ) -> None:
        self.path = Path(path)
        self.slab_dir = self.path / "slabs"
        self.slab_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / "LOCK", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise Busy(
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

        self.gds = False  # Note [GPUDirect Storage]
        self.gds_reason = "off (tiers.nvme.gds)"
        if gds:
            self.gds, self.gds_reason = gds_status()
        self._cufiles: dict[int, Any] = {}

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
                raise StoreClosed("nvme tier is closed")
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

    def _free_chunks(self, chunks: list[Chunk]) -> None:
        with self._lock:
            for c in chunks:
                self._allocs[c.slab].free(c.offset)

    def span(self, location: NvmeLocation) -> int:
        """The tier size ``location`` needs: where its last chunk ends, slabs before it included."""
        full = self._slab_sizes[0] if self._slab_sizes else BLOCK  # every slab but the last is this size
        return max((c.slab * full + c.offset + c.stored for c in location.chunks), default=0)

    def reserve(self, location: NvmeLocation) -> None:
        """Mark a stored location as in use (rebuilding state from the index on open).

        Raises:
            ValueError: the location overlaps another or lies outside the tier.
        """
        done: list[Chunk] = []
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

    def _check_linked(self, chunks: list[Chunk]) -> None:
        for slab in sorted({c.slab for c in chunks}):
            if os.fstat(self._fds[slab]).st_nlink == 0:
                raise MediaError(
                    f"nvme tier {str(self.path)!r}: slab file {self._slab_path(slab).name} was removed while in "
                    "use; objects stored before stay readable until the daemon stops; restore the directory "
                    "and restart the daemon"
                )

    def write(self, src: torch.Tensor, *, codec: Codec, itemsize: int, durable: bool) -> NvmeLocation:
        """Store flat uint8 ``src`` (host memory; device memory too when :attr:`gds` is on)."""
        self._check_writable()
        n = src.numel()
        starts = range(0, n, self.chunk_size)
        on_device = src.device.type == "cuda"
        if on_device and (not self.gds or codec.name != "none"):
            raise InvalidArgument("nvme writes from device memory need gds on and codec none")
        write_chunk = self._write_chunk_device if on_device else self._write_chunk
        futures = [
            self._pool.submit(write_chunk, src[s : s + self.chunk_size], codec, itemsize)
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

    def _gather(self, futures: list[Future[Chunk]]) -> tuple[list[Chunk], BaseException | None]:
        chunks: list[Chunk] = []
        error: BaseException | None = None
        for fut in futures:  # wait for all, even after a failure: none may still write
            try:
                chunks.append(fut.result())
            except BaseException as exc:  # noqa: BLE001 - re-raised by the caller
                error = error or exc
        return chunks, error

    def _write_chunk(self, src: torch.Tensor, codec: Codec, itemsize: int) -> Chunk:
        raw_len = src.numel()
        data = address_view(src.data_ptr(), raw_len)
        mode, payload = codec.encode(data, itemsize)
        stored = len(payload)
        if self.gds and mode == ChunkMode.RAW:  # readable straight into a GPU (Note [GPUDirect Storage])
            kind = CHECKSUM_DEVICE
            checksum = checksums.device_checksum(src)
        else:
            kind = CHECKSUM_XXH3
            checksum = checksums.xxh3(payload)
        slab, offset = self._alloc_extent(stored)
        chunk = Chunk(slab, offset, stored, raw_len, int(mode), checksum, kind)
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

    def _cufile(self, slab: int) -> Any:
        """kvikio's handle on slab ``slab`` (opened once; the slab exists: it holds the chunk)."""
        with self._lock:
            handle = self._cufiles.get(slab)
            if handle is None:
                import kvikio

                handle = kvikio.CuFile(self._slab_path(slab), "r+")
                self._cufiles[slab] = handle
            return handle

    def _write_chunk_device(self, src: torch.Tensor, codec: Codec, itemsize: int) -> Chunk:
        raw_len = src.numel()
        slab, offset = self._alloc_extent(raw_len)
        chunk = Chunk(slab, offset, raw_len, raw_len, int(ChunkMode.RAW), checksums.device_checksum(src),
                          CHECKSUM_DEVICE)
        try:
            written = self._cufile(slab).pwrite(src, raw_len, offset).get()
            if written != raw_len:
                raise OSError(errno.EIO, f"short GDS write ({written} of {raw_len} bytes)")
        except OSError as exc:
            self._free_chunks([chunk])
            raise _io_error(exc, "writing a chunk from the GPU", self.path) from exc
        return chunk

    def _read_chunk_device(self, c: Chunk, dest: torch.Tensor, itemsize: int) -> None:
        if c.mode != ChunkMode.RAW or c.kind != CHECKSUM_DEVICE:  # POSIX into host memory, then one copy
            staged = torch.empty(c.raw, dtype=torch.uint8, pin_memory=True)
            self._read_chunk(c, staged, itemsize)
            dest.copy_(staged)
            return
        try:
            got = self._cufile(c.slab).pread(dest, c.raw, c.offset).get()
        except OSError as exc:
            raise _io_error(exc, "reading a chunk into the GPU", self.path) from exc
        if got != c.raw:
            raise MediaError(f"nvme tier {str(self.path)!r}: short GDS read ({got} of {c.raw} bytes)")
        self._verify(c, dest)

    def read_into(self, location: NvmeLocation, dest: torch.Tensor, *, itemsize: int) -> None:
        """Fill flat uint8 ``dest`` (host memory; device memory too when :attr:`gds` is on)."""
        futures: list[Future[None]] = []
        pos = 0
        read_chunk = self._read_chunk
        if dest.device.type == "cuda":
            if not self.gds:
                raise InvalidArgument("nvme reads into device memory need gds on")
            read_chunk = self._read_chunk_device
        for c in location.chunks:
            futures.append(self._pool.submit(read_chunk, c, dest[pos : pos + c.raw], itemsize))
            pos += c.raw
        if pos != dest.numel():
            raise CorruptObject(f"stored chunks hold {pos} bytes, expected {dest.numel()}")
        for fut in futures:
            fut.result()

    def _read_chunk(self, c: Chunk, dest: torch.Tensor, itemsize: int) -> None:
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
                if whole < c.raw:
                    bounce = self._bounce()
                    pread_all(fd, bounce[:BLOCK], c.offset + whole)
                    out[whole:] = bounce[: c.raw - whole]
                self._verify(c, dest)
                return
            bounce = self._bounce()
            span = _padded(c.stored) if self.direct else c.stored
            pread_all(fd, bounce[:span], c.offset)
            stored = bounce[: c.stored]
            self._verify(c, stored)
            c.decode_into(stored, out, itemsize)
        except OSError as exc:
            raise _io_error(exc, "reading a chunk", self.path) from exc

    def _verify(self, c: Chunk, stored: torch.Tensor | memoryview) -> None:
        """Raise CorruptObject unless ``stored`` (chunk ``c``'s bytes as read) is intact."""
        if not c.intact(stored):
            raise CorruptObject(
                f"checksum mismatch in {self._slab_path(c.slab)} at offset {c.offset} "
                f"({c.stored} bytes): stored {c.checksum:016x}, read {checksums.checksum(c.kind, stored):016x}"
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
        for handle in self._cufiles.values():
            handle.close()
        self._cufiles.clear()
        for fd in self._fds.values():
            try:
                os.fdatasync(fd)
            except OSError as exc:
                log.warning("fdatasync of a slab at close failed: %s", exc)
            os.close(fd)
        self._fds.clear()
        os.close(self._lock_fd)
