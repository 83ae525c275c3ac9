"""The engine's front: the calls ``tierd.open()`` and the daemon make.

Keys reaching the engine are trusted: the embedded store and the daemon
validate what users send (:func:`tierd.engine.keys.validate_key`) before
calling in; the daemon also scopes keys to their uid. The engine stores byte
strings (flat uint8 tensors) under keys; turning values into bytes and back
is the clients' job (:mod:`tierd.clients.transfer`).

It hands out handles, not internals: ``reserve`` gives a
:class:`~tierd.engine.handles.Reservation` (a put between its phases),
``acquire``/``lease`` a :class:`~tierd.engine.handles.Lease` (a read). Its
parts: the tiers (stack.py, a TierStack, fastest first), the records and
their bookkeeping under one lock (catalog.py, Note there on locking, leases
and moves), the put path (writes.py, carrying out placement.py's plan),
moving bytes between tiers (movement.py), the remote tier's shared index
(remote_index.py) and the durable LMDB index (index.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec
import torch

from tierd.config import Config
from tierd.engine.batch import BatchCalls
from tierd.engine.catalog import Catalog
from tierd.engine.handles import Lease, Reservation
from tierd.engine.index import DurableIndex, ObjectMeta, ObjectRecord
from tierd.engine.keys import namespace_of, user_key
from tierd.engine.movement import Mover
from tierd.engine.namespaces import NamespacePolicies
from tierd.engine.remote_index import RemoteIndex
from tierd.engine.small import SmallCalls
from tierd.engine.stack import TierStack
from tierd.engine.trace import TraceWriter
from tierd.engine.writes import Writer
from tierd.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    OutOfSpace,
    StoreClosed,
    TierdError,
)
from tierd.policies import CostModel
from tierd.types import ObjectInfo, Stats, TierStats
from tierd.units import format_size

__all__ = ["Engine"]

log = logging.getLogger("tierd.engine")

class Engine(BatchCalls, SmallCalls):
    """Owns the tiers and the index. Thread-safe."""

    def __init__(self, config: Config, *, in_process: bool = False) -> None:
        self.config = config
        self.tiers = TierStack(config, gds=in_process and config.tiers.nvme.gds == "auto")
        self.host, self.cxl, self.nvme, self.remote = self.tiers.host, self.tiers.cxl, self.tiers.nvme, self.tiers.remote
        self._cost = CostModel()  # refined from measured nvme reads
        self._policies = NamespacePolicies(lambda: self.config, self._cost)
        self._policies.room = self._room
        self._catalog = Catalog(self.tiers, self._policies)
        # The catalog's state under the names the front uses (Note: the same objects, not copies).
        self._lock, self._commit_lock, self._index = self._catalog.lock, self._catalog.commit_lock, self._catalog.index
        self._counters, self._ns_used, self._owner_used = (self._catalog.counters, self._catalog.ns_used,
                                                           self._catalog.owner_used)
        self._expiring = self._catalog.expiring
        self._moves = Mover(self._catalog, self.tiers, self._policies, self._cost,
                            publish_remote=self._publish_remote, delete=self.delete)
        self._trace = TraceWriter(config.trace.path) if config.trace.path else None
        self._closed = False
        self._shared = RemoteIndex(self.remote) if self.remote is not None else None
        self._writer = Writer(lambda: self.config, self.tiers, self._catalog, self._policies, self._moves,
                              self._shared, commit=self._commit)
        try:
            self._durable = DurableIndex(Path(config.tiers.nvme.path) / "index.lmdb")
            self._load_durable()
        except BaseException:
            if getattr(self, "_durable", None) is not None:
                self._durable.close()
            self.tiers.close()
            raise
        self._prefetch_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="tierd-prefetch")
        # A batch's promotions, side by side (BatchCalls.host_locations).
        self._promote_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tierd-promote")
        self._moves.start()

    # -- index bookkeeping (callers hold _lock) --------------------------------

    def _load_durable(self) -> None:
        now = time.time()
        stale: list[str] = []
        outside: list[int] = []  # spans of durable objects a smaller tiers.nvme.size would lose
        for key, entry in self._durable.entries():
            if entry is None or (entry.expires_at is not None and entry.expires_at <= now):
                stale.append(key)
                continue
            span = self.nvme.span(entry.location)
            if span > self.nvme.capacity_bytes:
                outside.append(span)
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
                copies={"nvme": entry.location}, owner=entry.owner,
            )
            self._catalog.install_locked(rec)
        if outside:
            raise ConfigError(
                f"tiers.nvme.size ({format_size(self.nvme.capacity_bytes)}) is smaller than the durable data under "
                f"{str(self.nvme.path)!r}: {len(outside)} durable objects lie beyond it; nothing was dropped. Set "
                f"tiers.nvme.size to at least {format_size(max(outside))}, or delete those objects under the old size")
        if stale:
            self._durable.delete(*stale)
        log.info("restored %d durable objects from %s", len(self._index), self.nvme.path)

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosed("the store is closed")

    # -- leases ----------------------------------------------------------------

    def acquire(self, key: str) -> Lease:
        """Lease ``key``'s current version: its bytes stay readable until ``lease.release()``.

        A key missing here is looked up in the remote tier's shared index.
        The lease is also a context manager (see :meth:`lease`).

        Raises:
            NotFound: no such key (or it expired).
        """
        try:
            rec = self._acquire_local(key)
        except NotFound:
            if not self._adopt_quietly(key):
                raise
            rec = self._acquire_local(key)
        return Lease(self._catalog, self._moves, rec)

    def _adopt_quietly(self, key: str) -> bool:
        """Remote fallback of a lookup: an unreachable server is a miss, not an error."""
        try:
            return self._adopt_remote(key)
        except TierdError as exc:
            assert self.remote is not None  # only the remote tier raises here
            self.remote.failures.warning(log, "remote lookup of %r skipped: %s", user_key(key), exc)  # throttled
            return False

    def _acquire_local(self, key: str) -> ObjectRecord:
        with self._lock:
            self._check_open()
            rec = self._catalog.lookup_locked(key)
            rec.readers += 1
            self._policies.on_access(rec)
            upcoming = self._observe_locked(rec.namespace, key)
        if self._trace is not None:
            self._trace_write("get", key, rec.nbytes, rec.tier)
        if upcoming:
            self.prefetch(upcoming)  # overlaps the next objects' promotion with this one's use
        return rec

    def lease(self, key: str) -> Lease:
        """``with engine.lease(key) as lease:``, released when the block ends (same as :meth:`acquire`)."""
        return self.acquire(key)

    # -- put -------------------------------------------------------------------

    def reserve(self, key: str, nbytes: int, meta: ObjectMeta, **options: Any) -> Reservation:
        """First phase of a put: check everything and reserve room in the host arena.

        The caller writes the object's bytes into ``reservation.view`` (when it
        is not None) and calls ``reservation.commit()``, or hands the bytes to
        ``commit(src)``; ``abort()`` gives the room back. ``options``: ``tier``,
        ``durable``, ``codec``, ``pin``, ``ttl``, ``owner`` (a daemon client's
        uid, for its quota) and ``stage`` (demote others to find staging room
        even for durable or nvme-bound puts: a daemon client has no other way to
        hand over large bytes).

        Raises:
            InvalidArgument, QuotaExceeded, StoreClosed.
        """
        self._check_open()
        return self._writer.reserve(key, nbytes, meta, **options)

    def put(self, key: str, src: torch.Tensor | memoryview, meta: ObjectMeta, **options: Any) -> None:
        """Store ``src`` (a flat uint8 tensor, or a byte memoryview) under ``key``: both phases at once.

        ``options`` are those of :meth:`reserve`.
        """
        self._check_open()
        nbytes = src.nbytes if isinstance(src, memoryview) else src.numel()
        self._writer.reserve(key, nbytes, meta, **options).commit(src)

    def _commit(self, recs: list[ObjectRecord]) -> list[ObjectRecord | None]:
        """Install ``recs`` (LMDB first for durable objects, one transaction); the records they replaced."""
        with self._commit_lock:
            with self._lock:
                self._check_open()
                olds = [self._index.get(rec.key) for rec in recs]
            # LMDB ends as the last record of each key says (a batch may name a key twice).
            last = {rec.key: rec for rec in recs}
            was_durable = {rec.key for rec in recs if rec.durable}
            was_durable.update(old.key for old in olds if old is not None and old.durable)
            puts = {k: r.durable_entry() for k, r in last.items() if r.durable}
            gone = [k for k, r in last.items() if not r.durable and k in was_durable]
            if puts or gone:
                self._durable.write(puts, gone)
            upcoming: list[str] = []
            with self._lock:
                for rec in recs:
                    self._catalog.install_locked(rec)
                    upcoming += self._observe_locked(rec.namespace, rec.key)
        if self._trace is not None:
            for rec in recs:
                self._trace_write("put", rec.key, rec.nbytes, rec.tier)
        if upcoming:
            self.prefetch(upcoming)
        return olds

    # -- movement --------------------------------------------------------------

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
                           codec=entry.codec, durable=False, pinned=False, expires_at=None,
                           copies={"remote": entry.location})
        with self._commit_lock, self._lock:
            if key in self._index:
                return True  # someone installed it meanwhile
            self._shared.remote.adopt(entry.location)
            self._catalog.install_locked(rec)
        return True

    # -- namespaces, schedules, traces -------------------------------------------

    def _observe_locked(self, namespace: str, key: str) -> list[str]:
        """Feed the schedule with an access; the keys worth promoting now (not on host yet)."""
        out = []
        for k in self._policies.observe(namespace, key):
            rec = self._index.get(k)
            if k != key and rec is not None and "host" not in rec.copies and rec.nbytes and not rec.moving:
                out.append(k)
        return out

    def _room(self, tier: str, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit in arena ``tier`` under its low watermark (nothing would be demoted)."""
        for arena, _, low in self.tiers.watermarks:
            if arena.name == tier:
                return arena.used_bytes + nbytes <= low
        return False

    def _trace_write(self, op: str, key: str, nbytes: int, tier: str) -> None:
        assert self._trace is not None
        with self._lock:
            parent = self._policies.parent_of(namespace_of(key), key)
        self._trace.write(op, key, nbytes, tier, parent)

    def declare_schedule(self, keys: list[str], *, cyclic: bool = True) -> None:
        """The coming access order of ``keys`` (any namespaces), for schedule-aware policies."""
        by_ns: dict[str, list[str]] = {}
        for key in keys:
            by_ns.setdefault(namespace_of(key), []).append(key)
        with self._lock:
            self._policies.declare_schedule(by_ns, cyclic=cyclic)

    def declare_prefix(self, chain: list[str], *, done: bool = False) -> bool:
        """``chain`` is one prefix chain, head first, as ``validate_chain`` returns it (see
        :meth:`tierd.Store.declare_prefix`; ``done``: it is over); whether its namespace keeps such
        hints (its policy or admission is ``prefix``)."""
        if not chain:
            return True
        with self._lock:
            kept = self._policies.declare_prefix(namespace_of(chain[0]), chain, done=done)
        if done and kept and self._trace is not None:
            self._trace.write("done", chain[-1], 0, "")  # replayed by the simulator: the chain's end
        return kept

    def move(self, key: str, tier: str) -> None:
        """Promote or demote ``key`` to ``tier`` now.

        Raises:
            NotFound, InvalidArgument (unknown tier), OutOfSpace (no room there).
        """
        if tier not in self.tiers:
            raise InvalidArgument(f"unknown tier {tier!r}; choose one of {list(self.tiers)}")
        with self.lease(key) as lease:
            rec = lease.rec
            if tier in ("host", "cxl"):
                if rec.nbytes and tier == "cxl" and "host" in rec.copies:
                    self._moves.demote_leased(rec, "host", "cxl")
                elif rec.nbytes and self._moves.promote(rec, evict=True, into=tier) is None:
                    raise OutOfSpace(f"{tier} tier has no room for {user_key(key)!r} ({rec.nbytes} bytes)")
                return
            for source in ("host", "cxl"):
                if source in rec.copies and rec.nbytes:
                    self._moves.demote_leased(rec, source, "nvme")

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
            with self.lease(key) as lease:
                if not lease.on("host") and lease.nbytes:
                    self._moves.promote(lease.rec, evict=True)
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
                    self._catalog.retire_locked(rec)
                    self._policies.on_delete(rec)
        if "remote" in rec.copies and self._shared is not None:
            self._shared.forget(key)  # other stores must not adopt it any more
        if self._trace is not None:
            self._trace_write("delete", key, rec.nbytes, rec.tier)
        return True

    def exists(self, key: str) -> bool:
        """Whether ``key`` can be read. An object whose only copy is remote is checked on the
        server (Redis may have evicted or expired it); one that is gone is forgotten here."""
        with self._lock:
            try:
                rec = self._catalog.lookup_locked(key)
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
        remote_loc = rec.on("remote")
        if remote_loc is None or len(rec.copies) > 1 or self.remote is None:
            return True
        try:
            if self.remote.present(remote_loc):
                return True
        except TierdError as exc:
            self.remote.failures.warning(log, "remote check of %r failed: %s", user_key(key), exc)  # throttled
            return False
        log.info("%r is gone from the remote tier (evicted or expired there); forgetting it", user_key(key))
        with self._commit_lock, self._lock:
            if self._index.get(key) is rec:
                self._catalog.retire_locked(rec)
        if self._shared is not None:
            self._shared.forget(key)
        return False

    def locations(self, key: str) -> dict[str, Any]:
        """Where each copy of ``key`` lives now: tier name -> that tier's location, fastest first.

        For tools and tests that check the medium itself (a checksum kind, a
        byte flipped on disk); the locations are the tiers' own records.
        """
        with self._lock:
            rec = self._catalog.lookup_locked(key)
            return {t: rec.copies[t] for t in rec.tiers}

    def info(self, key: str) -> ObjectInfo:
        if not self.exists(key):
            with self._lock:
                self._catalog.lookup_locked(key)  # raises the right NotFound
        with self._lock:
            rec = self._catalog.lookup_locked(key)
            on = rec.tiers
            nvme_loc = rec.on("nvme")
            stored = self.nvme.stored_nbytes(nvme_loc) if nvme_loc is not None else rec.nbytes
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
            expired = len(self._catalog.expired_locked(now))
            objects = len(self._index) - expired
            for name, tier in self.tiers.items():
                use, c = tier.usage(), self._counters[name]
                tiers[name] = TierStats(
                    name=name, capacity_bytes=use.capacity_bytes, used_bytes=use.used_bytes,
                    objects=c.objects, hits=c.hits, misses=c.misses, bytes_in=c.bytes_in,
                    bytes_out=c.bytes_out, promoted_bytes=c.promoted, demoted_bytes=c.demoted,
                    largest_free_bytes=use.largest_free_bytes, fragmentation=use.fragmentation,
                    evicted=c.evicted, evicted_bytes=c.evicted_bytes,
                )
        return Stats(tiers=tiers, objects=objects)

    def healthy(self) -> bool:
        """False once background demotion has died or the engine is closed."""
        return not self._closed and self._moves.alive()

    def namespace_usage(self) -> dict[str, int]:
        """Bytes stored per namespace."""
        with self._lock:
            return {ns: used for ns, used in self._ns_used.items() if used}

    def namespace_policies(self) -> dict[str, dict[str, Any]]:
        """Per namespace in use: its policies and what they learned (admission per kind, experts' trust)."""
        with self._lock:
            return self._policies.describe()

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
        self._moves.stop(timeout_s=30)
        self._prefetch_pool.shutdown(wait=True, cancel_futures=True)
        self._promote_pool.shutdown(wait=True, cancel_futures=True)
        self._durable.close()
        self.tiers.close()
        if self._trace is not None:
            self._trace.close()
