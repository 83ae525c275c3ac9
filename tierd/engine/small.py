"""Small objects in one pass: the daemon's fast paths for a get or put of a few KiB on host.

The usual paths take a lease or a reservation and the catalog's lock three
to seven times; for a 4 KiB object that bookkeeping costs more than the
copy. These do the whole call under the lock once (the copy of a few KiB
included) and answer None/False when the object or request needs anything
else (a lower tier, durability, a quota, a ttl): the caller then takes the
usual path, which does the same thing the long way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from tierd.codecs import get_codec
from tierd.engine.index import ObjectMeta, ObjectRecord
from tierd.engine.keys import namespace_of

if TYPE_CHECKING:
    from tierd.engine.core import Engine

__all__ = ["ABSENT", "SmallCalls"]

ABSENT = object()  # read_small_many's answer for a key that is not stored


class SmallCalls:
    """Mixed into :class:`~tierd.engine.core.Engine`."""

    def read_small(self: Engine, key: str, max_bytes: int) -> tuple[ObjectMeta, bytes] | None:
        """``key``'s meta and bytes if it holds at most ``max_bytes`` with a host copy; None: take the
        usual path (missing, expired, larger, or not on host)."""
        got = self.read_small_many([key], max_bytes)[0]
        return got if isinstance(got, tuple) else None

    def read_small_many(self: Engine, keys: Sequence[str], max_bytes: int, *,
                        mutable: bool = False) -> list[tuple[ObjectMeta, bytes | bytearray] | object | None]:
        """:meth:`read_small` of each key in one pass: ``(meta, bytes)``, :data:`ABSENT` for a key that
        is not stored (and no remote tier could have it), None for a key to take the usual path.

        ``mutable``: tensors' bytes come as a bytearray, for a tensor to own without a second copy.
        """
        now = time.time()
        out: list[tuple[ObjectMeta, bytes | bytearray] | object | None] = [None] * len(keys)
        upcoming: list[str] = []
        read = self.host.read_bytes
        counters = self._counters["host"]
        local_only = self.remote is None  # a miss here is a miss (no shared index to adopt from)
        with self._lock:
            self._check_open()
            for i, key in enumerate(keys):
                rec = self._index.get(key)
                if rec is None or (rec.expires_at is not None and rec.expires_at <= now):
                    if local_only:
                        out[i] = ABSENT
                    continue
                if rec.nbytes > max_bytes:
                    continue
                loc = rec.copies.get("host")
                if loc is None and rec.nbytes:
                    continue
                out[i] = (rec.meta, read(loc, mutable=mutable and rec.meta.kind != "bytes") if loc is not None
                          else b"")
                self._policies.on_access(rec)
                upcoming += self._observe_locked(rec.namespace, key)
                counters.hits += 1
                counters.bytes_out += rec.nbytes
        if self._trace is not None:
            for key, got in zip(keys, out, strict=True):
                if isinstance(got, tuple):
                    self._trace_write("get", key, len(got[1]), "host")
        self._prefetch_beyond(upcoming, keys)
        return out

    def write_small(self: Engine, key: str, data: bytes, meta: ObjectMeta, *, tier: str | None = None,
                    codec: str | None = None, owner: int | None = None) -> bool:
        """A volatile put of ``data`` to host in one pass; False (nothing done): take the usual path
        (a durable, write-through or quota'd namespace, a refusal by admission, no free extent
        without demoting, or a durable version to replace)."""
        return self.write_small_many([(key, data, meta)], tier=tier, codec=codec, owner=owner)[0]

    def write_small_many(self: Engine, items: Sequence[tuple[str, Any, ObjectMeta]], *, tier: str | None = None,
                         codec: str | None = None, owner: int | None = None) -> list[bool]:
        """:meth:`write_small` of each ``(key, data, meta)`` (``data`` any flat byte buffer), installed in
        one pass; False for each item to take the usual path (nothing done for it)."""
        self._check_open()
        config = self.config
        done = [False] * len(items)
        staged: list[tuple[int, ObjectRecord]] = []
        codec_of: dict[str, str | None] = {}  # namespace -> its codec name, None: not for this path
        eligible: list[tuple[int, str, int]] = []
        for i, (key, data, _) in enumerate(items):
            ns = namespace_of(key)
            if ns not in codec_of:
                ns_cfg = config.namespace(ns)
                # A learning admission policy is asked once a put (it counts what it is asked): the usual path.
                small_ok = not (ns_cfg.durable or ns_cfg.write_through or ns_cfg.quota is not None
                                or ns_cfg.admission_policy != "all"
                                or tier not in (None, "host") or (tier is None and ns_cfg.tier not in (None, "host"))
                                or (owner is not None and config.daemon.uid_quota is not None))
                codec_of[ns] = get_codec(codec if codec is not None else ns_cfg.codec).name if small_ok else None
            if codec_of[ns] is not None:
                eligible.append((i, ns, len(data)))
        locations = self.host.alloc_many([n for _, _, n in eligible if n])
        next_loc = iter(locations)
        for i, ns, n in eligible:
            loc = next(next_loc) if n else None
            if n and loc is None:
                continue  # making room means demoting: the usual path
            key, data, meta = items[i]
            if loc is not None:
                self.host.copy_in(loc, memoryview(data))
            staged.append((i, ObjectRecord(
                key=key, namespace=ns, meta=meta, nbytes=n, codec=codec_of[ns], durable=False,  # type: ignore[arg-type]
                pinned=False, expires_at=None, owner=owner, copies={"host": loc} if loc is not None else {})))
        refused: list[ObjectRecord] = []
        replaced: list[ObjectRecord] = []
        upcoming: list[str] = []
        counters = self._counters["host"]
        with self._lock:
            for i, rec in staged:
                old = self._index.get(rec.key)
                if (self._closed or (old is not None and old.durable)
                        or not (tier == "host" or self._policies.admit(rec.namespace, rec.key, "host", rec.nbytes))):
                    refused.append(rec)
                    continue
                self._catalog.install_locked(rec)
                upcoming += self._observe_locked(rec.namespace, rec.key)
                counters.bytes_in += rec.nbytes
                done[i] = True
                if old is not None and "remote" in old.copies:
                    replaced.append(old)
        for rec in refused:
            if "host" in rec.copies:
                self.host.free(rec.copies["host"])
        if self._shared is not None:
            for old in replaced:
                self._shared.forget(old.key)  # the old remote copy is gone
        if self._trace is not None:
            for (i, rec) in staged:
                if done[i]:
                    self._trace_write("put", rec.key, rec.nbytes, "host")
        self._prefetch_beyond(upcoming, [key for key, _, _ in items])
        if self._moves.over_high_watermark():
            self._moves.wake()
        return done
