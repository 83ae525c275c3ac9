"""The object index: records in memory, durable entries in LMDB.

Every object has an in-memory :class:`ObjectRecord`. Durable objects also
have a :class:`DurableEntry` in LMDB (``<nvme path>/index.lmdb``) pointing
at their chunks on nvme; LMDB commits are fsync'ed, so once ``put`` returns
the entry survives a crash. Rebuilding on open reads LMDB only: any extent
not named there (a volatile object, a write never committed) is free.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import lmdb
import msgspec

from tierd.engine.keys import user_key
from tierd.engine.stack import TIER_ORDER
from tierd.errors import MediaError
from tierd.tiers.nvme import NvmeLocation

__all__ = ["ObjectMeta", "ObjectRecord", "DurableEntry", "DurableIndex"]

log = logging.getLogger("tierd.engine.index")


class ObjectMeta(msgspec.Struct, frozen=True, array_like=True):
    """What a value is, apart from its bytes: enough to rebuild it on get."""

    kind: str  # "tensor" | "bytes"
    dtype: str  # torch dtype name, "uint8" for bytes
    shape: tuple[int, ...]
    itemsize: int

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for dim in self.shape:
            n *= dim
        return n


class DurableEntry(msgspec.Struct, frozen=True, array_like=True):
    """An LMDB value: a durable object's metadata and where its chunks are."""

    meta: ObjectMeta
    nbytes: int
    codec: str
    pinned: bool
    expires_at: float | None
    location: NvmeLocation
    owner: int | None = None


@dataclass(slots=True, eq=False)
class ObjectRecord:
    """The engine's in-memory state of one object (guarded by the catalog's lock).

    ``copies`` maps a tier name (``TIER_ORDER``) to that tier's location of
    the object's bytes: a volatile object has one copy (or a remote
    write-through copy besides); a durable object always has ``nvme`` and
    may be cached on ``host`` or ``cxl``. Copies of an indexed record change
    only through the catalog (``set_location`` / ``take_location``), which
    keeps counters and policies in step.

    ``readers`` counts leases: while it is non-zero, copies taken away from
    the record wait in ``graveyard`` instead of being freed (a lease never
    blocks a delete, and a reader never sees its bytes reused). ``moving``
    is set while one mover owns the record's movement (see
    :meth:`tierd.engine.catalog.Catalog.claim_locked`).
    """

    key: str
    namespace: str
    meta: ObjectMeta
    nbytes: int
    codec: str
    durable: bool
    pinned: bool
    expires_at: float | None
    owner: int | None = None  # uid of the daemon client that put it; None: embedded or shared
    copies: dict[str, Any] = field(default_factory=dict)
    readers: int = 0
    moving: bool = False
    live: bool = True
    graveyard: list[tuple[str, Any]] = field(default_factory=list)

    def on(self, tier: str) -> Any:
        """The location of the copy on ``tier``, or None."""
        return self.copies.get(tier)

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers holding a copy, fastest first."""
        copies = self.copies
        return tuple([t for t in TIER_ORDER if t in copies])

    @property
    def tier(self) -> str:
        """The fastest tier holding a copy ("host" for an object without any: an empty one)."""
        copies = self.copies
        for t in TIER_ORDER:  # a loop, not a generator: this is on every get's path
            if t in copies:
                return t
        return "host"

    def durable_entry(self) -> DurableEntry:
        nvme = self.copies.get("nvme")
        assert nvme is not None, "a durable record always has an nvme copy"
        return DurableEntry(self.meta, self.nbytes, self.codec, self.pinned, self.expires_at, nvme, self.owner)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(DurableEntry)


class DurableIndex:
    """LMDB table ``key -> DurableEntry``; every write commits with fsync."""

    def __init__(self, path: str | os.PathLike[str], *, map_size: int = 8 << 30) -> None:
        self.path = os.fspath(path)
        try:
            self._env = lmdb.open(
                os.fspath(path), map_size=map_size, subdir=True, sync=True, metasync=True,
                max_dbs=0, readahead=False,
            )
        except lmdb.Error as exc:
            raise MediaError(f"cannot open the durable index at {os.fspath(path)!r}: {exc}") from exc

    def entries(self) -> Iterator[tuple[str, DurableEntry | None]]:
        """Every stored entry; None for one that does not decode (logged)."""
        with self._env.begin() as txn:
            for raw_key, raw in txn.cursor():
                key = bytes(raw_key).decode()
                try:
                    yield key, _decoder.decode(raw)
                except msgspec.DecodeError as exc:
                    log.error("durable index entry %r does not decode (%s); skipped", user_key(key), exc)
                    yield key, None

    def write(self, puts: dict[str, DurableEntry], deletes: list[str]) -> None:
        """Apply ``deletes`` then ``puts`` in one transaction (one fsync)."""
        try:
            with self._env.begin(write=True) as txn:
                for key in deletes:
                    txn.delete(key.encode())
                for key, entry in puts.items():
                    txn.put(key.encode(), _encoder.encode(entry))
        except lmdb.MapFullError:
            # The map is virtual address space, not disk: grow it and retry.
            self._env.set_mapsize(self._env.info()["map_size"] * 2)
            self.write(puts, deletes)
        except lmdb.Error as exc:
            raise MediaError(f"durable index {self.path!r}: write failed: {exc}") from exc

    def put(self, key: str, entry: DurableEntry) -> None:
        self.write({key: entry}, [])

    def delete(self, *keys: str) -> None:
        self.write({}, list(keys))

    def close(self) -> None:
        self._env.close()
