"""The engine's catalog: the object index and its bookkeeping, under one lock.

Locking
    ``lock`` guards the index, the records, the counters, the usage sums and
    the expiry set (and the namespaces' policies, which the catalog keeps
    informed); it is never held while bytes move. ``commit_lock`` orders
    every change of the index that may touch LMDB (install, delete) so the
    LMDB order is the in-memory order; it is taken before ``lock``, never
    after. Methods named ``*_locked``, and ``set_location``/``take_location``,
    expect ``lock`` held.

Copies and leases
    A record names its copy on each tier (``rec.copies``: tier -> location). A
    copy taken from a record that readers still lease waits in the record's
    graveyard until the last lease ends, so a reader always finds the bytes of
    the version it leased.

Moves
    One mover at a time owns a record's movement: :meth:`Catalog.claim_locked`
    marks it ``moving`` and leases it, and the :class:`Move` it returns, used
    as a context manager around the copy, clears both however the copy ends.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tierd.engine.index import ObjectRecord
from tierd.engine.keys import user_key
from tierd.engine.namespaces import NamespacePolicies
from tierd.engine.stack import TIER_ORDER, TierStack
from tierd.errors import NotFound

__all__ = ["Catalog", "Counters", "Move"]


class Counters:
    """One tier's counters, as ``stats()`` reports them."""

    __slots__ = ("objects", "hits", "misses", "bytes_in", "bytes_out", "promoted", "demoted", "evicted",
                 "evicted_bytes")

    def __init__(self) -> None:
        self.objects = self.hits = self.misses = self.evicted = 0
        self.bytes_in = self.bytes_out = self.promoted = self.demoted = self.evicted_bytes = 0


class Catalog:
    """Records by key, per-tier counters, bytes per namespace and per uid, keys that expire."""

    def __init__(self, tiers: TierStack, policies: NamespacePolicies) -> None:
        self.tiers = tiers
        self._policies = policies
        self.lock = threading.Lock()
        self.commit_lock = threading.Lock()
        self.index: dict[str, ObjectRecord] = {}
        self.counters = {name: Counters() for name in TIER_ORDER}
        self.ns_used: dict[str, int] = {}
        self.owner_used: dict[int | None, int] = {}
        self.expiring: set[str] = set()

    def set_location(self, rec: ObjectRecord, tier: str, loc: Any) -> None:
        rec.copies[tier] = loc
        self.counters[tier].objects += 1
        self._policies.on_insert(rec, tier)

    def take_location(self, rec: ObjectRecord, tier: str) -> None:
        """Detach ``rec``'s copy on ``tier`` and free it once no one reads it."""
        loc = rec.copies.pop(tier, None)
        if loc is None:
            return
        self.counters[tier].objects -= 1
        self._policies.on_remove(rec, tier)
        if rec.readers:
            rec.graveyard.append((tier, loc))
        else:
            self.tiers[tier].free(loc)

    def install_locked(self, rec: ObjectRecord) -> None:
        old = self.index.get(rec.key)
        if old is not None:
            self.retire_locked(old)
        self.index[rec.key] = rec
        self.ns_used[rec.namespace] = self.ns_used.get(rec.namespace, 0) + rec.nbytes
        self.owner_used[rec.owner] = self.owner_used.get(rec.owner, 0) + rec.nbytes
        if rec.expires_at is not None:
            self.expiring.add(rec.key)
        prepared, rec.copies = rec.copies, {}
        for tier in TIER_ORDER:  # fastest first, whatever order the put wrote them in
            if tier in prepared:
                self.set_location(rec, tier, prepared[tier])

    def retire_locked(self, rec: ObjectRecord) -> None:
        rec.live = False
        if self.index.get(rec.key) is rec:
            del self.index[rec.key]
            self.expiring.discard(rec.key)
        self.ns_used[rec.namespace] -= rec.nbytes
        self.owner_used[rec.owner] -= rec.nbytes
        for tier in list(rec.copies):
            self.take_location(rec, tier)

    def lookup_locked(self, key: str) -> ObjectRecord:
        rec = self.index.get(key)
        if rec is None:
            raise NotFound(f"no object {user_key(key)!r}")
        if rec.expires_at is not None and rec.expires_at <= time.time():
            raise NotFound(f"object {user_key(key)!r} expired")
        return rec

    def copy_locked(self, rec: ObjectRecord, tier: str) -> Any:
        """``rec``'s copy on ``tier``, attached or in its graveyard; None if it has none there.

        A leased record may be overwritten, deleted or moved before its reader
        looks: the copies taken from it wait in its graveyard until the last
        lease ends, and they hold this very version's bytes.
        """
        loc = rec.copies.get(tier)
        if loc is None:
            loc = next((old for t, old in reversed(rec.graveyard) if t == tier), None)
        return loc

    def claim_locked(self, rec: ObjectRecord) -> Move:
        """Own ``rec``'s movement: mark it moving and lease its copies until the returned :class:`Move` ends."""
        assert not rec.moving, "one mover at a time (callers check rec.moving)"
        rec.moving = True
        rec.readers += 1
        return Move(self, rec)

    def release(self, rec: ObjectRecord) -> None:
        """End a lease (a reader's, or a move's)."""
        with self.lock:
            self.release_locked(rec)

    def release_locked(self, rec: ObjectRecord) -> None:
        rec.readers -= 1
        if rec.readers == 0 and rec.graveyard:
            for tier, loc in rec.graveyard:
                self.tiers[tier].free(loc)
            rec.graveyard.clear()

    def expired_locked(self, now: float) -> list[str]:
        """Keys whose ttl has run out by ``now`` (still indexed until the sweeper deletes them)."""
        return [k for k in self.expiring if (r := self.index.get(k)) and r.expires_at and r.expires_at <= now]


class Move:
    """A claim on one record's movement (from :meth:`Catalog.claim_locked`), ended by ``with``.

    Leaving the ``with`` block, however it is left, clears ``moving`` and ends
    the move's lease (freeing copies the move or others detached meanwhile).
    """

    __slots__ = ("_catalog", "rec")

    def __init__(self, catalog: Catalog, rec: ObjectRecord) -> None:
        self._catalog = catalog
        self.rec = rec

    def __enter__(self) -> ObjectRecord:
        return self.rec

    def __exit__(self, *exc: object) -> None:
        with self._catalog.lock:
            self.rec.moving = False
            self._catalog.release_locked(self.rec)
