"""The engine's batched calls: many keys, one pass under the catalog's lock.

Serving engines ask about and move KV blocks by the dozen: "which of these
N do you have", store N, load N. Each call here takes the catalog's lock
once for all its keys (and a batch of puts or deletes commits in one LMDB
transaction), and answers per key: a key that is missing, expired or fails
is that key's result, never the batch's.

A key missing locally is still looked up in the remote tier's shared index
(one round trip per such key, after the local pass), as single calls do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from tierd.engine.handles import Lease
from tierd.engine.index import ObjectMeta, ObjectRecord
from tierd.errors import TierdError
from tierd.tiers.host import HostLocation

if TYPE_CHECKING:
    from tierd.engine.core import Engine

__all__ = ["BatchCalls"]


class BatchCalls:
    """Mixed into :class:`~tierd.engine.core.Engine`."""

    def acquire_many(self: Engine, keys: Sequence[str]) -> list[Lease | None]:
        """A lease on each key found (None for a key missing or expired), taken in one pass."""
        now = time.time()
        found: list[Lease | None] = [None] * len(keys)
        upcoming: list[str] = []
        catalog, index = self._catalog, self._index
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                rec = index.get(key)
                if rec is None or (rec.expires_at is not None and rec.expires_at <= now):
                    continue
                rec.readers += 1
                self._policies.on_access(rec)
                upcoming += self._observe_locked(rec.namespace, key)
                found[i] = Lease(catalog, self._moves, rec)
        if self.remote is not None:
            for i, key in enumerate(keys):
                if found[i] is None and key not in index and self._adopt_quietly(key):
                    try:
                        found[i] = self.acquire(key)
                    except TierdError:
                        pass  # gone again meanwhile: a miss
        if self._trace is not None:
            for lease in found:
                if lease is not None:
                    self._trace_write("get", lease.key, lease.nbytes, lease.rec.tier)
        self._prefetch_beyond(upcoming, keys)
        return found

    def host_locations(self: Engine, leases: Sequence[Lease | None], *,
                       evict: bool) -> list[HostLocation | TierdError | None]:
        """Each lease's host copy, as :meth:`Lease.host_location(promote=True) <Lease.host_location>`
        gives it (None: no lease, or it stays below), or the error that made it a miss.

        The batch's promotions run side by side (up to 4), so that one object's disk read
        overlaps another's checksum and the reader's copy: one at a time, the disk idles
        while each object is verified.
        """

        def one(lease: Lease) -> HostLocation | TierdError | None:
            try:
                return lease.host_location(promote=True, evict=evict)
            except TierdError as exc:
                return exc

        below = [i for i, lease in enumerate(leases) if lease is not None and not lease.on("host")]
        futures = {i: self._promote_pool.submit(one, leases[i]) for i in below} if len(below) > 1 else {}
        out: list[HostLocation | TierdError | None] = []
        for i, lease in enumerate(leases):
            out.append(None if lease is None else futures[i].result() if i in futures else one(lease))
        return out

    def _prefetch_beyond(self: Engine, upcoming: list[str], keys: Sequence[str]) -> None:
        """Prefetch what the schedules expect next, except the batch's own keys (being read now)."""
        if upcoming:
            wanted = set(keys)
            later = [k for k in upcoming if k not in wanted]
            if later:
                self.prefetch(later)

    def exists_many(self: Engine, keys: Sequence[str]) -> list[bool]:
        """:meth:`exists` of each key, in one pass (keys whose only copy is remote are asked there)."""
        now = time.time()
        out = [False] * len(keys)
        ask: list[int] = []
        with self._lock:
            for i, key in enumerate(keys):
                rec = self._index.get(key)
                if rec is None:
                    if self.remote is not None:
                        ask.append(i)
                elif rec.expires_at is None or rec.expires_at > now:
                    if len(rec.copies) == 1 and "remote" in rec.copies:
                        ask.append(i)
                    else:
                        out[i] = True
        for i in ask:
            out[i] = self.exists(keys[i])
        return out

    def prefix_length(self: Engine, keys: Sequence[str]) -> int:
        """How many leading keys of ``keys`` exist (what a prefix cache asks)."""
        now = time.time()
        n = 0
        with self._lock:
            for key in keys:
                rec = self._index.get(key)
                if (rec is None or (rec.expires_at is not None and rec.expires_at <= now)
                        or (len(rec.copies) == 1 and "remote" in rec.copies)):
                    break
                n += 1
        if self.remote is not None:  # the rest, asked one by one until the first miss
            while n < len(keys) and self.exists(keys[n]):
                n += 1
        return n

    def delete_many(self: Engine, keys: Sequence[str]) -> list[bool]:
        """:meth:`delete` of each key; the durable ones leave LMDB in one transaction."""
        self._check_open()
        out = [False] * len(keys)
        with self._commit_lock:
            with self._lock:
                recs: dict[str, ObjectRecord] = {}
                for i, key in enumerate(keys):
                    rec = self._index.get(key)
                    if rec is not None:
                        out[i] = True
                        recs[key] = rec
            durable = [key for key, rec in recs.items() if rec.durable]
            if durable:
                self._durable.write({}, durable)
            with self._lock:
                for key, rec in recs.items():
                    if self._index.get(key) is rec:
                        self._catalog.retire_locked(rec)
                        self._policies.on_delete(rec)
        for key, rec in recs.items():
            if "remote" in rec.copies and self._shared is not None:
                self._shared.forget(key)
            if self._trace is not None:
                self._trace_write("delete", key, rec.nbytes, rec.tier)
        return out

    def put_many(self: Engine, items: Sequence[tuple[str, torch.Tensor | memoryview, ObjectMeta]],
                 **options: Any) -> list[TierdError | None]:
        """Store each ``(key, src, meta)`` (see :meth:`put`; ``options`` apply to all); committed
        together. None for each item stored, else its error (that item stored nothing)."""
        self._check_open()
        results: list[TierdError | None] = [None] * len(items)
        batch = []
        where = []
        for i, (key, src, meta) in enumerate(items):
            nbytes = src.nbytes if isinstance(src, memoryview) else src.numel()
            try:
                res = self._writer.reserve(key, nbytes, meta, **options)
                res.take()  # committed below, by the batch
                batch.append((res, src))
            except TierdError as exc:
                results[i] = exc
                continue
            where.append(i)
        for i, result in zip(where, self._writer.finish_many(batch), strict=True):
            results[i] = result
        return results
