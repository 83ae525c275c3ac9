"""The daemon's batched requests: one frame in, one engine pass, one frame out.

A GetMany answers each key with its bytes inline, or, for a client holding
the arena, with the offset of its host copy; those copies stay leased as
one group until the client's Release (or until it disconnects, or its leases
expire). An ExistsMany with ``lease`` leases what it found the same way, and
a later GetMany names that group to read exactly those versions.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tierd import protocol as p
from tierd.engine.handles import Lease
from tierd.engine.small import ABSENT
from tierd.errors import InvalidArgument, ProtocolError, TierdError

if TYPE_CHECKING:
    from tierd.daemon.connection import Connection

__all__ = ["HANDLERS", "release_held", "start_get_many"]

Held = Lease | list[Lease | None]  # what a lease id holds: one get's lease, or a batch's


def release_held(held: Held) -> None:
    """End a lease id's leases; never raises."""
    for lease in held if isinstance(held, list) else [held]:
        if lease is not None:
            lease.release()


def _why(exc: TierdError) -> str:
    return f"{type(exc).__name__}: {exc}"


def _scoped(conn: Connection, keys: list[str]) -> list[str]:
    scope, uid = conn.server.identity.scope, conn.uid
    return [scope(key, uid) for key in keys]


def _hold(conn: Connection, held: Held) -> int:
    """Register ``held`` under a new lease id; 0 (and released) if the connection closed meanwhile."""
    lease_id = next(conn.ids)
    with conn.state_lock:
        if not conn.closed:
            conn.leases[lease_id] = (held, time.monotonic())
            return lease_id
    release_held(held)
    return 0


def put_many(conn: Connection, req: p.PutMany) -> Any:
    results: list[str | None] = [None] * len(req.items)
    batch, where = [], []
    for i, item in enumerate(req.items):
        try:
            key = conn.server.identity.scope(item.key, conn.uid)
            if len(item.data) != item.meta.nbytes:
                raise InvalidArgument(f"item {item.key!r} holds {len(item.data)} bytes, its meta says "
                                      f"{item.meta.nbytes}")
        except TierdError as exc:
            results[i] = _why(exc)
            continue
        batch.append((key, item.data, item.meta))
        where.append(i)
    if not (req.durable or req.pin or req.ttl is not None):  # small volatile items: one engine pass
        done = conn.engine.write_small_many(batch, tier=req.tier, codec=req.codec, owner=conn.uid)
        batch = [b for b, ok in zip(batch, done, strict=True) if not ok]
        where = [i for i, ok in zip(where, done, strict=True) if not ok]
    if batch:
        errors = conn.engine.put_many([(k, memoryview(d), m) for k, d, m in batch], tier=req.tier,
                                      durable=req.durable, codec=req.codec, pin=req.pin, ttl=req.ttl, owner=conn.uid)
        for i, err in zip(where, errors, strict=True):
            if err is not None:
                results[i] = _why(err)
    return p.Ok(id=req.id, value=results)


