"""Movement: room in a tier (eviction by the namespaces' policies), demotion, promotion, watermarks, expiry.

A put lands in the highest allowed tier with room; when an arena (host,
cxl) has no free extent, its least valuable objects are demoted one tier
down first: host -> cxl (when configured) -> nvme (-> remote). A background
thread demotes from host (and cxl) whenever its use passes the high
watermark, until it is under the low one, and deletes expired objects. A get
from cxl or nvme promotes the object into host when there is room. Demotion
never drops an object: if nvme is full the victim stays where it is and the
put that needed room gets :class:`OutOfSpace`.

Every move leases the record it moves (``readers``) and marks it ``moving``
under the catalog's lock, copies with no lock held, then installs the new
copy only if the record is still live; otherwise the new copy is freed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from tierd.codecs import get_codec
from tierd.engine.catalog import Catalog
from tierd.engine.index import ObjectRecord
from tierd.engine.keys import user_key
from tierd.engine.namespaces import NamespacePolicies
from tierd.engine.stack import TierStack
from tierd.errors import Busy, OutOfSpace, TierdError
from tierd.policies import CostModel
from tierd.tiers.host import ArenaTier, HostLocation

__all__ = ["Mover"]

log = logging.getLogger("tierd.engine")


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
        while True:
            loc = arena.alloc(nbytes)
            if loc is not None or not evict:
                return loc
            with self._lock:
                victim = self._pick_victim_locked(tier=arena.name)
            if victim is None or not self.demote(victim, arena.name):
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

    def write_nvme(self, src: torch.Tensor, rec: ObjectRecord, *, durable: bool) -> Any:
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
                self._catalog.release(victim)
                return freed > 0
            with self._lock:
                victim.moving = False
                if victim.live and victim.nvme is not None:
                    if victim.remote is None:
                        self._catalog.set_location(victim, "remote", remote_loc)
                        self._counters["remote"].bytes_in += victim.nbytes
                        self._counters["remote"].demoted += victim.nbytes
                    self._catalog.take_location(victim, "nvme")
                    freed += victim.nbytes
                    indexed = True
                else:
                    indexed = False
            if indexed:
                self._publish_remote(victim)
            elif victim.remote is None:
                self.remote.free(remote_loc)
            self._catalog.release(victim)
        return True

    def demote(self, rec: ObjectRecord, source: str = "host", dest: str | None = None) -> bool:
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
                    new_tier, new_loc = "cxl", self.write_cxl(arena.view(loc), rec.nbytes, evict=True)
                    if new_loc is None and dest == "cxl":
                        raise OutOfSpace(f"cxl tier has no room for {user_key(rec.key)!r} ({rec.nbytes} bytes)")
                if new_loc is None and not below:
                    new_tier, new_loc = "nvme", self.write_nvme(arena.view(loc), rec, durable=False)
        except TierdError as exc:
            log.debug("cannot demote %r: %s", user_key(rec.key), exc)
            with self._lock:
                rec.moving = False
            self._catalog.release(rec)
            return False
        with self._lock:
            rec.moving = False
            if rec.live and getattr(rec, source) is not None:
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
        self._catalog.release(rec)
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
            if getattr(rec, into) is not None:
                return getattr(rec, into)  # type: ignore[no-any-return]
            source = next((t for t in self.tiers.below(into) if getattr(rec, t) is not None), None)
            if source is None:
                return None
            loc = getattr(rec, source)  # our lease keeps it readable (graveyard) whatever happens to rec
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
            if not rec.live or getattr(rec, into) is not None:
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
            if getattr(rec, source) is None:
                return
            if rec.moving:
                raise Busy(f"{user_key(rec.key)!r} is being moved already; try again")
            rec.moving = True
            rec.readers += 1
        if not self.demote(rec, source, dest):
            raise OutOfSpace(f"{dest} tier has no room for {user_key(rec.key)!r} ({rec.nbytes} bytes)")
