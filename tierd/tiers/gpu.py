"""The GPU side: pinned host arena, copy streams, the ``gpu`` tier, GPUDirect Storage.

Everything here is a no-op on a machine without CUDA: nothing calls into
CUDA until a CUDA tensor is seen, so CPU-only users never initialise it.

Note [pinned arena]
    The copy engines of a GPU move bytes by DMA only from page-locked host
    memory; from pageable memory the driver stages through its own bounce
    buffer at a fraction of the speed. Instead of allocating pinned buffers
    per object (cudaHostAlloc is slow and fragments), each client registers
    the host arena it maps, once, with cudaHostRegister: then a copy between
    a GPU tensor and an arena extent is one DMA, with no staging copy.
    Drivers refuse very large single registrations, so the arena is
    registered in pieces (``tiers.gpu.pin_piece``, halved on refusal down to
    2 MiB). Registration locks pages: where ``ulimit -l`` applies (not root,
    no CAP_IPC_LOCK) only as much as it allows is registered, and the log
    says what to raise. A copy touching an unregistered part still works,
    through the driver's staging path, only slower.

Note [copy streams]
    Copies run on two streams per device, one per direction, never on the
    caller's stream, so a prefetch (host to device) overlaps the kernels of
    the compute stream and a stash (device to host) does not wait behind
    them more than it must: the copy stream first waits for the caller's
    stream (the tensor may still be being produced there), then copies, then
    records an event. The host thread waits on that event before the arena
    extent is committed or released, because after that the extent may be
    reused; the caller's tensor is kept alive until then.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tierd.errors import InvalidArgument

__all__ = [
    "PinnedArena", "CopyEngine", "GpuTier", "plan_registration", "gds_status", "cuda_tensor",
]

log = logging.getLogger("tierd.tiers.gpu")

MIN_PIECE = 2 << 20


def cuda_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cuda"


# -- pinned registration ----------------------------------------------------------


def memlock_allowance() -> int | None:
    """Bytes this process may lock (``ulimit -l``), or None when unlimited or not enforced (root)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
        return None
    return int(soft)


def plan_registration(size: int, piece: int, allowance: int | None) -> tuple[list[tuple[int, int]], int]:
    """The (offset, length) pieces to register of a ``size``-byte arena, and the bytes left out.

    Pieces are ``piece`` bytes (the last one shorter); with an ``allowance``
    (``ulimit -l``) the plan stops at whole pieces that fit within it.
    """
    if piece < MIN_PIECE or piece % MIN_PIECE:
        raise InvalidArgument(f"tiers.gpu.pin_piece must be a multiple of 2 MiB, got {piece}")
    budget = size if allowance is None else min(size, allowance)
    pieces = []
    offset = 0
    while offset < size:
        length = min(piece, size - offset)
        if offset + length > budget:
            length = (budget - offset) // MIN_PIECE * MIN_PIECE
            if length > 0:
                pieces.append((offset, length))
                offset += length
            break
        pieces.append((offset, length))
        offset += length
    return pieces, size - offset


class PinnedArena:
    """Registers ``[address, address + size)`` for DMA in pieces (Note [pinned arena]).

    ``register(ptr, n) -> error string or None`` and ``unregister(ptr)`` are
    injectable so that the piece logic is testable without a GPU.
    """

    def __init__(
        self, address: int, size: int, *, piece: int = 1 << 30, allowance: int | None = None,
        register: Callable[[int, int], str | None] | None = None,
        unregister: Callable[[int], None] | None = None,
    ) -> None:
        self.address = address
        self.size = size
        self._register = register or _cuda_register
        self._unregister = unregister or _cuda_unregister
        self.registered: list[tuple[int, int]] = []
        self.problem: str | None = None
        plan, left_out = plan_registration(size, piece, allowance)
        if left_out:
            self.problem = (
                f"pinned {sum(n for _, n in plan) >> 20} MiB of the {size >> 20} MiB host arena: ulimit -l allows "
                f"{(allowance or 0) >> 20} MiB; raise it (`ulimit -l unlimited`, LimitMEMLOCK=infinity in the "
                "systemd unit, --ulimit memlock=-1 in Docker) so that every copy is a DMA"
            )
        for offset, length in plan:
            if not self._register_piece(offset, length):
                break
        if self.problem:
            log.warning("%s", self.problem)

    def _register_piece(self, offset: int, length: int) -> bool:
        """Register one planned piece, halving it while the driver refuses; False to stop."""
        step = length
        end = offset + length
        while offset < end:
            n = min(step, end - offset)
            error = self._register(self.address + offset, n)
            if error is None:
                self.registered.append((offset, n))
                offset += n
                continue
            if step // 2 >= MIN_PIECE:
                step = step // 2 // MIN_PIECE * MIN_PIECE
                continue
            self.problem = (
                f"cudaHostRegister refused {n >> 20} MiB at arena offset {offset >> 20} MiB ({error}); "
                f"pinned {self.pinned_bytes >> 20} of {self.size >> 20} MiB. Copies from the rest go through "
                "the driver's staging buffer: check `ulimit -l`, free memory, or set tiers.gpu.pin = false"
            )
            return False
        return True

    @property
    def pinned_bytes(self) -> int:
        return sum(n for _, n in self.registered)

    def close(self) -> None:
        """Unregister every piece (before the arena is unmapped)."""
        for offset, _n in self.registered:
            try:
                self._unregister(self.address + offset)
            except Exception as exc:  # noqa: BLE001 - at teardown there is nothing left to do
                log.debug("cudaHostUnregister failed: %s", exc)
        self.registered.clear()


