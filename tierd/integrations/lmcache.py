"""tierd as LMCache's L2: a ``native_plugin`` connector for LMCache's multiprocess mode.

LMCache (and through it vLLM and SGLang) loads it by module path::

    --l2-adapter '{"type": "native_plugin", "module_path": "tierd.integrations.lmcache",
                   "class_name": "TierdConnector", "adapter_params": {}}'

LMCache wraps the connector in its ``NativeConnectorL2Adapter``, which keeps
its own lock counts and byte accounting and demultiplexes completions: the
connector's part is to start batched stores, loads, lookups and deletes
without blocking, say so on one eventfd, and hand back per-key results.
Each maps onto one of tierd's batched calls (:meth:`tierd.Store.put_many`,
``get_many(outs=)``, ``exists_many``, ``delete_many``) run on the store's
threads; a load copies once, from tierd's host arena straight into
LMCache's L1 buffer.

With the default parameters the connector talks to the node's daemon
(``tierd serve``), so every worker on the machine (each vLLM rank, each
engine) shares one cache, which outlives any of them; ``embedded=True`` (or
a ``config``) runs an engine inside the LMCache process instead.

Keys: LMCache's own key strings (model, KV rank, group, chunk hash and its
``cache_salt``) under the namespace ``lmcache``; a deployment-wide ``salt``
parameter adds a tenant scope on top (hashed: keys never show it). A key
that is missing, expired or fails its checksum is a miss, never bad data.

Note [what LMCache counts]
    LMCache 0.5.6's wrapper reads a store's completion as one flag for the
    whole batch: ok counts every key of the batch as stored (its byte
    accounting, its L2 eviction), not ok counts none, and the per-key list
    is ignored. Lookups and loads read the per-key list (a lookup only when
    ok), deletes read it and uncount each key reported True. So:

    * a store reports ok only when every key landed; otherwise what landed
      of it is deleted again before the completion is reported (keys that
      an earlier store already made LMCache count are left alone), so
      LMCache counts exactly the keys tierd holds for it;
    * a lookup is ok whenever tierd answered: an invalid key (over tierd's
      1 KiB, a NUL byte) is a miss of its own and the others still hit;
    * a delete reports True for each key tierd no longer holds, absent ones
      included (tierd may have dropped a cache object, or lost it with a
      daemon restart), so LMCache's accounting heals instead of keeping a
      key it can never delete.

    A failed undo (the daemon went away mid-batch) is retried with the
    next store; a daemon that was killed has lost its volatile objects
    anyway, which LMCache learns one miss (and one delete) at a time.

Note [daemon away]
    Nothing raises into LMCache: a submit always returns a future id and
    its completion always arrives. While the daemon is away (killed,
    restarting) a store completes not ok, lookups and loads miss, deletes
    report nothing deleted; the store reconnects by itself, so the first
    batch after the daemon is back is served. LMCache never detaches an L2
    adapter for errors (only its reconfiguration API does), so this keeps
    its L2 in service. ``report_status()`` says whether the daemon answers;
    the first connector made extends LMCache's wrapper to include it in its
    own ``report_status()`` (LMCache 0.5.6's wrapper reports only its thread),
    which LMCache's status API aggregates. The daemon going away and coming
    back is logged once each, not once per batch.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any

import torch
import xxhash

import tierd
from tierd.engine.keys import validate_key
from tierd.errors import DaemonUnavailable, InvalidArgument, StoreClosed, TierdError
from tierd.integrations._stores import check_namespace, key_part, open_for

__all__ = ["TierdConnector"]

log = logging.getLogger("tierd.integrations.lmcache")

Completion = tuple[int, bool, str, list[bool]]

_LOG_EVERY_S = 60.0  # a repeated kind of item failure is logged at most once a minute (with a count)
_MAX_ORPHANS = 1 << 16  # keys of failed stores whose undo waits for the daemon


def _bytes_of(view: Any) -> torch.Tensor:
    """A uint8 tensor over an L1 buffer (a byte memoryview), without copying."""
    mv = memoryview(view)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=torch.uint8)


def _shown(key: object) -> str:
    """A key for a log line: LMCache keys can be long (a model name of any length)."""
    text = key if isinstance(key, str) else repr(key)
    return text if len(text) <= 96 else f"{text[:64]}...({len(text)} characters)"


def _digest(tkey: str) -> int:
    """A counted key as 8 bytes (LMCache may count millions of chunks)."""
    return xxhash.xxh3_64_intdigest(tkey.encode())


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Throttled:
    """Log lines of one kind at most once per interval, with how many were held back."""

    def __init__(self, every_s: float = _LOG_EVERY_S) -> None:
        self._every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        with self._lock:
            last, held = self._last.get(kind, (-self._every_s, 0))
            if now - last < self._every_s:
                self._last[kind] = (last, held + 1)
                return
            self._last[kind] = (now, 0)
        log.warning("%s%s", message, f" ({held} more like it since the last report)" if held else "")


class TierdConnector:
    """LMCache's native connector interface over a tierd store; see the module's docstring.

    Args (LMCache's ``adapter_params``):
        socket: the daemon's socket (default: ``tierd.connect()``'s).
        embedded: run the engine in this process (``tierd.open(config)``) instead of connecting.
        config: the embedded engine's config (a TOML path or a dict shaped like it); implies
            ``embedded``.
        namespace: key namespace (default ``"lmcache"``; its ``[namespaces.NAME]`` config applies).
        salt: a tenant scope for every key (tenants with different salts never share).
        tier: highest tier a stored chunk may land in (default: the namespace's, else host).
        store: an open :class:`tierd.Store` to use (from Python; not closed by :meth:`close`).
    """

    def __init__(self, socket: str | None = None, *, embedded: bool = False,
                 config: str | Mapping[str, Any] | None = None, namespace: str = "lmcache", salt: str = "",
                 tier: str | None = None, store: tierd.Store | None = None) -> None:
        check_namespace(namespace)
        _extend_lmcache_status()
        self._store, self._owned = open_for("tierd's LMCache connector", socket=socket, embedded=embedded,
                                            config=config, store=store)
        scope = f"{xxhash.xxh3_64_hexdigest(salt.encode())}/" if salt else ""
        self._namespace = namespace
        self._prefix = f"{namespace}/{scope}"
        self._tier = tier
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ready: collections.deque[Completion] = collections.deque()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # the fd's state, _counted, _orphans, _away
        self._closed = False
        # Digests of the tierd keys LMCache counts as stored (its wrapper's accounting, mirrored;
        # Note [what LMCache counts]): a failed store's undo leaves these alone.
        self._counted: set[int] = set()
        self._orphans: set[str] = set()  # landed keys of failed stores not deleted yet
        self._away: str | None = None  # why the daemon is away, while it is
        self._failed_batches = 0
        self._logs = _Throttled()

    @property
    def store(self) -> tierd.Store:
        return self._store

    def key(self, lmcache_key: str) -> str:
        """The tierd key an LMCache key string is stored under."""
        return self._prefix + key_part(lmcache_key)

    # -- LMCache's native connector interface -----------------------------------------------

    def event_fd(self) -> int:
        """Readable when :meth:`drain_completions` has something to return."""
        return self._fd

    def submit_batch_set(self, keys: Sequence[str], memviews: Sequence[Any]) -> int:
        """Start storing each buffer under its key; returns the future id. The buffers must stay
        untouched until the completion arrives (LMCache holds them until then). The completion is
        ok only when every key was stored; otherwise nothing new of the batch stays stored (Note
        [what LMCache counts])."""
        fid = next(self._ids)
        n = len(keys)
        try:
            if not self._usable(fid, "store", n, len(memviews)):
                return fid
            bad: dict[int, str] = {}
            items: list[tuple[int, str, torch.Tensor]] = []
            for i, (key, view) in enumerate(zip(keys, memviews, strict=True)):
                try:
                    tkey = validate_key(self.key(key))
                    data = _bytes_of(view)
                    if data.numel() == 0:
                        raise InvalidArgument("an empty buffer (an LMCache chunk is never empty)")
                except Exception as exc:  # noqa: BLE001 - this item fails alone (not a key, not a buffer)
                    bad[i] = _why(exc)
                    continue
                items.append((i, tkey, data))
            self._undo_orphans()
            if not items:
                self._report_items("store", keys, bad, n)
                self._finish(fid, False, self._summary("store", keys, bad, n), [False] * n)
                return fid
            future = self._store.put_many_async([(tkey, data) for _, tkey, data in items], tier=self._tier)
        except Exception as exc:  # noqa: BLE001 - never into LMCache (Note [daemon away])
            self._failed(fid, "store", n, exc)
            return fid
        future.add_done_callback(self._guarded(fid, "store", n, lambda f: self._stored(fid, keys, items, bad, f)))
        return fid

    def submit_batch_get(self, keys: Sequence[str], memviews: Sequence[Any]) -> int:
        """Start filling each buffer with its key's bytes (one copy, from the arena). A key that is
        missing, invalid, or whose buffer has the wrong size is a miss of its own."""
        fid = next(self._ids)
        n = len(keys)
        try:
            if not self._usable(fid, "load", n, len(memviews)):
                return fid
            bad: dict[int, str] = {}
            wanted: list[tuple[int, str, torch.Tensor]] = []
            for i, (key, view) in enumerate(zip(keys, memviews, strict=True)):
                try:
                    wanted.append((i, validate_key(self.key(key)), _bytes_of(view)))
                except Exception as exc:  # noqa: BLE001 - this item fails alone (not a key, not a buffer)
                    bad[i] = _why(exc)
            if not wanted:
                self._report_items("load", keys, bad, n)
                self._finish(fid, not bad, self._summary("load", keys, bad, n), [False] * n)
                return fid
            future = self._store.get_many_async([tkey for _, tkey, _ in wanted], outs=[out for _, _, out in wanted])
        except Exception as exc:  # noqa: BLE001 - never into LMCache
            self._failed(fid, "load", n, exc)
            return fid
        future.add_done_callback(self._guarded(fid, "load", n,
                                               lambda f: self._answered(fid, "load", keys, wanted, bad, f)))
        return fid

    def submit_batch_exists(self, keys: Sequence[str]) -> int:
        """Start a lookup: per key, whether tierd holds it. An invalid key is a miss of its own."""
        fid = next(self._ids)
        n = len(keys)
        try:
            if not self._usable(fid, "lookup", n):
                return fid
            bad: dict[int, str] = {}
            wanted: list[tuple[int, str, None]] = []
            for i, key in enumerate(keys):
                try:
                    wanted.append((i, validate_key(self.key(key)), None))
                except Exception as exc:  # noqa: BLE001 - this item fails alone (not a key, not a buffer)
                    bad[i] = _why(exc)
            if not wanted:
                self._report_items("lookup", keys, bad, n)
                self._finish(fid, True, self._summary("lookup", keys, bad, n), [False] * n)
                return fid
            future = self._store.exists_many_async([tkey for _, tkey, _ in wanted])
        except Exception as exc:  # noqa: BLE001 - never into LMCache
            self._failed(fid, "lookup", n, exc)
            return fid
        future.add_done_callback(self._guarded(fid, "lookup", n,
                                               lambda f: self._answered(fid, "lookup", keys, wanted, bad, f)))
        return fid

    def submit_batch_delete(self, keys: Sequence[str]) -> int:
        """Start deleting: per key, True once tierd no longer holds it (absent ones too, Note [what
        LMCache counts]); False where the delete could not be done (the daemon away)."""
        fid = next(self._ids)
        n = len(keys)
        try:
            if not self._usable(fid, "delete", n):
                return fid
            per_key = [True] * n  # an invalid key was never stored
            wanted: list[tuple[int, str]] = []
            for i, key in enumerate(keys):
                try:
                    wanted.append((i, validate_key(self.key(key))))
                except Exception:  # noqa: BLE001 - not a key tierd can hold: never stored
                    pass
            if not wanted:
                self._finish(fid, True, "", per_key)
                return fid
            future = self._store.delete_many_async([tkey for _, tkey in wanted])
        except Exception as exc:  # noqa: BLE001 - never into LMCache
            self._failed(fid, "delete", n, exc)
            return fid
        future.add_done_callback(self._guarded(fid, "delete", n, lambda f: self._deleted(fid, n, wanted, f)))
        return fid

    def drain_completions(self) -> list[Completion]:
        """``(future_id, ok, error, per-key results)`` for every batch finished since the last call.

        Every submitted future id completes exactly once, with one result per key. ``ok`` is
        false when a key failed for a reason other than absence (a lookup: only when tierd did
        not answer), and ``error`` then says why.
        """
        with self._lock:
            if not self._closed:
                try:
                    os.eventfd_read(self._fd)
                except BlockingIOError:
                    pass
        out = []
        while self._ready:
            out.append(self._ready.popleft())
        return out

    def healthy(self) -> bool:
        """Whether batches can be served now (the daemon answers); never raises."""
        if self._closed:
            return False
        try:
            return bool(self._store.healthy())
        except Exception:  # noqa: BLE001 - an answer, never an error
            return False

    def report_status(self) -> dict[str, Any]:
        """What LMCache's status shows for this L2 (see Note [daemon away]): ``is_healthy`` is
        whether tierd answers now."""
        healthy = self.healthy()
        status: dict[str, Any] = {"is_healthy": healthy, "tierd_namespace": self._namespace,
                                  "tierd_failed_batches": self._failed_batches}
        where = getattr(self._store, "socket_path", None)
        status["tierd_socket"] = where if where is not None else "embedded"
        if not healthy:
            if self._closed:
                status["tierd_error"] = "the connector is closed"
            elif where is None:
                status["tierd_error"] = "the embedded tierd engine is not healthy (see its log)"
            else:
                status["tierd_error"] = (f"the tierd daemon on {where} does not answer; stores fail and lookups miss "
                                         "until it is back (the connector reconnects by itself)")
        return status

    def close(self) -> None:
        """Finish what was submitted, then release the store (if this connector opened it). Later
        submits complete not ok at once (logged), never raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            if self._owned:
                self._store.close()
        finally:
            with self._lock:
                os.close(self._fd)

    # -- completions -------------------------------------------------------------------------

    def _usable(self, fid: int, op: str, n: int, buffers: int | None = None) -> bool:
        """Whether a batch may start; if not, its completion is already reported."""
        if self._closed:
            log.warning("tierd's LMCache connector is closed: a %s of %d keys is not done", op, n)
            self._finish(fid, False, "StoreClosed: the tierd LMCache connector is closed", [False] * n)
            return False
        if buffers is not None and buffers != n:
            why = f"InvalidArgument: {n} keys but {buffers} buffers"
            log.warning("tierd's LMCache connector: a %s with %d keys but %d buffers is not done", op, n, buffers)
            self._finish(fid, False, why, [False] * n)
            return False
        return True

    def _guarded(self, fid: int, op: str, n: int,
                 callback: Callable[[Future[Any]], None]) -> Callable[[Future[Any]], None]:
        """``callback``, made to complete ``fid`` (not ok) if it fails: LMCache waits for every id."""

        def run(future: Future[Any]) -> None:
            try:
                callback(future)
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave LMCache waiting
                log.exception("tierd's LMCache connector: completing a %s of %d keys failed", op, n)
                self._finish(fid, False, _why(exc), [False] * n)

        return run

    def _finish(self, fid: int, ok: bool, error: str, per_key: list[bool]) -> None:
        self._ready.append((fid, ok, error, per_key))
        with self._lock:
            self._failed_batches += not ok
            if not self._closed:
                os.eventfd_write(self._fd, 1)

    def _failed(self, fid: int, op: str, n: int, exc: BaseException) -> None:
        """A whole batch failed (tierd did not answer): logged once per outage, reported not ok."""
        self._note_away(exc, op, n)
        self._finish(fid, False, _why(exc), [False] * n)

    def _note_away(self, exc: BaseException, op: str, n: int) -> None:
        if isinstance(exc, (DaemonUnavailable, StoreClosed)):
            with self._lock:
                first, self._away = self._away is None, str(exc)
            if first:
                log.warning("tierd's LMCache connector: %s; until it is back stores fail and lookups and loads "
                            "miss (no error reaches LMCache)", exc)
            return
        self._logs.warning(f"batch:{type(exc).__name__}",
                           f"tierd's LMCache connector: a {op} of {n} keys failed: {_why(exc)}")

    def _note_served(self) -> None:
        if self._away is not None:
            with self._lock:
                was, self._away = self._away, None
            if was is not None:
                log.warning("tierd's LMCache connector: the tierd daemon answers again; serving")

    def _summary(self, op: str, keys: Sequence[Any], bad: Mapping[int, str], n: int) -> str:
        if not bad:
            return ""
        i, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more of {n})" if len(bad) > 1 else ""
        return f"{_shown(keys[i])}: {why}{more}"

    def _report_items(self, op: str, keys: Sequence[Any], bad: Mapping[int, str], n: int) -> None:
        if bad:
            kind = next(iter(bad.values())).partition(":")[0]
            self._logs.warning(f"{op}:{kind}", f"tierd's LMCache connector: {len(bad)} of {n} keys of a {op} failed, "
                                               f"each alone: {self._summary(op, keys, bad, n)}")

    def _stored(self, fid: int, keys: Sequence[str], items: list[tuple[int, str, torch.Tensor]],
                bad: dict[int, str], future: Future[Any]) -> None:
        n = len(keys)
        try:
            results = future.result()
            landed = [bool(v) for v in results]
            errors: Mapping[str, TierdError] = getattr(results, "errors", {}) or {}
        except (DaemonUnavailable, StoreClosed) as exc:  # nothing of it stored: the daemon is away
            self._failed(fid, "store", n, exc)
            return
        except Exception as exc:  # noqa: BLE001 - the whole call failed: what landed is unknown
            self._note_away(exc, "store", n)
            landed, errors = [True] * len(items), {}  # undo every key LMCache does not count yet
            for i, _, _ in items:
                bad[i] = _why(exc)
        else:
            self._note_served()
        for (i, tkey, _), ok in zip(items, landed, strict=True):
            if not ok and i not in bad:
                exc = errors.get(tkey)
                bad[i] = _why(exc) if exc is not None else "not stored"
        if not bad:
            with self._lock:
                self._counted.update(_digest(tkey) for _, tkey, _ in items)
                self._orphans.difference_update(tkey for _, tkey, _ in items)
            self._finish(fid, True, "", [True] * n)
            return
        # Not ok: LMCache counts none of the batch, so tierd keeps none of it that LMCache does
        # not count already (Note [what LMCache counts]).
        bad = dict(sorted(bad.items()))
        error = self._summary("store", keys, bad, n)
        per_key = [False] * n
        undo: list[str] = []
        with self._lock:
            for (i, tkey, _), ok in zip(items, landed, strict=True):
                if not ok:
                    continue
                if _digest(tkey) in self._counted:
                    per_key[i] = True  # stored before, still held and counted
                else:
                    undo.append(tkey)
        kind = next(iter(bad.values())).partition(":")[0]
        self._logs.warning(f"store:{kind}", f"tierd's LMCache connector: {len(bad)} of {n} keys of a store failed: "
                                            f"{error}; the store is reported failed (LMCache counts whole batches) "
                                            f"and the {len(undo)} keys it stored are deleted again")
        if not undo:
            self._finish(fid, False, error, per_key)
            return
        self._undo(undo, then=lambda: self._finish(fid, False, error, per_key))

    def _undo(self, tkeys: list[str], then: Callable[[], None] | None = None) -> None:
        """Delete ``tkeys`` (landed parts of failed stores), then call ``then``; what cannot be
        deleted now waits in ``_orphans`` for the next store."""

        def done(f: Future[Any]) -> None:
            try:
                f.result()
            except Exception as exc:  # noqa: BLE001
                with self._lock:
                    if len(self._orphans) < _MAX_ORPHANS:
                        self._orphans.update(tkeys)
                self._logs.warning("undo", f"tierd's LMCache connector: could not delete {len(tkeys)} keys of a "
                                           f"failed store ({_why(exc)}); retried with the next store")
            if then is not None:
                then()

        try:
            future = self._store.delete_many_async(tkeys)
        except Exception as exc:  # noqa: BLE001 - the store is closing
            failed: Future[Any] = Future()
            failed.set_exception(exc)
            done(failed)
            return
        future.add_done_callback(done)

    def _undo_orphans(self) -> None:
        with self._lock:
            if not self._orphans:
                return
            orphans = [k for k in self._orphans if _digest(k) not in self._counted]
            self._orphans.clear()
        if orphans:
            self._undo(orphans)

    def _answered(self, fid: int, op: str, keys: Sequence[str], wanted: list[tuple[int, str, Any]],
                  bad: dict[int, str], future: Future[Any]) -> None:
        """A lookup's or a load's completion: a hit per key found (loaded), a miss elsewhere."""
        n = len(keys)
        try:
            results = future.result()
        except Exception as exc:  # noqa: BLE001
            self._failed(fid, op, n, exc)
            return
        self._note_served()
        errors: Mapping[str, TierdError] = getattr(results, "errors", {}) or {}
        per_key = [False] * n
        for (i, tkey, _), value in zip(wanted, results, strict=True):
            per_key[i] = value is not None and value is not False
            exc = errors.get(tkey)
            if exc is not None:
                bad[i] = _why(exc)
        bad = dict(sorted(bad.items()))
        self._report_items(op, keys, bad, n)
        # A lookup's per-key results count only when ok (LMCache's wrapper): ok whenever tierd answered.
        ok = op == "lookup" or not bad
        self._finish(fid, ok, self._summary(op, keys, bad, n), per_key)

    def _deleted(self, fid: int, n: int, wanted: list[tuple[int, str]], future: Future[Any]) -> None:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - nothing known deleted: LMCache keeps counting them
            self._failed(fid, "delete", n, exc)
            return
        self._note_served()
        with self._lock:
            self._counted.difference_update(_digest(tkey) for _, tkey in wanted)
        self._finish(fid, True, "", [True] * n)


