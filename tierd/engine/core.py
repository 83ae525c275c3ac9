"""The engine: index, placement, movement between tiers, leases, durability.

Keys reaching the engine are trusted: the embedded store and the daemon
validate what users send (:func:`tierd.engine.keys.validate_key`) before calling in; the
daemon also scopes keys to their uid.

It stores byte strings (flat uint8 tensors) under keys; turning tensors into
bytes and back is the client's job. One engine runs inside ``tierd.open()``
and, later, inside the daemon.

Locking
    ``_lock`` guards the index, the records, the policy and the counters; it
    is never held while bytes move. ``_commit_lock`` orders every change of
    the index that may touch LMDB (install, delete) so the LMDB order is the
    in-memory order; it is taken before ``_lock``, never after.

Movement
    A put lands in the highest allowed tier with room; when the host tier has
    no free extent, least-recently-used objects are demoted one tier down
    first: host -> cxl (when configured) -> nvme (-> remote).
    A background thread demotes from host (and cxl) whenever its use passes
    the high watermark, until it is under the low one. A get from cxl or nvme
    promotes the object into host when there is room (``prefetch`` does it
    ahead of time). Demotion never drops an object: if nvme is full the
    victim stays where it is and the put that needed room gets
    :class:`OutOfSpace`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch

from tierd.codecs import get_codec
from tierd.config import Config
from tierd.engine.index import DurableIndex, ObjectMeta, ObjectRecord
from tierd.engine.keys import namespace_of, user_key
from tierd.engine.namespaces import NamespacePolicies
from tierd.engine.remote_index import RemoteIndex
from tierd.engine.stack import TIER_ORDER, TierStack
from tierd.engine.trace import TraceWriter
from tierd.errors import (
    Busy,
    InternalError,
    InvalidArgument,
    NotFound,
    OutOfSpace,
    QuotaExceeded,
    StoreClosed,
    TierdError,
)
from tierd.policies import CostModel
from tierd.tiers.host import ArenaTier, HostLocation
from tierd.types import ObjectInfo, Stats, TierStats

__all__ = ["Engine", "PendingPut"]

log = logging.getLogger("tierd.engine")

@dataclass(slots=True, eq=False)
class PendingPut:
    """A put between its two phases (see :meth:`Engine.prepare_put`)."""

    rec: ObjectRecord
    top: str
    staging: HostLocation | None


def _tensor_of(view: memoryview) -> torch.Tensor:
    """A uint8 tensor over a writable byte memoryview, or over a copy of a read-only one."""
    if view.readonly:
        view = memoryview(bytearray(view))
    return torch.frombuffer(view, dtype=torch.uint8) if view.nbytes else torch.empty(0, dtype=torch.uint8)


class _Counters:
    __slots__ = ("objects", "hits", "misses", "bytes_in", "bytes_out", "promoted", "demoted")

    def __init__(self) -> None:
        self.objects = self.hits = self.misses = 0
        self.bytes_in = self.bytes_out = self.promoted = self.demoted = 0


class Engine:
    """Owns the tiers and the index. Thread-safe."""

    def __init__(self, config: Config, *, in_process: bool = False) -> None:
        self.config = config
        self.tiers = TierStack(config, gds=in_process and config.tiers.nvme.gds == "auto")
        self.host, self.cxl, self.nvme, self.remote = self.tiers.host, self.tiers.cxl, self.tiers.nvme, self.tiers.remote
        self._lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._index: dict[str, ObjectRecord] = {}
        self._cost = CostModel()  # refined from measured nvme reads
        self._policies = NamespacePolicies(lambda: self.config, self._cost)
        self._trace = TraceWriter(config.trace.path) if config.trace.path else None
        self._counters = {name: _Counters() for name in TIER_ORDER}
        self._ns_used: dict[str, int] = {}
        self._owner_used: dict[int | None, int] = {}
        self._expiring: set[str] = set()
        self._closed = False
        self._watermarks = self.tiers.watermarks
        self._shared = RemoteIndex(self.remote) if self.remote is not None else None
        try:
            self._durable = DurableIndex(Path(config.tiers.nvme.path) / "index.lmdb")
            self._load_durable()
        except BaseException:
            self.tiers.close()
            raise
        self._wake = threading.Event()
        self._prefetch_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tierd-prefetch")
        self._mover = threading.Thread(target=self._mover_loop, name="tierd-demote", daemon=True)
        self._mover.start()

    # -- index bookkeeping (callers hold _lock) --------------------------------

    def _load_durable(self) -> None:
        now = time.time()
        stale: list[str] = []
        for key, entry in self._durable.entries():
            if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
                stale.append(key)
                continue
            try:
                self.nvme.reserve(entry.location)
            except ValueError as exc:
                log.error("durable object %r cannot be restored: %s; dropped from the index", user_key(key), exc)
                stale.append(key)
                continue
            rec = ObjectRecord(
                key=key, namespace=namespace_of(key), meta=entry.meta, nbytes=entry.nbytes,
                codec=entry.codec, durable=True, pinned=entry.pinned, expires_at=entry.expires_at,
                nvme=entry.location, owner=entry.owner,
            )
            self._install_locked(rec)
        if stale:
            self._durable.delete(*stale)
        log.info("restored %d durable objects from %s", len(self._index), self.nvme.path)

    def _set_location(self, rec: ObjectRecord, tier: str, loc: Any) -> None:
        setattr(rec, tier, loc)
        self._counters[tier].objects += 1
        self._policies.on_insert(rec, tier)

    def _take_location(self, rec: ObjectRecord, tier: str) -> None:
        """Detach ``rec``'s copy on ``tier`` and free it once no one reads it."""
        loc = getattr(rec, tier)
        if loc is None:
            return
        setattr(rec, tier, None)
        self._counters[tier].objects -= 1
        self._policies.on_remove(rec, tier)
        if rec.readers:
            rec.graveyard.append((tier, loc))
        else:
            self.tiers[tier].free(loc)

    def _install_locked(self, rec: ObjectRecord) -> None:
        old = self._index.get(rec.key)
        if old is not None:
            self._retire_locked(old)
        self._index[rec.key] = rec
        self._ns_used[rec.namespace] = self._ns_used.get(rec.namespace, 0) + rec.nbytes
        self._owner_used[rec.owner] = self._owner_used.get(rec.owner, 0) + rec.nbytes
        if rec.expires_at is not None:
            self._expiring.add(rec.key)
        for tier in TIER_ORDER:
            loc = getattr(rec, tier)
            if loc is not None:
                setattr(rec, tier, None)
                self._set_location(rec, tier, loc)

    def _retire_locked(self, rec: ObjectRecord) -> None:
        rec.live = False
        if self._index.get(rec.key) is rec:
            del self._index[rec.key]
            self._expiring.discard(rec.key)
        self._ns_used[rec.namespace] -= rec.nbytes
        self._owner_used[rec.owner] -= rec.nbytes
        for tier in TIER_ORDER:
            self._take_location(rec, tier)

    def _lookup_locked(self, key: str) -> ObjectRecord:
        rec = self._index.get(key)
        if rec is None:
            raise NotFound(f"no object {user_key(key)!r}")
        if rec.expires_at is not None and rec.expires_at <= time.time():
            raise NotFound(f"object {user_key(key)!r} expired")
        return rec

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")

    # -- leases ----------------------------------------------------------------

    def acquire(self, key: str) -> ObjectRecord:
        """Lease ``key``'s current version: its bytes stay readable until :meth:`release`.

        A key missing here is looked up in the remote tier's shared index.

        Raises:
            NotFound: no such key (or it expired).
        """
        try:
            return self._acquire_local(key)
        except NotFound:
            if not self._adopt_quietly(key):
                raise
        return self._acquire_local(key)

    def _adopt_quietly(self, key: str) -> bool:
        """Remote fallback of a lookup: an unreachable server is a miss, not an error."""
        try:
            return self._adopt_remote(key)
        except TierdError as exc:
            log.warning("remote lookup of %r skipped: %s", user_key(key), exc)
            return False

    def _acquire_local(self, key: str) -> ObjectRecord:
        with self._lock:
            self._check_open()
            rec = self._lookup_locked(key)
            rec.readers += 1
            self._policies.on_access(rec)
            upcoming = self._observe_locked(rec.namespace, key)
        if self._trace is not None:
            self._trace.write("get", key, rec.nbytes, rec.tier)
        if upcoming:
            self.prefetch(upcoming)  # overlaps the next objects' promotion with this one's use
        return rec

    def release(self, rec: ObjectRecord) -> None:
        """End a lease taken with :meth:`acquire`."""
        with self._lock:
            rec.readers -= 1
            if rec.readers == 0 and rec.graveyard:
                for tier, loc in rec.graveyard:
                    self.tiers[tier].free(loc)
                rec.graveyard.clear()

    @contextmanager
    def lease(self, key: str) -> Iterator[ObjectRecord]:
        """``acquire`` / ``release`` around a ``with`` body."""
        rec = self.acquire(key)
        try:
            yield rec
        finally:
            self.release(rec)

    # -- put -------------------------------------------------------------------

    def prepare_put(
        self, key: str, nbytes: int, meta: ObjectMeta, *, tier: str | None = None,
        durable: bool | None = None, codec: str | None = None, pin: bool = False,
        ttl: float | None = None, owner: int | None = None, stage: bool = False,
    ) -> PendingPut:
        """First phase of a put: check everything and reserve a host staging extent.

        The caller writes the object's bytes into ``host.view(pending.staging)``
        (when it is not None) and then calls :meth:`finish_put`, or
        :meth:`abort_put` to give the extent back. ``stage=True`` demotes other
        objects to find a staging extent even for durable or nvme-bound puts
        (a client of the daemon has no other way to hand over large bytes).

        Raises:
            InvalidArgument, QuotaExceeded, StoreClosed.
        """
        self._check_open()
        ns = namespace_of(key)
        ns_cfg = self.config.namespace(ns)
        durable = ns_cfg.durable if durable is None else bool(durable)
        codec_name = get_codec(codec if codec is not None else ns_cfg.codec).name
        top = tier if tier is not None else (ns_cfg.tier or "host")
        if top == "gpu":  # handled above the store by GpuTierStore when the tier is on
            raise InvalidArgument("the gpu tier is off: it needs CUDA and [tiers.gpu] budget (or fraction); "
                                  "`tierd doctor` says which is missing")
        if top not in self.tiers:
            raise InvalidArgument(f"unknown tier {top!r}; choose one of {list(self.tiers)}")
        if ttl is not None and not ttl > 0:
            raise InvalidArgument(f"ttl must be > 0 seconds, got {ttl!r}")
        self._check_quotas(key, ns, ns_cfg.quota, owner, nbytes)
        if top == "host" and tier is None:
            with self._lock:
                admitted = self._policies.admit(ns, key, "host", nbytes)
            if not admitted:
                top = "cxl" if self.cxl is not None else "nvme"  # one tier down
        rec = ObjectRecord(
            key=key, namespace=ns, meta=meta, nbytes=nbytes, codec=codec_name, durable=durable,
            pinned=pin, expires_at=None if ttl is None else time.time() + ttl, owner=owner,
        )
        staging = None
        if nbytes:
            if top == "host" and not durable:
                staging = self._alloc_host(nbytes)  # its final place: make room
            else:
                staging = self._alloc_host(nbytes, evict=stage)
        return PendingPut(rec, top, staging)

    def _check_quotas(self, key: str, ns: str, ns_quota: int | None, owner: int | None, nbytes: int) -> None:
        uid_quota = self.config.daemon.uid_quota if owner is not None else None
        if ns_quota is None and uid_quota is None:
            return
        with self._lock:
            old = self._index.get(key)
            old_bytes = old.nbytes if old is not None else 0
            ns_used = self._ns_used.get(ns, 0) - old_bytes
            owner_used = self._owner_used.get(owner, 0) - old_bytes
        if ns_quota is not None and ns_used + nbytes > ns_quota:
            raise QuotaExceeded(
                f"namespace {ns!r} would hold {ns_used + nbytes} bytes, over its quota of "
                f"{ns_quota}; delete objects or raise namespaces.{ns}.quota"
            )
        if uid_quota is not None and owner_used + nbytes > uid_quota:
            raise QuotaExceeded(
                f"uid {owner} would hold {owner_used + nbytes} bytes, over the per-uid quota of "
                f"{uid_quota}; delete objects or raise daemon.uid_quota"
            )

    def finish_put(self, pending: PendingPut, src: torch.Tensor | memoryview | None = None) -> None:
        """Second phase: store the bytes (``src``, or those already written to the
        staging extent) and commit. Returns when readable, and for durable objects
        once chunks and index entry are fsync'ed.

        Raises:
            OutOfSpace (nothing already stored is lost), MediaError.
        """
        rec, staging = pending.rec, pending.staging
        nbytes = rec.nbytes
        keep_staging = False
        if (isinstance(src, torch.Tensor) and src.device.type != "cpu"
                and (staging is not None or not self.device_source_ok(pending))):
            src = src.cpu()  # only nvme writes straight from device memory (Note [GPUDirect Storage])
        try:
            if staging is not None:
                if src is not None:
                    self.host.copy_in(staging, src)
            elif src is None and nbytes:
                raise InvalidArgument("finish_put needs the bytes: no staging extent was reserved")
            # A durable object always gets its nvme copy (an empty one too: the
            # LMDB entry points at it); a volatile one when it cannot stay on host.
            if pending.top == "remote" and nbytes and not rec.durable:
                assert self.remote is not None  # "remote" is only a valid tier when configured
                data_r = self.host.view(staging) if staging is not None else (
                    _tensor_of(src) if isinstance(src, memoryview) else src)
                assert data_r is not None
                rec.remote = self.remote.write(data_r, codec=get_codec(rec.codec), itemsize=rec.meta.itemsize,
                                               durable=False)
            else:
                stays_host = staging is not None and pending.top == "host"
                if nbytes and not stays_host and pending.top in ("host", "cxl") and self.cxl is not None:
                    # Host had no room, or cxl was asked for. A durable object
                    # (whose home is nvme) is cached here only if asked to, or
                    # if there is room without demoting anything.
                    rec.cxl = self._write_cxl(self.host.view(staging) if staging is not None else src,
                                              nbytes, evict=pending.top == "cxl" or not rec.durable)
                if rec.durable or (nbytes and not stays_host and rec.cxl is None):
                    # Note [durability] in tiers/nvme.py: chunks fsync'ed here, then
                    # the LMDB entry committed in _commit, then acknowledged.
                    rec.nvme = self._write_nvme(self._put_source(staging, src), rec, durable=rec.durable)
            if (self.remote is not None and nbytes and rec.remote is None
                    and self.config.namespace(rec.namespace).write_through):
                remote_src = self.host.view(staging) if staging is not None else (
                    _tensor_of(src) if isinstance(src, memoryview) else src)
                assert remote_src is not None  # nbytes > 0 means bytes were given or staged
                try:
                    rec.remote = self.remote.write(remote_src, codec=get_codec(rec.codec),
                                                   itemsize=rec.meta.itemsize, durable=False)
                except TierdError as exc:  # the remote copy is a bonus: local tiers keep working
                    log.warning("write-through of %r to the remote tier failed: %s", user_key(rec.key), exc)
            keep_staging = staging is not None and pending.top == "host"
            if keep_staging:
                rec.host = staging  # volatile: its home; durable: a cached copy
            replaced = self._commit(rec)
        except BaseException:
            if rec.nvme is not None:
                self.nvme.free(rec.nvme)
                rec.nvme = None
            if rec.remote is not None and self.remote is not None:
                self.remote.free(rec.remote)
                rec.remote = None
            if rec.cxl is not None and self.cxl is not None:
                self.cxl.free(rec.cxl)
                rec.cxl = None
            rec.host = None
            if staging is not None:
                self.host.free(staging)
            raise
        if staging is not None and not keep_staging:
            self.host.free(staging)
        if rec.remote is not None:
            self._publish_remote(rec)
        elif replaced is not None and replaced.remote is not None and self._shared is not None:
            self._shared.forget(rec.key)  # the old remote copy is gone
        with self._lock:
            for name in TIER_ORDER:
                if getattr(rec, name) is not None:
                    self._counters[name].bytes_in += nbytes
        if self._over_high_watermark():
            self._wake.set()

    def _put_source(self, staging: HostLocation | None, src: torch.Tensor | memoryview | None) -> torch.Tensor:
        """A put's bytes as a flat uint8 tensor: the staging extent, or ``src``."""
        if staging is not None:
            # The staging extent is page-aligned: O_DIRECT writes go
            # straight from it (Note [O_DIRECT alignment] in tiers/nvme.py).
            return self.host.view(staging)
        if isinstance(src, memoryview):
            return _tensor_of(src)  # the nvme path works on tensors
        return src if src is not None else torch.empty(0, dtype=torch.uint8)

    def device_source_ok(self, pending: PendingPut) -> bool:
        """Whether :meth:`finish_put` can store a CUDA source without staging it: straight to nvme by
        GPUDirect Storage (Note [GPUDirect Storage] in tiers/nvme.py), with no remote copy to write."""
        rec = pending.rec
        return (self.nvme.gds and rec.codec == "none" and pending.top != "remote"
                and not (self.remote is not None and self.config.namespace(rec.namespace).write_through))

    def abort_put(self, pending: PendingPut) -> None:
        """Give back a prepared put's staging extent (the client went away, or failed)."""
        if pending.staging is not None:
            self.host.free(pending.staging)
            pending.staging = None

    def put(self, key: str, src: torch.Tensor | memoryview, meta: ObjectMeta, **options: Any) -> None:
        """Store ``src`` (a flat uint8 tensor, or a byte memoryview) under ``key``: both phases at once.

        ``options`` are those of :meth:`prepare_put`.
        """
        nbytes = src.nbytes if isinstance(src, memoryview) else src.numel()
        self.finish_put(self.prepare_put(key, nbytes, meta, **options), src)

    def _commit(self, rec: ObjectRecord) -> ObjectRecord | None:
        """Install ``rec`` (LMDB first for durable objects); returns the record it replaced."""
        with self._commit_lock:
            with self._lock:
                self._check_open()
                old = self._index.get(rec.key)
            if rec.durable:
                self._durable.put(rec.key, rec.durable_entry())
            elif old is not None and old.durable:
                self._durable.delete(rec.key)
            with self._lock:
                self._install_locked(rec)
                upcoming = self._observe_locked(rec.namespace, rec.key)
        if self._trace is not None:
            self._trace.write("put", rec.key, rec.nbytes, rec.tier)
        if upcoming:
            self.prefetch(upcoming)
        return old

    # -- movement --------------------------------------------------------------

    def _alloc_host(self, nbytes: int, *, evict: bool = True) -> HostLocation | None:
        """A host extent for ``nbytes``, demoting LRU objects to make room; None if impossible."""
        return self._alloc_arena(self.host, nbytes, evict=evict)

    def _alloc_arena(self, arena: ArenaTier, nbytes: int, *, evict: bool = True) -> HostLocation | None:
        """An extent of ``arena`` (host or cxl) for ``nbytes``, demoting its least valuable
        objects one tier down to make room; None if impossible."""
        if nbytes > arena.capacity_bytes:
            return None
        while True:
            loc = arena.alloc(nbytes)
            if loc is not None or not evict:
                return loc
            with self._lock:
                victim = self._pick_victim_locked(tier=arena.name)
            if victim is None or not self._demote(victim, arena.name):
                return None

    def _write_cxl(self, src: torch.Tensor | memoryview | None, nbytes: int, *, evict: bool) -> HostLocation | None:
        """Copy ``nbytes`` of ``src`` into a new cxl extent; None when the cxl tier has no room."""
        assert self.cxl is not None and src is not None  # callers check both
        loc = self._alloc_arena(self.cxl, nbytes, evict=evict)
        if loc is not None:
            self.cxl.copy_in(loc, src)
            if self._over_high_watermark():
                self._wake.set()
        return loc

    def _over_high_watermark(self) -> bool:
        return any(arena.used_bytes > high for arena, high, _ in self._watermarks)

    def _pick_victim_locked(self, need_bytes: int = 0, tier: str = "host") -> ObjectRecord | None:
        """The least valuable object of ``tier`` that may leave, leased for its demotion.

        The order comes from the namespaces' policies; here, what may not move
        is skipped. On nvme, durable objects never leave (their nvme copy is the
        durable one), nor do objects with a copy above.
        """
        for key in self._policies.victims(tier, need_bytes):
            rec = self._index.get(key)
            if rec is None or rec.pinned or rec.moving or getattr(rec, tier) is None:
                continue
            if tier == "nvme" and (rec.durable or rec.host is not None or rec.cxl is not None):
                continue
            rec.moving = True
            rec.readers += 1  # the demotion reads this copy: keep it alive
            return rec
        return None

    def _write_nvme(self, src: torch.Tensor, rec: ObjectRecord, *, durable: bool) -> Any:
        """Write to nvme; when it is full and a remote tier exists, demote nvme objects there first."""
        for _ in range(64):
            try:
                return self.nvme.write(src, codec=get_codec(rec.codec), itemsize=rec.meta.itemsize, durable=durable)
            except OutOfSpace:
                if self.remote is None or not self._demote_nvme(src.numel()):
                    raise
        raise OutOfSpace("nvme tier stays full although objects were moved to the remote tier")

    def _demote_nvme(self, need_bytes: int) -> bool:
        """Move nvme objects (least valuable first) to the remote tier until ``need_bytes`` left nvme."""
        assert self.remote is not None
        freed = 0
        while freed < need_bytes:
            with self._lock:
                victim = self._pick_victim_locked(need_bytes - freed, tier="nvme")
            if victim is None:
                return freed > 0
            try:
                loc = victim.nvme
                assert loc is not None  # picked because it has an nvme copy; the lease keeps it
                buf = torch.empty(victim.nbytes, dtype=torch.uint8)
                self.nvme.read_into(loc, buf, itemsize=victim.meta.itemsize)
                remote_loc = victim.remote or self.remote.write(buf, codec=get_codec(victim.codec),
                                                                itemsize=victim.meta.itemsize, durable=False)
            except TierdError as exc:
                log.warning("cannot demote %r to the remote tier: %s", user_key(victim.key), exc)
                with self._lock:
                    victim.moving = False
                self.release(victim)
                return freed > 0
            with self._lock:
                victim.moving = False
                if victim.live and victim.nvme is not None:
                    if victim.remote is None:
                        self._set_location(victim, "remote", remote_loc)
                        self._counters["remote"].bytes_in += victim.nbytes
                        self._counters["remote"].demoted += victim.nbytes
                    self._take_location(victim, "nvme")
                    freed += victim.nbytes
                    indexed = True
                else:
                    indexed = False
            if indexed:
                self._publish_remote(victim)
            elif victim.remote is None:
                self.remote.free(remote_loc)
            self.release(victim)
        return True

    def _publish_remote(self, rec: ObjectRecord) -> None:
        if self._shared is not None:
            self._shared.publish(rec)

    def _adopt_remote(self, key: str) -> bool:
        """On a local miss, look ``key`` up in the remote index; install it if found."""
        if self._shared is None:
            return False
        entry = self._shared.lookup(key)  # network I/O: never under the engine lock
        if entry is None:
            return False
        rec = ObjectRecord(key=key, namespace=namespace_of(key), meta=entry.meta, nbytes=entry.nbytes,
                           codec=entry.codec, durable=False, pinned=False, expires_at=None, remote=entry.location)
        with self._commit_lock, self._lock:
            if key in self._index:
                return True  # someone installed it meanwhile
            self._shared.remote.adopt(entry.location)
            self._install_locked(rec)
        return True

    # -- namespaces, schedules, traces -------------------------------------------

    def _observe_locked(self, namespace: str, key: str) -> list[str]:
        """Feed the schedule with an access; the keys worth promoting now (not on host yet)."""
        out = []
        for k in self._policies.observe(namespace, key):
            rec = self._index.get(k)
            if k != key and rec is not None and rec.host is None and rec.nbytes and not rec.moving:
                out.append(k)
        return out

    def declare_schedule(self, keys: list[str], *, cyclic: bool = True) -> None:
        """The coming access order of ``keys`` (any namespaces), for schedule-aware policies."""
        by_ns: dict[str, list[str]] = {}
        for key in keys:
            by_ns.setdefault(namespace_of(key), []).append(key)
        with self._lock:
            self._policies.declare_schedule(by_ns, cyclic=cyclic)

    def _demote(self, rec: ObjectRecord, source: str = "host", dest: str | None = None) -> bool:
        """Move ``rec`` (picked and leased by _pick_victim_locked) from ``source`` (host or cxl)
        one tier down: host -> cxl (when configured) -> nvme. ``dest`` forces cxl or nvme.

        A copy that a lower tier holds already (a durable object's nvme copy, a
        remote one) is not written again: the ``source`` copy is just dropped.
        """
        arena = self.tiers.arena(source)
        new_tier, new_loc = "nvme", None
        try:
            loc = getattr(rec, source)
            if loc is not None:
                below = rec.nvme is not None or rec.remote is not None
                if source == "host" and self.cxl is not None and (dest == "cxl" or (dest is None and not below)):
                    new_tier, new_loc = "cxl", self._write_cxl(arena.view(loc), rec.nbytes, evict=True)
                    if new_loc is None and dest == "cxl":
                        raise OutOfSpace(f"cxl tier has no room for {user_key(rec.key)!r} ({rec.nbytes} bytes)")
                if new_loc is None and not below:
                    new_tier, new_loc = "nvme", self._write_nvme(arena.view(loc), rec, durable=False)
        except TierdError as exc:
            log.debug("cannot demote %r: %s", user_key(rec.key), exc)
            with self._lock:
                rec.moving = False
            self.release(rec)
            return False
        with self._lock:
            rec.moving = False
            if rec.live and getattr(rec, source) is not None:
                if new_loc is not None:
                    self._set_location(rec, new_tier, new_loc)
                    new_loc = None
                    self._counters[source].bytes_out += rec.nbytes
                    self._counters[new_tier].bytes_in += rec.nbytes
                    self._counters[new_tier].demoted += rec.nbytes
                # else: the copy below is already there: dropping this one costs no I/O.
                self._take_location(rec, source)
        if new_loc is not None:  # replaced or deleted while we copied
            self.tiers[new_tier].free(new_loc)
        self.release(rec)
        return True

    def _mover_loop(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if self._closed:
                return
            try:
                self._expire()
                for arena, high, low in self._watermarks:
                    if arena.used_bytes <= high:
                        continue
                    while arena.used_bytes > low and not self._closed:
                        with self._lock:
                            victim = self._pick_victim_locked(tier=arena.name)
                        if victim is None or not self._demote(victim, arena.name):
                            break
            except Exception:  # the mover must survive anything one object does
                log.exception("background demotion failed")

    def _expire(self) -> None:
        now = time.time()
        with self._lock:
            expired = [k for k in self._expiring if (r := self._index.get(k)) and r.expires_at and r.expires_at <= now]
        for key in expired:
            self.delete(key)

    def _copy_locked(self, rec: ObjectRecord, tier: str) -> Any:
        """``rec``'s copy on ``tier``, attached or in its graveyard; None if it has none there.

        A leased record may be overwritten, deleted or moved before its reader
        looks: the copies taken from it wait in its graveyard until the last
        lease ends, and they hold this very version's bytes.
        """
        loc = getattr(rec, tier)
        if loc is None:
            loc = next((old for t, old in reversed(rec.graveyard) if t == tier), None)
        return loc

    def read_location(self, rec: ObjectRecord, *, promote: bool = True, evict: bool = False) -> HostLocation | None:
        """The host copy of leased ``rec`` to read from, promoting it when there is room.

        None when the object is only on a lower tier (read it with :meth:`read_into`).
        The location stays valid while the lease is held, even if the object
        is demoted, replaced or deleted meanwhile (see :meth:`_copy_locked`).
        """
        with self._lock:
            host_loc = self._copy_locked(rec, "host")
            lower = next((t for t in self.tiers if t != "host" and self._copy_locked(rec, t) is not None), None)
            if host_loc is not None or lower is None:
                self._counters["host"].hits += 1
                self._counters["host"].bytes_out += rec.nbytes
                return host_loc
            # A miss on every tier above the one that has it.
            for tier in self.tiers:
                if tier == lower:
                    self._counters[tier].hits += 1
                    break
                self._counters[tier].misses += 1
        if promote and rec.nbytes and rec.live:
            loc = self._promote(rec, evict=evict)
            if loc is not None:
                with self._lock:
                    self._counters["host"].bytes_out += rec.nbytes
            return loc
        return None

    def read_into(self, rec: ObjectRecord, dest: torch.Tensor | memoryview, *, promote: bool = True) -> None:
        """Copy leased ``rec``'s bytes into the flat uint8 tensor ``dest``.

        Raises:
            CorruptObject: the nvme copy fails its checksum.
        """
        if rec.nbytes == 0:
            return
        loc = self.read_location(rec, promote=promote)
        if loc is not None:
            self.host.copy_out(loc, dest)
            return
        if isinstance(dest, memoryview):
            dest = _tensor_of(dest)
        with self._lock:
            # Promoted meanwhile by someone else: the host copy; else the lower one.
            for source in TIER_ORDER:
                loc = self._copy_locked(rec, source)
                if loc is not None:
                    break
            else:
                raise InternalError(f"leased object {user_key(rec.key)!r} has no copy on any tier")
        if source == "host":
            self.host.copy_out(loc, dest)
            return
        self._read_lower(source, loc, dest, rec)
        with self._lock:
            self._counters[source].bytes_out += rec.nbytes

    def _timed_nvme_read(self, loc: Any, dest: torch.Tensor, rec: ObjectRecord) -> None:
        started = time.perf_counter()
        self.nvme.read_into(loc, dest, itemsize=rec.meta.itemsize)
        elapsed = time.perf_counter() - started
        # GDSF's cost of a miss comes from what reads really cost here (EWMA).
        if rec.nbytes >= (1 << 20):
            self._cost.bytes_per_s = 0.8 * self._cost.bytes_per_s + 0.2 * (rec.nbytes / max(elapsed, 1e-9))
        elif rec.nbytes <= (64 << 10):
            self._cost.latency_s = 0.8 * self._cost.latency_s + 0.2 * elapsed

    def _promote(self, rec: ObjectRecord, *, evict: bool, into: str = "host") -> HostLocation | None:
        """Bring leased ``rec`` up into ``into`` (host, or cxl); its location there, or None if no room."""
        arena = self.tiers.arena(into)
        with self._lock:
            if getattr(rec, into) is not None:
                return getattr(rec, into)  # type: ignore[no-any-return]
            source = next((t for t in self.tiers.below(into) if getattr(rec, t) is not None), None)
            if source is None:
                return None
            loc = getattr(rec, source)  # our lease keeps it readable (graveyard) whatever happens to rec
        ext = self._alloc_arena(arena, rec.nbytes, evict=evict)
        if ext is None:
            self._wake.set()  # make room for next time
            return None
        try:
            # Aligned extent: O_DIRECT reads land in it with no bounce copy.
            self._read_lower(source, loc, arena.view(ext), rec)
        except BaseException:
            arena.free(ext)
            raise
        with self._lock:
            self._counters[source].bytes_out += rec.nbytes
            if not rec.live or getattr(rec, into) is not None:
                # Replaced, deleted or promoted meanwhile: our copy is still a
                # correct image of this version; hand it to the reader and
                # let the lease free it.
                rec.graveyard.append((into, ext))
                return ext
            self._set_location(rec, into, ext)
            self._counters[into].bytes_in += rec.nbytes
            self._counters[into].promoted += rec.nbytes
            # A volatile copy moves up (a cxl one always: cxl is a cache for a
            # durable object). A durable nvme copy stays (it is the durable
            # copy), and so does a remote one (other stores may share it).
            if source == "cxl" or (source == "nvme" and not rec.durable):
                self._take_location(rec, source)
        return ext

    def _read_lower(self, tier: str, loc: Any, dest: torch.Tensor, rec: ObjectRecord) -> None:
        if dest.device.type != "cpu" and not (tier == "nvme" and self.nvme.gds):
            staged = torch.empty(dest.numel(), dtype=torch.uint8)  # only nvme reads into device memory
            self._read_lower(tier, loc, staged, rec)
            dest.copy_(staged)
            return
        if tier == "cxl":
            assert self.cxl is not None
            self.cxl.copy_out(loc, dest)
        elif tier == "nvme":
            self._timed_nvme_read(loc, dest, rec)
        else:
            assert self.remote is not None
            self.remote.read_into(loc, dest, itemsize=rec.meta.itemsize)

    def move(self, key: str, tier: str) -> None:
        """Promote or demote ``key`` to ``tier`` now.

        Raises:
            NotFound, InvalidArgument (unknown tier), OutOfSpace (no room there).
        """
        if tier not in self.tiers:
            raise InvalidArgument(f"unknown tier {tier!r}; choose one of {list(self.tiers)}")
        with self.lease(key) as rec:
            if tier in ("host", "cxl"):
                if rec.nbytes and tier == "cxl" and rec.host is not None:
                    self._demote_leased(rec, "host", "cxl")
                elif rec.nbytes and self._promote(rec, evict=True, into=tier) is None:
                    raise OutOfSpace(f"{tier} tier has no room for {user_key(key)!r} ({rec.nbytes} bytes)")
                return
            for source in ("host", "cxl"):
                if getattr(rec, source) is not None and rec.nbytes:
                    self._demote_leased(rec, source, "nvme")

    def _demote_leased(self, rec: ObjectRecord, source: str, dest: str) -> None:
        """``move``'s demotion of leased ``rec`` from ``source`` to ``dest``; OutOfSpace if no room there."""
        with self._lock:
            if getattr(rec, source) is None:
                return
            if rec.moving:
                raise Busy(f"{user_key(rec.key)!r} is being moved already; try again")
            rec.moving = True
            rec.readers += 1
        if not self._demote(rec, source, dest):
            raise OutOfSpace(f"{dest} tier has no room for {user_key(rec.key)!r} ({rec.nbytes} bytes)")

    def prefetch(self, keys: Iterable[str], tier: str = "host") -> None:
        """Start bringing ``keys`` up to ``tier`` in the background; never raises for a key."""
        self._check_open()
        if tier not in self.tiers:
            raise InvalidArgument(f"unknown tier {tier!r}; choose one of {list(self.tiers)}")
        if tier != "host":
            return
        for key in keys:
            self._prefetch_pool.submit(self._prefetch_one, key)

    def _prefetch_one(self, key: str) -> None:
        try:
            with self.lease(key) as rec:
                if rec.host is None and rec.nbytes:
                    self._promote(rec, evict=True)
        except TierdError as exc:
            log.debug("prefetch of %r skipped: %s", user_key(key), exc)

    # -- queries and delete ----------------------------------------------------

    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed. A durable delete is committed before it returns."""
        self._check_open()
        with self._commit_lock:
            with self._lock:
                rec = self._index.get(key)
                if rec is None:
                    return False
            if rec.durable:
                self._durable.delete(key)
            with self._lock:
                if self._index.get(key) is rec:
                    self._retire_locked(rec)
        if rec.remote is not None and self._shared is not None:
            self._shared.forget(key)  # other stores must not adopt it any more
        if self._trace is not None:
            self._trace.write("delete", key, rec.nbytes, rec.tier)
        return True

    def exists(self, key: str) -> bool:
        """Whether ``key`` can be read. An object whose only copy is remote is checked on the
        server (Redis may have evicted or expired it); one that is gone is forgotten here."""
        with self._lock:
            try:
                rec = self._lookup_locked(key)
            except NotFound:
                if self.remote is None or key in self._index:  # absent, or present but expired
                    return False
                rec = None
        if rec is None:
            if not self._adopt_quietly(key):
                return False
            with self._lock:
                rec = self._index.get(key)
            if rec is None:
                return False
        if (rec.host is not None or rec.cxl is not None or rec.nvme is not None or rec.remote is None
                or self.remote is None):
            return True
        try:
            if self.remote.present(rec.remote):
                return True
        except TierdError as exc:
            log.warning("remote check of %r failed: %s", user_key(key), exc)
            return False
        log.info("%r is gone from the remote tier (evicted or expired there); forgetting it", user_key(key))
        with self._commit_lock, self._lock:
            if self._index.get(key) is rec:
                self._retire_locked(rec)
        if self._shared is not None:
            self._shared.forget(key)
        return False

    def locations(self, key: str) -> dict[str, Any]:
        """Where each copy of ``key`` lives now: tier name -> that tier's location, fastest first.

        For tools and tests that check the medium itself (a checksum kind, a
        byte flipped on disk); the locations are the tiers' own records.
        """
        with self._lock:
            rec = self._lookup_locked(key)
            return {t: loc for t in TIER_ORDER if (loc := getattr(rec, t)) is not None}

    def info(self, key: str) -> ObjectInfo:
        if not self.exists(key):
            with self._lock:
                self._lookup_locked(key)  # raises the right NotFound
        with self._lock:
            rec = self._lookup_locked(key)
            on = tuple(t for t in TIER_ORDER if getattr(rec, t) is not None)
            stored = self.nvme.stored_nbytes(rec.nvme) if rec.nvme is not None else rec.nbytes
            return ObjectInfo(
                key=key, tier=rec.tier, nbytes=rec.nbytes, stored_nbytes=stored,
                dtype="bytes" if rec.meta.kind == "bytes" else rec.meta.dtype,
                shape=rec.meta.shape, codec=rec.codec, durable=rec.durable, pinned=rec.pinned,
                tiers=on, expires_at=rec.expires_at,
            )

    def keys(self, prefix: str = "") -> list[str]:
        now = time.time()
        with self._lock:
            return sorted(
                k for k, r in self._index.items()
                if k.startswith(prefix) and (r.expires_at is None or r.expires_at > now)
            )

    def stats(self) -> Stats:
        tiers = {}
        now = time.time()
        with self._lock:
            # Expired objects are gone for users even before the sweeper frees them.
            expired = sum(1 for k in self._expiring if (r := self._index.get(k)) and r.expires_at and r.expires_at <= now)
            objects = len(self._index) - expired
            for name, tier in self.tiers.items():
                use, c = tier.usage(), self._counters[name]
                tiers[name] = TierStats(
                    name=name, capacity_bytes=use.capacity_bytes, used_bytes=use.used_bytes,
                    objects=c.objects, hits=c.hits, misses=c.misses, bytes_in=c.bytes_in,
                    bytes_out=c.bytes_out, promoted_bytes=c.promoted, demoted_bytes=c.demoted,
                    largest_free_bytes=use.largest_free_bytes, fragmentation=use.fragmentation,
                )
        return Stats(tiers=tiers, objects=objects)

    def is_small_on_host(self, key: str, max_bytes: int) -> bool:
        """Whether ``key`` holds at most ``max_bytes`` with a host copy (a get without I/O)."""
        with self._lock:
            rec = self._index.get(key)
            return rec is not None and rec.nbytes <= max_bytes and (rec.host is not None or rec.nbytes == 0)

    def healthy(self) -> bool:
        """False once background demotion has died or the engine is closed."""
        return not self._closed and self._mover.is_alive()

    def namespace_usage(self) -> dict[str, int]:
        """Bytes stored per namespace."""
        with self._lock:
            return {ns: used for ns, used in self._ns_used.items() if used}

    def apply_config(self, config: Config) -> None:
        """Take the parts of a reloaded config that apply live: namespaces and quotas.

        Tier sizes and paths need a restart; a change to them is logged and ignored.
        """
        if config.tiers != self.config.tiers:
            log.warning("tier settings changed in the config: they apply at the next restart")
        with self._lock:
            self.config = msgspec.structs.replace(
                self.config, namespaces=config.namespaces,
                daemon=msgspec.structs.replace(self.config.daemon, uid_quota=config.daemon.uid_quota,
                                               lease_s=config.daemon.lease_s),
            )
            self._policies.swap(self._index.values())

    def close(self) -> None:
        """Stop background work, flush nvme, close the index; idempotent."""
        with self._commit_lock, self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.set()
        self._mover.join(timeout=30)
        self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self._durable.close()
        self.tiers.close()
        if self._trace is not None:
            self._trace.close()