def _cuda_register(ptr: int, n: int) -> str | None:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(ptr, n, 1)  # cudaHostRegisterPortable: every context sees it
    code = int(getattr(err, "value", err))
    if code == 0:
        return None
    _clear_last_error()
    return f"{cudart.cudaGetErrorString(err)} (cudaError {code})"


def _clear_last_error() -> None:
    """Reset the CUDA runtime's last error after a refused registration.

    Otherwise torch's next kernel-launch check (``cudaGetLastError``) would
    report our refusal as its own failure. torch binds no
    ``cudaGetLastError``, so it is called in the libcudart torch loaded.
    """
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line}
        for path in paths:
            ctypes.CDLL(path).cudaGetLastError()
    except OSError as exc:
        log.debug("could not clear the CUDA error state: %s", exc)


def _cuda_unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


# -- copies -----------------------------------------------------------------------


@dataclass
class _Streams:
    to_host: Any
    to_device: Any


class CopyEngine:
    """Copies between GPU tensors and the host arena (Notes [pinned arena], [copy streams]).

    One per store. ``arena`` is the flat uint8 tensor over the mapped arena;
    it is registered on the first copy, unregistered at :meth:`close`.
    """

    def __init__(self, arena: torch.Tensor | None, *, pin: bool = True, piece: int = 1 << 30) -> None:
        self._arena = arena
        self._pin = pin
        self._piece = piece
        self._pinned: PinnedArena | None = None
        self._streams: dict[int, _Streams] = {}
        self._lock = threading.Lock()

    def _streams_for(self, device: torch.device) -> _Streams:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with self._lock:
            if self._pinned is None and self._pin and self._arena is not None and self._arena.numel():
                self._pinned = PinnedArena(self._arena.data_ptr(), self._arena.numel(), piece=self._piece,
                                           allowance=memlock_allowance())
            streams = self._streams.get(index)
            if streams is None:
                streams = _Streams(torch.cuda.Stream(index), torch.cuda.Stream(index))
                self._streams[index] = streams
            return streams

    @property
    def pinned_bytes(self) -> int:
        return 0 if self._pinned is None else self._pinned.pinned_bytes

    def to_host(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """Copy CUDA tensor ``src`` into ``dest`` (flat uint8 bytes on the CPU, usually an arena extent).

        Returns once the bytes are in ``dest``.
        """
        stream = self._streams_for(src.device).to_host
        caller = torch.cuda.current_stream(src.device)
        stream.wait_stream(caller)  # src may still be being written on the caller's stream
        with torch.cuda.stream(stream):
            flat = src.detach().contiguous().reshape(-1).view(torch.uint8)
            dest.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()

    def to_device(self, dest: torch.Tensor, src: torch.Tensor) -> None:
        """Copy host bytes ``src`` (flat uint8) into CUDA tensor ``dest`` (contiguous or not).

        Returns once the copy finished, so ``src`` may be released; work the
        caller queues on its stream afterwards sees the bytes.
        """
        stream = self._streams_for(dest.device).to_device
        stream.wait_stream(torch.cuda.current_stream(dest.device))  # dest may still be in use there
        with torch.cuda.stream(stream):
            if dest.is_contiguous():
                dest.reshape(-1).view(torch.uint8).copy_(src, non_blocking=True)
            else:  # the bytes land contiguous, then one device-side strided copy
                staged = torch.empty(dest.shape, dtype=dest.dtype, device=dest.device)
                staged.reshape(-1).view(torch.uint8).copy_(src, non_blocking=True)
                dest.copy_(staged)
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()

    def close(self) -> None:
        with self._lock:
            if self._pinned is not None:
                torch.cuda.synchronize()
                self._pinned.close()
                self._pinned = None
            self._arena = None


# -- the gpu tier -----------------------------------------------------------------


@dataclass
class _Entry:
    value: torch.Tensor
    nbytes: int
    dirty: bool  # only here: written down to the store below when evicted


class GpuTier:
    """A per-process cache of device tensors under a byte budget, least recently used first out.

    Pure bookkeeping: the store around it decides what an eviction does
    (``evict(key, tensor)`` writes a dirty entry down; a clean one has its
    copy below already). ``device`` is any torch device (tests run it on
    the CPU; the store only builds one on a CUDA device).
    """

    name = "gpu"

    def __init__(self, device: torch.device | str, budget_bytes: int) -> None:
        self.device = torch.device(device)
        self.capacity_bytes = budget_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.hits = self.misses = self.bytes_in = self.bytes_out = self.demoted_bytes = 0
        self.lock = threading.RLock()

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def lookup(self, key: str) -> torch.Tensor | None:
        with self.lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            self.bytes_out += entry.nbytes
            return entry.value

    def peek(self, key: str) -> torch.Tensor | None:
        """The cached tensor, without counting an access."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def dirty(self, key: str) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry.dirty

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity_bytes

    def insert(self, key: str, value: torch.Tensor, *, dirty: bool,
               evict: Callable[[str, torch.Tensor, bool], None]) -> None:
        """Keep ``value`` (already on :attr:`device`) under ``key``, evicting LRU entries to fit."""
        nbytes = value.numel() * value.element_size()
        with self.lock:
            self.remove(key)
            while self.used_bytes + nbytes > self.capacity_bytes and self._entries:
                victim, entry = self._entries.popitem(last=False)
                self.used_bytes -= entry.nbytes
                try:
                    evict(victim, entry.value, entry.dirty)
                except BaseException:
                    self._entries[victim] = entry  # nothing lost: it stays here
                    self._entries.move_to_end(victim, last=False)
                    self.used_bytes += entry.nbytes
                    raise
                if entry.dirty:
                    self.demoted_bytes += entry.nbytes
            self._entries[key] = _Entry(value, nbytes, dirty)
            self.used_bytes += nbytes
            self.bytes_in += nbytes

    def remove(self, key: str) -> _Entry | None:
        with self.lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.used_bytes -= entry.nbytes
            return entry

    def drain(self) -> list[tuple[str, torch.Tensor, bool]]:
        """Take every entry out (at close): (key, tensor, dirty)."""
        with self.lock:
            out = [(k, e.value, e.dirty) for k, e in self._entries.items()]
            self._entries.clear()
            self.used_bytes = 0
            return out


def budget_bytes(budget: int, fraction: float, device: torch.device) -> int:
    """The gpu tier's budget: ``budget`` bytes, else ``fraction`` of the device's free memory now."""
    if budget > 0:
        return budget
    if fraction > 0:
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * fraction)
    return 0


# -- GPUDirect Storage ----------------------------------------------------------------


def gds_status() -> tuple[bool, str]:
    """Whether nvme <-> GPU copies can go through kvikio, and why (for ``tierd doctor``)."""
    if not torch.cuda.is_available():
        return False, "no CUDA device: nvme <-> GPU goes through the host arena"
    try:
        import kvikio
        import kvikio.defaults
    except ImportError as exc:
        return False, f"kvikio not installed ({exc}): pip install 'tierd[gds]'; POSIX reads plus a pinned copy meanwhile"
    try:
        compat = kvikio.defaults.is_compat_mode_preferred()
    except AttributeError:  # older kvikio
        compat = bool(kvikio.defaults.compat_mode())
    if compat:
        return True, "kvikio in compatibility mode (no GDS driver): POSIX I/O inside kvikio, device buffers"
    return True, "kvikio with GPUDirect Storage: nvme <-> GPU by DMA, no host copy"