_status_extended = False


def _extend_lmcache_status() -> None:
    """Make LMCache's native wrapper report a tierd connector's health (Note [daemon away]).

    LMCache 0.5.6's ``NativeConnectorL2Adapter.report_status`` says healthy while its
    demultiplexing thread runs, whatever its connector's backend does; for a
    :class:`TierdConnector` it also reports the connector's own status. Other connectors are
    untouched. Done once, when the first connector is made; a no-op without LMCache.
    """
    global _status_extended
    if _status_extended:
        return
    _status_extended = True
    try:
        from lmcache.v1.distributed.l2_adapters.native_connector_l2_adapter import NativeConnectorL2Adapter
    except Exception:  # noqa: BLE001 - LMCache absent or broken: nothing to extend
        return
    original = NativeConnectorL2Adapter.report_status
    if getattr(original, "_tierd_extended", False):
        return

    def report_status(self: Any) -> dict[str, Any]:
        status = original(self)
        client = getattr(self, "_client", None)
        if isinstance(client, TierdConnector):
            own = client.report_status()
            healthy = bool(status.get("is_healthy", True)) and own.pop("is_healthy")
            status.update(own)
            status["is_healthy"] = healthy
        return status

    report_status._tierd_extended = True  # type: ignore[attr-defined]
    report_status.__doc__ = original.__doc__
    NativeConnectorL2Adapter.report_status = report_status  # type: ignore[method-assign]
