"""``tierd.offload_activations``: saved activations leave the device between forward and backward.

Built on ``torch.autograd.graph.saved_tensors_hooks``. During the forward
pass every tensor autograd saves goes through ``pack``; large ones are
stashed in the store and replaced by a small handle; in backward ``unpack``
brings them back, fetching the next ``prefetch_depth`` stashes (backward
runs in reverse) ahead of time.

Note [what is stashed]
    A saved tensor is stashed as its whole *storage*: a tensor saved twice,
    or two views of one base, share one stash, and unpack rebuilds each view
    with its own size, stride and offset on one restored storage, so aliasing
    comes back as it was. Leaf tensors are never stashed: parameters, buffers
    and inputs are kept alive by their owners anyway, so stashing them would
    copy bytes without freeing any.

Note [stash lifetime]
    A stash lives as long as some autograd node still holds a handle to it:
    ``retain_graph=True`` unpacks a handle twice, so the bytes stay in the
    store until autograd drops the handle (after backward without
    retain_graph, or when the graph is freed); then the key is deleted. The
    restored storage is cached while handles remain, so views unpacked
    separately alias one storage, as in the forward pass.

Note [GPU stashes]
    A CUDA activation is stashed off the forward thread: ``pack`` records
    the compute stream, keeps the tensor alive and hands the put to one
    stash thread, which copies it into the pinned host arena on the store's
    device-to-host stream after that stream waited for the compute stream
    (Note [copy streams] in tiers/gpu.py). Only once the copy finished is
    the device tensor dropped, so its memory goes back to the caching
    allocator with no copy still reading it. Backward that comes before the
    copy finished uses the device tensor itself. Unpack and prefetch fetch
    with ``get(device=...)``: one host-to-device DMA on the store's other
    stream, overlapping the compute of the layer backward is in.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from tierd.clients.base import Store
from tierd.errors import InvalidArgument, TierdError

__all__ = ["offload_activations"]

log = logging.getLogger("tierd.clients.activations")


@dataclass(eq=False)
class _Stash:
    """One stored storage (see Note [stash lifetime])."""

    key: str
    index: int
    device: torch.device
    nbytes: int
    handles: int = 0
    loaded: torch.UntypedStorage | None = None
    pending: Future[Any] | None = None
    stashing: Future[None] | None = None  # a GPU stash's put (Note [GPU stashes])
    on_device: torch.Tensor | None = None  # kept until that put finished
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handle:
    """What autograd keeps instead of a stashed tensor."""

    __slots__ = ("stash", "dtype", "size", "stride", "offset", "owner", "__weakref__")

    def __init__(self, owner: _Offloader, stash: _Stash, t: torch.Tensor) -> None:
        self.owner = owner
        self.stash = stash
        self.dtype = t.dtype
        self.size = t.size()
        self.stride = t.stride()
        self.offset = t.storage_offset()
        with stash.lock:
            stash.handles += 1

    def __del__(self) -> None:
        self.owner.drop(self.stash)


class _Offloader:
    def __init__(self, store: Store, min_bytes: int, tier: str, prefetch_depth: int) -> None:
        self.store = store
        self.min_bytes = min_bytes
        self.tier = tier
        self.prefetch_depth = prefetch_depth
        self.session = uuid.uuid4().hex[:12]
        self._counter = itertools.count()
        self._by_storage: dict[tuple[torch.device, int], tuple[weakref.ref[Any], _Stash]] = {}
        self._stashes: list[_Stash] = []
        self._lock = threading.Lock()
        self._stasher: ThreadPoolExecutor | None = None  # Note [GPU stashes]
        self.stashed_bytes = 0  # bytes put into the store by this context (for stats and tests)

    # -- forward ---------------------------------------------------------------

    def pack(self, t: torch.Tensor) -> Any:
        if (
            t.grad_fn is None  # Note [what is stashed]: leaves are kept by their owners
            or t.layout != torch.strided
            or t.untyped_storage().nbytes() < self.min_bytes
        ):
            return t
        storage = t.untyped_storage()
        ident = (t.device, storage.data_ptr())
        with self._lock:
            known = self._by_storage.get(ident)
            if known is not None and known[0]() is storage:
                stash = known[1]  # the same storage saved again: stash it once
            else:
                stash = _Stash(f"acts/{self.session}-{next(self._counter)}", len(self._stashes), t.device,
                               storage.nbytes())
                self._stashes.append(stash)
                self._by_storage[ident] = (weakref.ref(storage), stash)
                known = None
        if known is None:
            raw = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage).detach()
            if raw.is_cuda:
                self._stash_from_device(stash, raw)
            else:
                self.store.put(stash.key, raw, tier=self.tier)
            self.stashed_bytes += stash.nbytes
        return _Handle(self, stash, t)

    def _stash_from_device(self, stash: _Stash, raw: torch.Tensor) -> None:
        """Put ``raw`` from the stash thread, after the compute stream (Note [GPU stashes])."""
        if self._stasher is None:
            self._stasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierd-stash")
        stream = torch.cuda.current_stream(raw.device)
        stash.on_device = raw

        def put() -> None:
            with torch.cuda.stream(stream):  # the store's copy stream waits for this one
                self.store.put(stash.key, raw, tier=self.tier)

        def done(fut: Future[None]) -> None:
            if fut.exception() is not None:  # kept on the device: nothing lost, nothing freed
                log.warning("could not stash %s (%s); it stays on the device", stash.key, fut.exception())
                return
            with stash.lock:
                stash.on_device = None

        stash.stashing = self._stasher.submit(put)
        stash.stashing.add_done_callback(done)

    def flush(self) -> None:
        """Wait until every GPU stash so far has left the device (Note [GPU stashes])."""
        if self._stasher is not None:
            self._stasher.submit(lambda: None).result()  # one worker: everything before it is done

    # -- backward --------------------------------------------------------------

    def unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        handle: _Handle = packed
        stash = handle.stash
        storage = self._load(stash)
        self._prefetch_before(stash.index)
        out = torch.empty(0, dtype=handle.dtype, device=stash.device)
        return out.set_(storage, handle.offset, handle.size, handle.stride)

    def _load(self, stash: _Stash) -> torch.UntypedStorage:
        with stash.lock:
            if stash.loaded is not None:
                return stash.loaded
            if stash.on_device is not None:  # its stash is not finished: the tensor itself
                stash.loaded = stash.on_device.untyped_storage()
                return stash.loaded
            pending = stash.pending
        raw = pending.result() if pending is not None else self._fetch(stash)
        if raw.device != stash.device:
            raw = raw.to(stash.device)
        if raw.is_cuda:  # fetched on another thread's stream: tell the allocator who uses it now
            raw.record_stream(torch.cuda.current_stream(raw.device))
        storage = raw.untyped_storage()
        with stash.lock:
            if stash.handles == 0:  # dropped while loading: nothing to cache
                return storage
            if stash.loaded is None:
                stash.loaded = storage
                stash.pending = None
            return stash.loaded

    def _prefetch_before(self, index: int) -> None:
        """Start fetching the stashes backward will need next (lower indices)."""
        for i in range(index - 1, max(index - 1 - self.prefetch_depth, -1), -1):
            stash = self._stashes[i]
            with stash.lock:
                if (stash.loaded is not None or stash.pending is not None or stash.handles == 0
                        or stash.on_device is not None):
                    continue
                stash.pending = self.store.get_async(stash.key, device=stash.device)

    def _fetch(self, stash: _Stash) -> torch.Tensor:
        if stash.stashing is not None:
            stash.stashing.result()  # the key exists once its put finished
        return self.store.get(stash.key, device=stash.device)

    def drop(self, stash: _Stash) -> None:
        """A handle died; the last one deletes the stash (Note [stash lifetime])."""
        with stash.lock:
            stash.handles -= 1
            if stash.handles > 0:
                return
            stash.loaded = None
            pending, stash.pending = stash.pending, None
        if pending is not None:
            pending.cancel()
        if stash.stashing is not None and not stash.stashing.done():
            stash.stashing.add_done_callback(lambda _f: self._delete(stash))  # after its put, not before
        else:
            self._delete(stash)

    def _delete(self, stash: _Stash) -> None:
        try:
            self.store.delete(stash.key)
        except TierdError as exc:  # a closed store or a gone daemon: nothing left to free here
            log.debug("could not delete %s: %s", stash.key, exc)


class offload_activations(torch.autograd.graph.saved_tensors_hooks):  # noqa: N801 - used like a function
    """Stash the activations autograd saves in ``store`` during the ``with`` block.

        with tierd.offload_activations(store, min_bytes=1 << 20):
            loss = model(batch).sum()
        loss.backward()   # saved tensors come back, prefetched in backward order

    Args:
        store: from ``tierd.open()`` or ``tierd.connect()``.
        min_bytes: storages smaller than this stay where they are.
        tier: the tier stashes are put in (``"host"``; ``"nvme"`` for very large ones).
        prefetch_depth: stashes fetched ahead of the one backward is using.

    Gradients are bitwise identical to those without offloading. Works with
    ``torch.utils.checkpoint`` inside the block, ``retain_graph=True``, and
    double backward (``create_graph=True``).
    """

    def __init__(self, store: Store, *, min_bytes: int = 1 << 20, tier: str = "host", prefetch_depth: int = 2) -> None:
        if min_bytes < 0 or prefetch_depth < 0:
            raise InvalidArgument(f"min_bytes and prefetch_depth must be >= 0, got {min_bytes}, {prefetch_depth}")
        self.offloader = _Offloader(store, min_bytes, tier, prefetch_depth)
        super().__init__(self.offloader.pack, self.offloader.unpack)

    def __enter__(self) -> offload_activations:  # type: ignore[override]  # the base returns None
        super().__enter__()
        return self

    def flush(self) -> None:
        """Wait until the copies of GPU activations stashed so far finished (their device memory is free)."""
        self.offloader.flush()

    @property
    def stashed_bytes(self) -> int:
        """Bytes this context has put into the store so far."""
        return self.offloader.stashed_bytes
