"""tierd as LMCache's L2: a ``native_plugin`` connector for LMCache's multiprocess mode.

LMCache (and through it vLLM and SGLang) loads it by module path::

    --l2-adapter '{"type": "native_plugin", "module_path": "tierd.integrations.lmcache",
                   "class_name": "TierdConnector", "adapter_params": {}}'

LMCache wraps the connector in its ``NativeConnectorL2Adapter``, which keeps
its own lock counts and demultiplexes completions: the connector's part is
to start batched stores, loads, lookups and deletes without blocking, say
so on one eventfd, and hand back per-key results. Each maps onto one of
tierd's batched calls (:meth:`tierd.Store.put_many`, ``get_many(outs=)``,
``exists_many``, ``delete_many``) run on the store's threads through
:class:`tierd.Completions`; a load copies once, from tierd's host arena
straight into LMCache's L1 buffer.

With the default parameters the connector talks to the node's daemon
(``tierd serve``), so every worker on the machine (each vLLM rank, each
engine) shares one cache, which outlives any of them; ``embedded=True`` (or
a ``config``) runs an engine inside the LMCache process instead.

Keys: LMCache's own key strings (model, KV rank, group, chunk hash and its
``cache_salt``) under the namespace ``lmcache``; a deployment-wide ``salt``
parameter adds a tenant scope on top (hashed: keys never show it). A key
that is missing, expired or fails its checksum is a miss, never bad data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import xxhash

import tierd
from tierd.errors import InvalidArgument, TierdError
from tierd.integrations._stores import check_namespace, key_part, open_for

__all__ = ["TierdConnector"]


def _bytes_of(view: Any) -> torch.Tensor:
    """A uint8 tensor over an L1 buffer (a byte memoryview), without copying."""
    mv = memoryview(view)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv, dtype=torch.uint8)


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
        self._store, self._owned = open_for("tierd's LMCache connector", socket=socket, embedded=embedded,
                                            config=config, store=store)
        scope = f"{xxhash.xxh3_64_hexdigest(salt.encode())}/" if salt else ""
        self._prefix = f"{namespace}/{scope}"
        self._tier = tier
        self._completions = self._store.completions()
        self._closed = False

    @property
    def store(self) -> tierd.Store:
        return self._store

    def key(self, lmcache_key: str) -> str:
        """The tierd key an LMCache key string is stored under."""
        return self._prefix + key_part(lmcache_key)

    # -- LMCache's native connector interface -----------------------------------------------

    def event_fd(self) -> int:
        """Readable when :meth:`drain_completions` has something to return."""
        return self._completions.fd

    def submit_batch_set(self, keys: Sequence[str], memviews: Sequence[Any]) -> int:
        """Start storing each buffer under its key; returns the future id. The buffers must stay
        untouched until the completion arrives (LMCache holds them until then)."""
        self._check_batch(keys, memviews)
        items = [(self.key(k), _bytes_of(mv)) for k, mv in zip(keys, memviews, strict=True)]
        return self._completions.submit_put_many(items, tier=self._tier)

    def submit_batch_get(self, keys: Sequence[str], memviews: Sequence[Any]) -> int:
        """Start filling each buffer with its key's bytes (one copy, from the arena)."""
        self._check_batch(keys, memviews)
        return self._completions.submit_get_many([self.key(k) for k in keys],
                                                 outs=[_bytes_of(mv) for mv in memviews])

    def submit_batch_exists(self, keys: Sequence[str]) -> int:
        self._check_open()
        return self._completions.submit_exists_many([self.key(k) for k in keys])

    def submit_batch_delete(self, keys: Sequence[str]) -> int:
        self._check_open()
        return self._completions.submit_delete_many([self.key(k) for k in keys])

    def drain_completions(self) -> list[tuple[int, bool, str, list[bool] | None]]:
        """``(future_id, ok, error, per-key results)`` for every batch finished since the last call.

        ``ok`` is false when any key failed for a reason other than absence (then ``error``
        says why, and the per-key results still say which keys made it); a batch that failed
        as a whole has no per-key results.
        """
        out: list[tuple[int, bool, str, list[bool] | None]] = []
        for ticket, result in self._completions.drain():
            if isinstance(result, BaseException):
                out.append((ticket, False, f"{type(result).__name__}: {result}", None))
                continue
            # get_many: a value or None; put_many / exists_many / delete_many: bools.
            per_key = [value is not None and value is not False for value in result]
            errors: dict[str, TierdError] = getattr(result, "errors", {}) or {}
            error = ""
            if errors:
                key, exc = next(iter(errors.items()))
                more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
                error = f"{key}: {exc}{more}"
            out.append((ticket, not errors, error, per_key))
        return out

    def close(self) -> None:
        """Finish what was submitted, then release the store (if this connector opened it)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._owned:
                self._store.close()
        finally:
            self._completions.close()

    # -- helpers -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise tierd.StoreClosed("the tierd LMCache connector is closed")

    def _check_batch(self, keys: Sequence[str], memviews: Sequence[Any]) -> None:
        self._check_open()
        if len(keys) != len(memviews):
            raise InvalidArgument(f"{len(keys)} keys but {len(memviews)} buffers")
