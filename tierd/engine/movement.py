"""Movement: room in a tier (eviction by the namespaces' policies), demotion, promotion, watermarks, expiry.

A put lands in the highest allowed tier with room; when an arena (host,
cxl) has no free extent, its least valuable objects are demoted one tier
down first: host -> cxl (when configured) -> nvme (-> remote). A background
thread demotes from host (and cxl) whenever its use passes the high
watermark, until it is under the low one, and deletes expired objects. A get
from cxl or nvme promotes the object into host when there is room.

Caches
    When the lowest tier has no room (nvme, and the remote tier below it
    where configured, refuses the bytes), volatile objects of cache
    namespaces (``Config.is_cache``) are dropped to admit new ones: on nvme,
    the namespace furthest over its share first
    (:meth:`NamespacePolicies.drop_order`); a host victim with nowhere to go
    is itself dropped when it is a cache object. Nothing else is ever
    dropped: durable and pinned objects, objects being read, and every
    object of a non-cache namespace stay where they are, and the put that
    needed the room gets :class:`OutOfSpace` naming who holds the tier.

Every move claims the record it moves under the catalog's lock (a
:class:`~tierd.engine.catalog.Move`: marked ``moving`` and leased), copies
with no lock held, then installs the new copy only if the record is still
live (otherwise the new copy is freed); the claim ends with its ``with``
block, however the copy went.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tierd.codecs import get_codec
from tierd.engine.catalog import Catalog, Move
from tierd.engine.index import ObjectRecord
from tierd.engine.keys import user_key
from tierd.units import format_size
from tierd.engine.namespaces import NamespacePolicies
from tierd.engine.placement import demotion_targets
from tierd.engine.stack import TierStack
from tierd.errors import Busy, OutOfSpace, TierdError
from tierd.policies import CostModel
from tierd.tiers.host import ArenaTier, HostLocation

__all__ = ["Mover"]

log = logging.getLogger("tierd.engine")

# Victims that found no room below, tried before a room search gives up (each costs a failed write).
_STUCK_VICTIMS = 64


class Mover:
    """Moves bytes between the tiers of ``tiers`` for the records of ``catalog``; runs the demotion thread."""

    def __init__(self, catalog: Catalog, tiers: TierStack, policies: NamespacePolicies, cost: CostModel, *,
                 publish_remote: Callable[[ObjectRecord], None], delete: Callable[[str], bool]) -> None:
        self._catalog = catalog
        self._lock, self._index, self._counters = catalog.lock, catalog.index, catalog.counters
        self._policies = policies
        self._cost = cost  # refined here from measured nvme reads
        self.tiers = tiers
        self.host, self.cxl, self.nvme, self.remote = tiers.host, tiers.cxl, tiers.nvme, tiers.remote
        self._watermarks = tiers.watermarks
        self._publish_remote = publish_remote
        self.delete = delete
        self._closed = False
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tierd-demote", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Ask the background thread to check the watermarks now."""
        self._wake.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._closed = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def alloc_host(self, nbytes: int, *, evict: bool = True) -> HostLocation | None:
        """A host extent for ``nbytes``, demoting LRU objects to make room; None if impossible."""
        return self.alloc_arena(self.host, nbytes, evict=evict)

    def alloc_arena(self, arena: ArenaTier, nbytes: int, *, evict: bool = True) -> HostLocation | None:
        """An extent of ``arena`` (host or cxl) for ``nbytes``, demoting its least valuable
        objects one tier down to make room; None if impossible."""
        if nbytes > arena.capacity_bytes:
            return None
        stuck: set[str] = set()  # victims with nowhere to go: the next one may have
        while True:
            loc = arena.alloc(nbytes)
            if loc is not None or not evict:
                return loc
            with self._lock:
                victim = self._pick_victim_locked(tier=arena.name, skip=stuck)
            if victim is None:
                return None
            key = victim.rec.key
            if not self.demote(victim, arena.name, may_drop=True):
                stuck.add(key)
                if len(stuck) >= _STUCK_VICTIMS:
                    return None

    def write_cxl(self, src: torch.Tensor | memoryview | None, nbytes: int, *, evict: bool) -> HostLocation | None:
        """Copy ``nbytes`` of ``src`` into a new cxl extent; None when the cxl tier has no room."""
        assert self.cxl is not None and src is not None  # callers check both
        loc = self.alloc_arena(self.cxl, nbytes, evict=evict)
        if loc is not None:
            self.cxl.copy_in(loc, src)
            if self.over_high_watermark():
                self._wake.set()
        return loc

    def over_high_watermark(self) -> bool:
        return any(arena.used_bytes > high for arena, high, _ in self._watermarks)

    def _pick_victim_locked(self, need_bytes: int = 0, tier: str = "host",
                            skip: set[str] | None = None) -> Move | None:
        """The least valuable object of ``tier`` that may leave, claimed for its demotion.

        The order comes from the namespaces' policies; here, what may not move
        is skipped (and the keys in ``skip``). On nvme, durable objects never
        leave (their nvme copy is the durable one), nor do objects with a copy above.
        """
        for key in self._policies.victims(tier, need_bytes):
            rec = self._index.get(key)
            if rec is None or rec.pinned or rec.moving or rec.on(tier) is None or (skip and key in skip):
                continue
            if tier == "nvme" and (rec.durable or "host" in rec.copies or "cxl" in rec.copies):
                continue
            return self._catalog.claim_locked(rec)  # its lease keeps the copy readable while it moves
        return None

    def write_nvme(self, src: torch.Tensor, rec: ObjectRecord, *, durable: bool) -> Any:
        """Write to nvme; when it is full, demote nvme objects to the remote tier (when there is one),
        else drop cache objects from nvme (Caches, above); OutOfSpace naming who holds nvme when
        neither makes room."""
        for _ in range(64):
            try:
                return self.nvme.write(src, codec=get_codec(rec.codec), itemsize=rec.meta.itemsize, durable=durable)
            except OutOfSpace as exc:
                need = src.numel()
                if self.remote is not None and self._demote_nvme(need):
                    continue
                if not self.drop_for("nvme", need):
                    raise OutOfSpace(f"{exc}; {self.holders_message('nvme')}") from None
        raise OutOfSpace("nvme tier stays full although objects were moved down or dropped")

    # -- caches ------------------------------------------------------------------

    def _droppable_locked(self, rec: ObjectRecord | None, tier: str, *, claimed: bool = False) -> bool:
        """Whether ``rec``'s copy on ``tier`` may be dropped for room: a volatile, unpinned object of a
        cache namespace that no one reads or moves now (``claimed``: but for this mover's own claim)."""
        if rec is None or not rec.live or rec.durable or rec.pinned or rec.on(tier) is None:
            return False
        if rec.readers > int(claimed) or (rec.moving and not claimed):
            return False
        return self._policies.is_cache(rec.namespace)

    def drop_for(self, tier: str, need_bytes: int) -> int:
        """Drop cache objects' copies from ``tier`` (nvme) until ``need_bytes`` are free; the bytes freed."""
        capacity = self.tiers[tier].usage().capacity_bytes
        chosen: list[ObjectRecord] = []
        freed = 0
        with self._catalog.commit_lock, self._lock:
            # Chosen in one pass, dropped after it: a policy's victims may not change while it yields them.
            for key in self._policies.drop_order(tier, capacity):
                rec = self._index.get(key)
                if self._droppable_locked(rec, tier):
                    assert rec is not None
                    chosen.append(rec)
                    freed += rec.nbytes
                    if freed >= need_bytes:
                        break
            for rec in chosen:
                self._evict_locked(rec, tier)
        return freed

    def _evict_locked(self, rec: ObjectRecord, tier: str) -> None:
        """Drop ``rec``'s copy on ``tier``; the whole object when that was its last copy (a later get is a
        miss). Expects the commit lock and the lock held."""
        if len(rec.copies) > 1:
            self._catalog.take_location(rec, tier)  # still readable from its other copy: not an eviction
            return
        counters = self._counters[tier]
        counters.evicted += 1
        counters.evicted_bytes += rec.nbytes
        self._catalog.retire_locked(rec)
        self._policies.evicted(rec)
        log.debug("dropped cache object %r from %s for room", user_key(rec.key), tier)

    def holders_message(self, tier: str) -> str:
        """Who holds ``tier`` when nothing more may be dropped from it, and what to change (for OutOfSpace)."""
        with self._lock:
            holders = self._policies.holders(tier)
        held = ", ".join(f"{ns} {format_size(n)}" + (" (durable, pinned or being read)" if cache else "")
                         for ns, n, cache in holders[:4]) or "objects being written"
        return (f"it is held by what may not be dropped: {held}; a namespace whose objects may be lost can be "
                "marked `cache = true`")

    def _demote_nvme(self, need_bytes: int) -> bool:
        """Move nvme objects (least valuable first) to the remote tier until ``need_bytes`` left nvme."""
        assert self.remote is not None
        freed = 0
        while freed < need_bytes:
            with self._lock:
                victim = self._pick_victim_locked(need_bytes - freed, tier="nvme")
            if victim is None:
                return freed > 0
            with victim as rec:
                had_remote = rec.on("remote")
                try:
                    loc = rec.on("nvme")
                    assert loc is not None  # picked because it has an nvme copy; the claim keeps it
                    buf = torch.empty(rec.nbytes, dtype=torch.uint8)
                    self.nvme.read_into(loc, buf, itemsize=rec.meta.itemsize)
                    remote_loc = had_remote or self.remote.write(buf, codec=get_codec(rec.codec),
                                                                 itemsize=rec.meta.itemsize, durable=False,
                                                                 key=rec.key)
                except TierdError as exc:
                    log.warning("cannot demote %r to the remote tier: %s", user_key(rec.key), exc)
                    return freed > 0
                with self._lock:
                    indexed = rec.live and rec.on("nvme") is not None
                    if indexed:
                        if had_remote is None:
                            self._catalog.set_location(rec, "remote", remote_loc)
                            self._counters["remote"].bytes_in += rec.nbytes
                            self._counters["remote"].demoted += rec.nbytes
                        self._catalog.take_location(rec, "nvme")
                        freed += rec.nbytes
                if indexed:
                    self._publish_remote(rec)
                elif had_remote is None:
                    self.remote.free(remote_loc)
        return True

    def demote(self, move: Move, source: str = "host", dest: str | None = None, *, may_drop: bool = False) -> bool:
        """Move the claimed record from ``source`` (host or cxl) one tier down: host -> cxl
        (when configured) -> nvme. ``dest`` forces cxl or nvme. Ends the claim.

        A copy that a lower tier holds already (a durable object's nvme copy, a
        remote one) is not written again: the ``source`` copy is just dropped.
        ``may_drop``: a cache object that finds no room below is dropped instead
        (Caches, above), which counts as done.
        """
        arena = self.tiers.arena(source)
        new_tier, new_loc = "nvme", None
        with move as rec:
            try:
                loc = rec.on(source)
                targets: tuple[str, ...] = ()
                if loc is not None:
                    targets = demotion_targets(source, dest, has_cxl=self.cxl is not None,
                                               below="nvme" in rec.copies or "remote" in rec.copies)
                for new_tier in targets:
                    if new_tier == "cxl":
                        new_loc = self.write_cxl(arena.view(loc), rec.nbytes, evict=True)
                    else:
                        new_loc = self.write_nvme(arena.view(loc), rec, durable=False)
                    if new_loc is not None:
                        break
                if targets and new_loc is None:
                    raise OutOfSpace(f"{targets[-1]} tier has no room for {user_key(rec.key)!r} ({rec.nbytes} bytes)")
            except TierdError as exc:
                log.debug("cannot demote %r: %s", user_key(rec.key), exc)
                if not (may_drop and isinstance(exc, OutOfSpace)):
                    return False
                with self._catalog.commit_lock, self._lock:
                    if not self._droppable_locked(rec, source, claimed=True):
                        return False
                    self._evict_locked(rec, source)  # the claim's end frees the copy
                return True
            with self._lock:
                if rec.live and rec.on(source) is not None:
                    if new_loc is not None:
                        self._catalog.set_location(rec, new_tier, new_loc)
                        new_loc = None
                        self._counters[source].bytes_out += rec.nbytes
                        self._counters[new_tier].bytes_in += rec.nbytes
                        self._counters[new_tier].demoted += rec.nbytes
                    # else: the copy below is already there: dropping this one costs no I/O.
                    self._catalog.take_location(rec, source)
            if new_loc is not None:  # replaced or deleted while we copied
                self.tiers[new_tier].free(new_loc)
        return True

    def _loop(self) -> None:
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
                        # Never dropped here: a cache object is dropped only to admit a new one.
                        if victim is None or not self.demote(victim, arena.name):
                            break
            except Exception:  # the mover must survive anything one object does
                log.exception("background demotion failed")

    def _expire(self) -> None:
        now = time.time()
        with self._lock:
            expired = self._catalog.expired_locked(now)
        for key in expired:
            self.delete(key)

    def _timed_nvme_read(self, loc: Any, dest: torch.Tensor, rec: ObjectRecord) -> None:
        started = time.perf_counter()
        self.nvme.read_into(loc, dest, itemsize=rec.meta.itemsize)
        elapsed = time.perf_counter() - started
        # GDSF's cost of a miss comes from what reads really cost here (EWMA).
        if rec.nbytes >= (1 << 20):
            self._cost.bytes_per_s = 0.8 * self._cost.bytes_per_s + 0.2 * (rec.nbytes / max(elapsed, 1e-9))
        elif rec.nbytes <= (64 << 10):
            self._cost.latency_s = 0.8 * self._cost.latency_s + 0.2 * elapsed

    def promote(self, rec: ObjectRecord, *, evict: bool, into: str = "host") -> HostLocation | None:
        """Bring leased ``rec`` up into ``into`` (host, or cxl); its location there, or None if no room."""
        arena = self.tiers.arena(into)
        with self._lock:
            if rec.on(into) is not None:
                return rec.on(into)  # type: ignore[no-any-return]
            source = next((t for t in self.tiers.below(into) if t in rec.copies), None)
            if source is None:
                return None
            loc = rec.on(source)  # our lease keeps it readable (graveyard) whatever happens to rec
        ext = self.alloc_arena(arena, rec.nbytes, evict=evict)
        if ext is None:
            self._wake.set()  # make room for next time
            return None
        try:
            # Aligned extent: O_DIRECT reads land in it with no bounce copy.
            self.read_lower(source, loc, arena.view(ext), rec)
        except BaseException:
            arena.free(ext)
            raise
        with self._lock:
            self._counters[source].bytes_out += rec.nbytes
            if not rec.live or rec.on(into) is not None:
                # Replaced, deleted or promoted meanwhile: our copy is still a
                # correct image of this version; hand it to the reader and
                # let the lease free it.
                rec.graveyard.append((into, ext))
                return ext
            self._catalog.set_location(rec, into, ext)
            self._counters[into].bytes_in += rec.nbytes
            self._counters[into].promoted += rec.nbytes
            # A volatile copy moves up (a cxl one always: cxl is a cache for a
            # durable object). A durable nvme copy stays (it is the durable
            # copy), and so does a remote one (other stores may share it).
            if source == "cxl" or (source == "nvme" and not rec.durable):
                self._catalog.take_location(rec, source)
        return ext

    def read_lower(self, tier: str, loc: Any, dest: torch.Tensor, rec: ObjectRecord) -> None:
        if dest.device.type != "cpu" and not (tier == "nvme" and self.nvme.gds):
            staged = torch.empty(dest.numel(), dtype=torch.uint8)  # only nvme reads into device memory
            self.read_lower(tier, loc, staged, rec)
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

    def demote_leased(self, rec: ObjectRecord, source: str, dest: str) -> None:
        """``move``'s demotion of leased ``rec`` from ``source`` to ``dest``; OutOfSpace if no room there."""
        with self._lock:
            if rec.on(source) is None:
                return
            if rec.moving:
                raise Busy(f"{user_key(rec.key)!r} is being moved already; try again")
            move = self._catalog.claim_locked(rec)
        if not self.demote(move, source, dest):
            raise OutOfSpace(f"{dest} tier has no room for {user_key(rec.key)!r} ({rec.nbytes} bytes)")
