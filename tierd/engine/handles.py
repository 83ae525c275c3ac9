"""What the engine hands its callers instead of its internals: a reservation and a lease.

A :class:`Reservation` is a put between its two phases (from
:meth:`tierd.engine.Engine.reserve`): room in the host arena (``view``, at
``offset`` for a daemon client that maps the arena) that the caller fills,
then ``commit()``; ``abort()``, or leaving a ``with`` block without
committing, gives the room back.

A :class:`Lease` pins one version of an object (from
:meth:`~tierd.engine.Engine.acquire` or ``with engine.lease(key)``): its
``meta``, its host copy (``host_view``, ``host_offset``), or its bytes copied
anywhere (``read_into``), valid whatever happens to the key meanwhile, until
``release()``, which never fails and may be called twice.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from tierd._buffers import writable_tensor
from tierd.engine.catalog import Catalog
from tierd.engine.index import ObjectMeta, ObjectRecord
from tierd.engine.keys import user_key
from tierd.errors import InternalError, InvalidArgument
from tierd.tiers.host import HostLocation

if TYPE_CHECKING:
    from tierd.engine.movement import Mover
    from tierd.engine.writes import Writer

__all__ = ["Lease", "Reservation"]


class Reservation:
    """Room for one put; see the module's docstring. Not thread-safe: one caller owns it."""

    __slots__ = ("_writer", "rec", "top", "staging", "_done")

    def __init__(self, writer: Writer, rec: ObjectRecord, top: str, staging: HostLocation | None) -> None:
        self._writer = writer
        self.rec = rec  # not indexed until commit
        self.top = top  # the tier the put aims at
        self.staging = staging
        self._done = False

    @property
    def key(self) -> str:
        return self.rec.key

    @property
    def nbytes(self) -> int:
        return self.rec.nbytes

    @property
    def view(self) -> torch.Tensor | None:
        """The reserved host bytes (flat uint8, page-aligned) to write the object into; None: none reserved."""
        return self._writer.host.view(self.staging) if self.staging is not None else None

    @property
    def offset(self) -> int | None:
        """Where :attr:`view` starts in the host arena (what a daemon client that maps it writes at)."""
        return self.staging.offset if self.staging is not None else None

    @property
    def device_direct(self) -> bool:
        """Whether :meth:`commit` can take a CUDA source without the arena (GPUDirect Storage to nvme)."""
        return self._writer.device_source_ok(self)

    def unstage(self) -> None:
        """Give back the reserved host bytes but keep the put: :meth:`commit` then needs ``src``."""
        if self.staging is not None:
            self._writer.host.free(self.staging)
            self.staging = None

    def commit(self, src: torch.Tensor | memoryview | None = None) -> None:
        """Store the object: ``src`` (a flat uint8 tensor or byte memoryview), or the bytes written into
        :attr:`view`. Returns when it is readable; durable objects once fsync'ed.

        Raises:
            OutOfSpace (nothing stored before is lost), MediaError, InvalidArgument (used already).
        """
        self.take()
        self._writer.finish(self, src)

    def take(self) -> None:
        """Mark the reservation used by a commit (the engine's batch path commits without :meth:`commit`)."""
        if self._done:
            raise InvalidArgument(f"the put of {user_key(self.key)!r} was committed or aborted already")
        self._done = True

    def abort(self) -> None:
        """Give the reservation back; a no-op after commit or a first abort."""
        if not self._done:
            self._done = True
            self.unstage()

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class Lease:
    """One version of an object held readable; see the module's docstring."""

    __slots__ = ("_catalog", "_moves", "rec", "_released")

    def __init__(self, catalog: Catalog, moves: Mover, rec: ObjectRecord) -> None:
        self._catalog = catalog
        self._moves = moves
        self.rec = rec  # the leased record (already counted in rec.readers)
        self._released = False  # guarded by the catalog's lock

    @property
    def key(self) -> str:
        return self.rec.key

    @property
    def meta(self) -> ObjectMeta:
        return self.rec.meta

    @property
    def nbytes(self) -> int:
        return self.rec.nbytes

    def on(self, tier: str) -> bool:
        """Whether the object has a copy on ``tier`` now."""
        return tier in self.rec.copies

    def host_location(self, *, promote: bool = True, evict: bool = False) -> HostLocation | None:
        """The host copy to read from, promoting the object into host when there is room
        (``evict``: making room by demoting others); None when it stays below (use :meth:`read_into`).

        The copy stays readable while the lease is held, even if the object is
        demoted, replaced or deleted meanwhile (the catalog's graveyard).
        """
        rec, catalog = self.rec, self._catalog
        counters = catalog.counters
        with catalog.lock:
            host_loc = catalog.copy_locked(rec, "host")
            lower = next((t for t in catalog.tiers if t != "host" and catalog.copy_locked(rec, t) is not None), None)
            if host_loc is not None or lower is None:
                counters["host"].hits += 1
                counters["host"].bytes_out += rec.nbytes
                return host_loc
            # A miss on every tier above the one that has it.
            for tier in catalog.tiers:
                if tier == lower:
                    counters[tier].hits += 1
                    break
                counters[tier].misses += 1
        if promote and rec.nbytes and rec.live:
            loc = self._moves.promote(rec, evict=evict)
            if loc is not None:
                with catalog.lock:
                    counters["host"].bytes_out += rec.nbytes
            return loc
        return None

    def host_view(self, *, promote: bool = True, evict: bool = False) -> torch.Tensor | None:
        """:meth:`host_location`'s bytes (flat uint8, valid while leased), or None."""
        loc = self.host_location(promote=promote, evict=evict)
        return self._catalog.tiers.host.view(loc) if loc is not None else None

    def host_offset(self, *, promote: bool = True, evict: bool = False) -> int | None:
        """Where :meth:`host_location`'s bytes start in the host arena, or None."""
        loc = self.host_location(promote=promote, evict=evict)
        return loc.offset if loc is not None else None

    def read_into(self, dest: torch.Tensor | memoryview, *, promote: bool = True) -> None:
        """Copy the object's bytes into ``dest`` (a flat uint8 tensor, CPU or CUDA, or a byte memoryview).

        Raises:
            CorruptObject: a lower tier's copy fails its checksum.
        """
        rec, catalog, host = self.rec, self._catalog, self._catalog.tiers.host
        if rec.nbytes == 0:
            return
        loc = self.host_location(promote=promote)
        if loc is not None:
            host.copy_out(loc, dest)
            return
        if isinstance(dest, memoryview):
            dest = writable_tensor(dest)
        with catalog.lock:
            # Promoted meanwhile by someone else: the host copy; else the lower one.
            for source in catalog.tiers:
                lower = catalog.copy_locked(rec, source)
                if lower is not None:
                    break
            else:
                raise InternalError(f"leased object {user_key(rec.key)!r} has no copy on any tier")
        if source == "host":
            host.copy_out(lower, dest)
            return
        self._moves.read_lower(source, lower, dest, rec)
        with catalog.lock:
            catalog.counters[source].bytes_out += rec.nbytes

    def release(self) -> None:
        """End the lease; later calls do nothing."""
        if self._released:
            return
        with self._catalog.lock:
            if not self._released:
                self._released = True
                self._catalog.release_locked(self.rec)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()