def get_many(conn: Connection, req: p.GetMany) -> Any:
    daemon = conn.server.config.daemon
    if req.lease_id:
        with conn.state_lock:
            entry = conn.leases.get(req.lease_id)
        if entry is None or not isinstance(entry[0], list) or len(entry[0]) != len(req.keys):
            raise ProtocolError(f"no batch lease {req.lease_id} over {len(req.keys)} keys on this connection "
                                "(released, expired, or another batch)")
        items, _ = _read_leased(conn, entry[0], req.inline_ok or not conn.trusted, daemon.max_frame_bytes // 2)
        return p.GetManyReady(id=req.id, items=items)  # the leases stay the ExistsMany's
    keys = _scoped(conn, req.keys)
    if req.inline_ok:
        items, rest, budget = _small_pass(conn, keys)
    else:
        items, rest, budget = [None] * len(keys), list(range(len(keys))), daemon.max_frame_bytes // 2
    return _get_rest(conn, req, keys, items, rest, budget)


def start_get_many(conn: Connection, req: p.GetMany) -> Callable[[Connection, p.GetMany], Any] | None:
    """On the connection's thread: answer a GetMany whose keys are all small on host (or absent) in one
    engine pass, and send it; else the handler that finishes it on the pool, with what was read here."""
    if req.lease_id or not req.inline_ok:
        return get_many
    started = time.perf_counter()
    try:
        keys = _scoped(conn, req.keys)
    except TierdError:
        return get_many  # it reports the error
    items, rest, budget = _small_pass(conn, keys)
    if rest:
        return lambda conn, req: _get_rest(conn, req, keys, items, rest, budget)
    conn.send(p.GetManyReady(id=req.id, items=items))  # type: ignore[arg-type]
    if conn.server.metrics:
        conn.server.metrics.observe("GetMany", time.perf_counter() - started)
    return None


def _small_pass(conn: Connection, keys: list[str]) -> tuple[list[p.ItemReady | None], list[int], int]:
    """The keys small on host inline and the absent ones as misses, in one engine pass; the indices left
    for the usual path, and what is left of the reply's inline budget."""
    daemon = conn.server.config.daemon
    budget = daemon.max_frame_bytes // 2  # inline bytes in this reply: it must fit one frame
    items: list[p.ItemReady | None] = [None] * len(keys)
    rest = []
    for i, got in enumerate(conn.engine.read_small_many(keys, daemon.inline_max_bytes)):
        if got is ABSENT:
            items[i] = p.ItemReady()
        elif isinstance(got, tuple) and len(got[1]) <= budget:
            items[i] = p.ItemReady(meta=got[0], data=got[1])  # type: ignore[arg-type]
            budget -= len(got[1])
        else:
            rest.append(i)  # (past the frame's budget: an offset, or "use Get")
    return items, rest, budget


def _get_rest(conn: Connection, req: p.GetMany, keys: list[str], items: list[p.ItemReady | None],
              rest: list[int], budget: int) -> Any:
    """Finish a GetMany: the keys at ``rest`` leased (offsets for a client with the arena), inline, or "use Get"."""
    lease_id = 0
    if rest:
        leases = conn.engine.acquire_many([keys[i] for i in rest])
        try:
            sub, leased = _read_leased(conn, leases, req.inline_ok or not conn.trusted, budget)
        except BaseException:
            release_held(leases)
            raise
        if leased:
            lease_id = _hold(conn, leases)
            if not lease_id:
                return None  # the client went away
        else:
            release_held(leases)
        for i, item in zip(rest, sub, strict=True):
            items[i] = item
    return p.GetManyReady(id=req.id, items=items, lease_id=lease_id)  # type: ignore[arg-type]


def _read_leased(conn: Connection, leases: list[Lease | None], inline_ok: bool,
                 budget: int) -> tuple[list[p.ItemReady], bool]:
    """Each leased object as an arena offset (a client holding the arena), inline bytes (at most ``budget``
    in all), or "use Get"; True if an offset was handed out (the leases must then outlive the reply)."""
    items: list[p.ItemReady] = []
    leased = False
    # A client with the arena gets host copies, promoted side by side (one object's disk read
    # overlapping another's checksum); one without still promotes (for the next reader) as it
    # reads, but never makes room for it by demoting others.
    locs = conn.engine.host_locations(leases, evict=True) if conn.trusted else [None] * len(leases)
    for lease, loc in zip(leases, locs, strict=True):
        if lease is None:
            items.append(p.ItemReady())
            continue
        try:
            if isinstance(loc, TierdError):
                raise loc
            if loc is not None:
                items.append(p.ItemReady(meta=lease.meta, offset=loc.offset))
                leased = True
            elif inline_ok and lease.nbytes <= budget:
                buf = bytearray(lease.nbytes)
                lease.read_into(memoryview(buf), promote=not conn.trusted)
                budget -= lease.nbytes
                items.append(p.ItemReady(meta=lease.meta, data=bytes(buf)))
            else:
                items.append(p.ItemReady(meta=lease.meta))  # too large for this frame: the client Gets it
        except TierdError as exc:  # a corrupt block is this key's miss, never bad data
            items.append(p.ItemReady(error=_why(exc)))
    return items, leased


def exists_many(conn: Connection, req: p.ExistsMany) -> Any:
    keys = _scoped(conn, req.keys)
    if not req.lease:
        return p.Ok(id=req.id, value=conn.engine.exists_many(keys))
    leases = conn.engine.acquire_many(keys)
    found = [lease is not None for lease in leases]
    lease_id = _hold(conn, leases) if any(found) else 0
    return p.Ok(id=req.id, value={"found": found, "lease_id": lease_id})


def delete_many(conn: Connection, req: p.DeleteMany) -> Any:
    return p.Ok(id=req.id, value=conn.engine.delete_many(_scoped(conn, req.keys)))


def prefix_length(conn: Connection, req: p.PrefixLength) -> Any:
    return p.Ok(id=req.id, value=conn.engine.prefix_length(_scoped(conn, req.keys)))


def is_quick(conn: Connection, req: Any) -> bool:
    """Batches served on the connection's thread: what stays in memory."""
    if isinstance(req, (p.ExistsMany, p.PrefixLength)):
        return True
    if isinstance(req, p.PutMany):
        return not req.durable and req.tier in (None, "host")
    return False  # a GetMany: start_get_many decides


HANDLERS = {
    p.PutMany: put_many, p.GetMany: get_many, p.ExistsMany: exists_many, p.DeleteMany: delete_many,
    p.PrefixLength: prefix_length,
}
