"""The ``gpu`` tier: a per-process cache of device tensors above any store.

``tierd.open()`` and ``tierd.connect()`` wrap their store in a
:class:`GpuTierStore` when ``[tiers.gpu]`` gives a budget and CUDA is
present; everything else passes through to the store below.

Note [gpu tier]
    Two kinds of entries:

    * ``put(key, t, tier="gpu")``: the object lives only in this process's
      device memory (a device-to-device clone of ``t``) until the budget
      forces it out, when it is written down to the store below (host or
      lower, one DMA from the pinned arena); ``close()`` writes down what is
      left. Any older copy below is deleted at the put, so a later get never
      sees a stale version. Such objects die with the process if it is
      killed before eviction or close: that is what ``tier="gpu"`` asks for
      (a durable put is written through below and only cached here).
    * ``move(key, "gpu")`` / ``prefetch(keys, tier="gpu")``: a cached copy of
      an object that stays below; evicting it just drops it.

    A get is served from the cache when the key is there (a clone on the
    requested device, or a copy into ``out=``), else from below.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from tierd.clients.base import Staging, Store, check_outs, pairs_of, prefetch_keys
from tierd.clients.batch import BatchLease, Results
from tierd.clients.values import Value, check_out, tensor_meta
from tierd.errors import InvalidArgument, NotFound
from tierd.tiers.gpu import GpuTier, budget_bytes
from tierd.types import ObjectInfo, Stats, TierStats

__all__ = ["GpuTierStore", "with_gpu_tier"]


def _from_below(name: str) -> Any:
    def get(self: GpuTierStore) -> Any:
        try:
            return getattr(self.below, name)
        except AttributeError:
            raise AttributeError(f"{type(self.below).__name__} below the gpu tier has no {name!r}") from None

    return property(get, doc=f"``{name}`` of the store below.")


class GpuTierStore(Store):
    """``store`` with a :class:`~tierd.tiers.gpu.GpuTier` above it (Note [gpu tier])."""

    def __init__(self, store: Store, tier: GpuTier) -> None:
        super().__init__()
        self.below = store
        self.gpu = tier

    # What the store below offers beyond the Store interface, passed through by
    # name: an EmbeddedStore's config and engine, a daemon connection's
    # status(), uid, arena and socket. Absent below, absent here (hasattr works).
    config = _from_below("config")
    engine = _from_below("engine")
    status = _from_below("status")
    uid = _from_below("uid")
    daemon_pid = _from_below("daemon_pid")
    has_arena = _from_below("has_arena")
    socket_path = _from_below("socket_path")

    def stage(self, nbytes: int) -> Staging | None:
        return self.below.stage(nbytes)

    def healthy(self) -> bool:
        return self.below.healthy()  # the daemon's health, for a daemon's store

    def _evict(self, key: str, value: torch.Tensor, dirty: bool) -> None:
        if dirty:
            self.below.put(key, value)

    def put(
        self, key: str, value: Value, *, tier: str | None = None, durable: bool | None = None,
        codec: str | None = None, pin: bool = False, ttl: float | None = None,
    ) -> None:
        if tier != "gpu":
            self.gpu.remove(key)
            self.below.put(key, value, tier=tier, durable=durable, codec=codec, pin=pin, ttl=ttl)
            return
        if not isinstance(value, torch.Tensor):
            raise InvalidArgument(f"tier='gpu' takes tensors, got {type(value).__name__} for {key!r}")
        if ttl is not None:
            raise InvalidArgument("tier='gpu' objects have no ttl; put them on host for that")
        nbytes = value.numel() * value.element_size()
        if durable or not self.gpu.fits(nbytes):
            # Durable: written through below, cached here. Too large for the budget: below only.
            self.below.put(key, value, durable=durable, codec=codec, pin=pin)
            if self.gpu.fits(nbytes):
                self.gpu.insert(key, _clone_to(value, self.gpu.device), dirty=False, evict=self._evict)
            else:
                self.gpu.remove(key)
            return
        copy = _clone_to(value, self.gpu.device)
        self.below.delete(key)  # Note [gpu tier]: no stale version below
        self.gpu.insert(key, copy, dirty=True, evict=self._evict)

    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        cached = self.gpu.lookup(key)
        if cached is None:
            return self.below.get(key, device=device, out=out)
        if out is not None:
            check_out(out, tensor_meta(cached), key)
            return out.copy_(cached.view(out.shape) if out.is_contiguous() else cached)
        return cached.to(device if device is not None else "cpu", copy=True)

    # -- batches: the cached keys here, the rest in one batch below ------------

    def put_many(self, items: Any, *, tier: str | None = None, **options: Any) -> Results:
        if tier == "gpu":
            return super().put_many(items, tier=tier, **options)  # each into the cache, one by one
        pairs = pairs_of(items)
        for key, _ in pairs:
            self.gpu.remove(key)  # no stale cached copy above the new version
        return self.below.put_many(pairs, tier=tier, **options)

    def get_many(self, keys: Sequence[str], *, outs: Sequence[torch.Tensor | None] | None = None,
                 device: str | torch.device | None = None) -> Results:
        keys = list(keys)
        check_outs(keys, outs)
        cached = {i: t for i, k in enumerate(keys) if (t := self.gpu.lookup(k)) is not None}
        return self._merge(keys, cached, outs, device,
                           lambda sub, sub_outs: self.below.get_many(sub, outs=sub_outs, device=device))

    def _merge(self, keys: list[str], cached: dict[int, torch.Tensor], outs: Sequence[torch.Tensor | None] | None,
               device: Any, below: Any) -> Results:
        """Values of ``keys``: ``cached`` ones from their device tensors, the rest from ``below(keys, outs)``."""
        rest = [i for i in range(len(keys)) if i not in cached]
        got = below([keys[i] for i in rest], [outs[i] for i in rest] if outs is not None else None)
        values: list[Any] = [None] * len(keys)
        for i, value in zip(rest, got, strict=True):
            values[i] = value
        for i, t in cached.items():
            out = outs[i] if outs is not None else None
            if out is not None:
                check_out(out, tensor_meta(t), keys[i])
                values[i] = out.copy_(t.view(out.shape) if out.is_contiguous() else t)
            else:
                values[i] = t.to(device if device is not None else "cpu", copy=True)
        return Results(values, got.errors)

    def exists_many(self, keys: Sequence[str], *, lease: bool = False) -> Results:
        keys = list(keys)
        # A cached tensor is held by reference: a later put or eviction replaces the
        # cache's entry, never this tensor, so holding it pins this version.
        cached = {i: t for i, k in enumerate(keys) if (t := self.gpu.peek(k)) is not None}
        rest = [i for i in range(len(keys)) if i not in cached]
        below = self.below.exists_many([keys[i] for i in rest], lease=lease)
        found = [True] * len(keys)
        for i, ok in zip(rest, below, strict=True):
            found[i] = ok
        results = Results(found)
        if lease:
            assert below.lease is not None
            below_lease = below.lease
            results.lease = BatchLease(
                keys, found, release=below_lease.release,
                read=lambda outs, device: self._merge(
                    keys, cached, outs, device, lambda sub, sub_outs: below_lease.get_many(outs=sub_outs, device=device)),
            )
        return results

    def prefix_length(self, keys: Sequence[str]) -> int:
        keys = list(keys)
        n = 0
        while n < len(keys) and keys[n] in self.gpu:
            n += 1
        return n + (self.below.prefix_length(keys[n:]) if n < len(keys) else 0)

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        cached = [self.gpu.remove(key) is not None for key in keys]
        return [a or b for a, b in zip(cached, self.below.delete_many(list(keys)), strict=True)]

    def prefetch(self, keys: Iterable[str] | str, *, tier: str = "host") -> None:
        wanted = prefetch_keys(keys)
        if tier != "gpu":
            self.below.prefetch(wanted, tier=tier)
            return
        for key in wanted:
            if key not in self.gpu:
                self._async.submit(self._cache_quietly, key)

    def _cache_quietly(self, key: str) -> None:
        try:
            self._cache(key)
        except NotFound:
            pass  # a hint: missing keys are ignored

    def _cache(self, key: str) -> None:
        value = self.below.get(key, device=self.gpu.device)
        if not isinstance(value, torch.Tensor):
            raise InvalidArgument(f"{key!r} holds raw bytes; only tensors go to the gpu tier")
        if self.gpu.fits(value.numel() * value.element_size()):
            self.gpu.insert(key, value, dirty=False, evict=self._evict)

    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        self.below.declare_schedule(keys, cyclic=cyclic)

    def declare_prefix(self, keys: Sequence[str], *, done: bool = False) -> None:
        self.below.declare_prefix(keys, done=done)

    def move(self, key: str, tier: str) -> None:
        if tier == "gpu":
            if key not in self.gpu:
                self._cache(key)
            return
        if self.gpu.dirty(key):
            entry = self.gpu.remove(key)
            assert entry is not None
            self.below.put(key, entry.value)
        else:
            self.gpu.remove(key)
        self.below.move(key, tier)

    def delete(self, key: str) -> bool:
        cached = self.gpu.remove(key)
        below = self.below.delete(key)
        return below or cached is not None

    def exists(self, key: str) -> bool:
        return key in self.gpu or self.below.exists(key)

    def info(self, key: str) -> ObjectInfo:
        value = self.gpu.peek(key)
        if value is None:
            return self.below.info(key)
        meta = tensor_meta(value)
        below = () if self.gpu.dirty(key) else self.below.info(key).tiers
        nbytes = value.numel() * value.element_size()
        return ObjectInfo(key=key, tier="gpu", nbytes=nbytes, stored_nbytes=nbytes, dtype=meta.dtype,
                          shape=meta.shape, codec="none", durable=False, pinned=False, tiers=("gpu", *below))

    def keys(self, prefix: str = "") -> list[str]:
        return sorted({*self.below.keys(prefix), *(k for k in self.gpu.keys() if k.startswith(prefix))})

    def stats(self) -> Stats:
        below = self.below.stats()
        g = self.gpu
        mine = TierStats(name="gpu", capacity_bytes=g.capacity_bytes, used_bytes=g.used_bytes,
                         objects=len(g.keys()), hits=g.hits, misses=g.misses, bytes_in=g.bytes_in,
                         bytes_out=g.bytes_out, promoted_bytes=0, demoted_bytes=g.demoted_bytes,
                         largest_free_bytes=g.capacity_bytes - g.used_bytes, fragmentation=0.0)
        only_here = sum(1 for k in g.keys() if g.dirty(k))
        return Stats(tiers={"gpu": mine, **below.tiers}, objects=below.objects + only_here)

    def close(self) -> None:
        super().close()
        try:
            for key, value, dirty in self.gpu.drain():
                if dirty:
                    self.below.put(key, value)  # Note [gpu tier]: written down, not lost
        finally:
            self.below.close()


def with_gpu_tier(store: Store, budget: int, fraction: float) -> Store:
    """``store`` under a gpu tier when a budget is configured and CUDA is present, else ``store``."""
    if (budget <= 0 and fraction <= 0) or not torch.cuda.is_available():
        return store
    device = torch.device("cuda", torch.cuda.current_device())
    size = budget_bytes(budget, fraction, device)
    return GpuTierStore(store, GpuTier(device, size)) if size > 0 else store


def _clone_to(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A private copy of ``value`` on ``device`` (device-to-device when it is there already)."""
    return value.detach().to(device, copy=True).contiguous()
