"""tierd as SGLang's HiCache storage (its L3): ``TierdHiCacheStorage``.

SGLang loads it with its dynamic backend::

    --enable-hierarchical-cache --hicache-storage-backend dynamic \\
    --hicache-storage-backend-extra-config '{"backend_name": "tierd", "interface_v1": 1,
        "module_path": "tierd.integrations.sglang", "class_name": "TierdHiCacheStorage"}'

The rest of the extra config is this backend's parameters: ``socket``,
``embedded``, ``config``, ``namespace`` (default ``"sglang"``), ``salt``,
``tier``. By default it talks to the node's daemon, so every SGLang
process on the machine (every TP rank, every engine) shares one cache that
outlives them.

The zero-copy calls (``batch_get_v1`` / ``batch_set_v1``, which SGLang uses
for a dynamic backend when its extra config says ``"interface_v1": 1``) move
pages between tierd's host arena and SGLang's registered host pool
directly: each page is read into (or written from) its view in the pool,
one copy, batched into one call per batch. Without it SGLang calls
``batch_get``/``batch_set`` with flat page copies (a copy more each way). ``batch_exists`` answers the hit-prefix length in one
batched question.

Keys: SGLang's page hashes under a prefix naming the
:class:`tierd.KVKeyspace` of this rank's pages: model, KV dtype, host-pool
layout and interface, page size, tensor-parallel rank (none for MLA, whose KV every rank
replicates), pipeline stage and context-parallel slice, and the tenant
salt (hashed). Pages are shared exactly where their bytes are
interchangeable.

Prefix chains: with ``"hicache_storage_pass_prefix_keys": true`` in the
extra config, SGLang passes each ``batch_set_v1`` the page hashes before
its keys (``extra_info.prefix_keys``: ``prefix_keys + keys`` is one chain
from the sequence start), and the backend declares that chain
(``Store.declare_prefix``). A namespace with ``access = "prefix"`` then
knows each page's parent: a page whose children are cached is not evicted
before them, and new pages are admitted by how often their kind is read
again. Other namespaces ignore the declaration.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

import tierd
from tierd.clients.kv import KVKeyspace
from tierd.engine.keys import MAX_CHAIN
from tierd.errors import InvalidArgument, TierdError
from tierd.integrations._stores import check_namespace, key_part, open_for

__all__ = ["TierdHiCacheStorage"]

log = logging.getLogger(__name__)

_PARAMS = ("socket", "embedded", "config", "namespace", "salt", "tier")


class TierdHiCacheStorage(HiCacheStorage):
    """SGLang's HiCache storage interface over a tierd store; see the module's docstring.

    Args:
        storage_config: SGLang's ``HiCacheStorageConfig``; its ``extra_config`` carries this
            backend's parameters (and SGLang's ``backend_name``/``module_path``/``class_name``).
        kwargs: what SGLang's factory passes besides (unused).
        store: an open :class:`tierd.Store` to use (from Python; not closed by :meth:`close`).
    """

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None, *,
                 store: tierd.Store | None = None) -> None:
        extra = dict(storage_config.extra_config or {})
        params = {name: extra[name] for name in _PARAMS if name in extra}
        self.storage_config = storage_config
        self.namespace = check_namespace(params.get("namespace", "sglang"))
        self._salt = str(params.get("salt", ""))
        self._tier = params.get("tier")
        # v1 stores pages in the pool's page shape, the older calls flat: the same bytes, but a page
        # view cannot take a flat object, so the two interfaces keep apart keyspaces.
        self._interface = "v1" if extra.get("interface_v1") else "v0"
        self.store, self._owned = open_for("tierd's SGLang backend", socket=params.get("socket"),
                                           embedded=bool(params.get("embedded", False)),
                                           config=params.get("config"), store=store)
        self.mem_pool_host: Any = None
        self.keyspace = self._keyspace(None)
        self._prefix = self._prefix_of(self.keyspace)

    # -- keys ------------------------------------------------------------------------------

    def _keyspace(self, pool: Any) -> KVKeyspace:
        c = self.storage_config
        shard = []
        if c.pp_size > 1:
            shard.append(f"pp{c.pp_rank}/{c.pp_size}")
        if c.attn_cp_size > 1:
            shard.append(f"cp{c.attn_cp_rank}/{c.attn_cp_size}")
        if c.dcp_size > 1:
            shard.append(f"dcp{c.dcp_rank}/{c.dcp_size}")
        # MLA's latent KV is the same on every TP rank: the ranks share its pages.
        tp_rank, tp_size = (0, 1) if c.is_mla_model else (c.tp_rank, c.tp_size)
        return KVKeyspace(
            model=c.model_name or "", dtype=str(getattr(pool, "dtype", "")).removeprefix("torch."),
            layout=f"sglang:{getattr(pool, 'layout', '')}:{self._interface}", page_tokens=int(getattr(pool, "page_size", 1) or 1),
            tp_rank=tp_rank, tp_size=tp_size, shard=",".join(shard), salt=self._salt)

    def _prefix_of(self, keyspace: KVKeyspace) -> str:
        return f"{self.namespace}/{keyspace.digest().hex()}/"

    def key(self, page_hash: str) -> str:
        """The tierd key a page is stored under."""
        return self._prefix + key_part(page_hash)

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        # The pool fixes what a page holds (dtype, layout, page size): part of every key from now on.
        super().register_mem_pool_host(mem_pool_host)
        self.keyspace = self._keyspace(mem_pool_host)
        self._prefix = self._prefix_of(self.keyspace)

    # -- zero-copy batches into the host pool --------------------------------------------------

    def _pages(self, keys: Sequence[str], host_indices: torch.Tensor) -> list[torch.Tensor]:
        pool = self.mem_pool_host
        if pool is None:
            raise InvalidArgument("batch_get_v1/batch_set_v1 need the host pool: register_mem_pool_host first")
        page = pool.page_size
        if len(host_indices) != len(keys) * page:
            raise InvalidArgument(f"{len(keys)} pages of {page} tokens need {len(keys) * page} host indices, "
                                  f"got {len(host_indices)}")
        starts = host_indices[::page].tolist()
        # Each page's own view in the pool (strided in some layouts): tierd copies into it directly.
        return [pool.get_data_page(int(start), flat=False) for start in starts]

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not keys:
            return []
        pages = self._pages(keys, host_indices)
        try:
            got = self.store.get_many([self.key(k) for k in keys], outs=pages)
        except TierdError as exc:  # the daemon is gone: a miss for SGLang, which recomputes
            log.warning("tierd: %d pages not loaded: %s", len(keys), exc)
            return [False] * len(keys)
        for key, exc in got.errors.items():
            log.warning("tierd: page %s not loaded: %s", key, exc)
        return [value is not None for value in got]

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not keys:
            return []
        pages = self._pages(keys, host_indices)
        tkeys = [self.key(k) for k in keys]
        self._declare_chain(tkeys, extra_info)
        try:
            present = self.store.exists_many(tkeys)
            # Pages already stored (another rank's, another request's) are not written again.
            todo = [(i, tkeys[i], pages[i]) for i in range(len(keys)) if not present[i]]
            done = list(present)
            if todo:
                stored = self.store.put_many([(k, v) for _, k, v in todo], tier=self._tier)
                for (i, _, _), ok in zip(todo, stored, strict=True):
                    done[i] = bool(ok)
                for key, exc in stored.errors.items():
                    log.warning("tierd: page %s not stored: %s", key, exc)
        except TierdError as exc:
            log.warning("tierd: %d pages not stored: %s", len(keys), exc)
            return [False] * len(keys)
        return done

    def _declare_chain(self, tkeys: list[str], extra_info: HiCacheStorageExtraInfo | None) -> None:
        """Declare ``extra_info.prefix_keys + keys`` as one prefix chain (``tkeys``: the keys' tierd keys).

        A hint, never a failure: whatever the chain is, SGLang's store goes on.
        """
        prefix = getattr(extra_info, "prefix_keys", None)
        if prefix is None:  # SGLang passes none unless hicache_storage_pass_prefix_keys is set
            return
        if isinstance(prefix, (str, bytes)) or not isinstance(prefix, Sequence):
            log.warning("tierd: prefix_keys is a %s, not a list of page hashes: chain not declared",
                        type(prefix).__name__)
            return
        # Declared even when every page is stored already: a page's entry in the namespace's hints
        # may be gone (trimmed, or a daemon restarted over nvme that kept the pages), and the
        # declaration re-links it. Through the daemon it costs no round trip (sent, not waited for,
        # and applied before the calls below); a namespace without prefix policies is not asked again
        # for a minute.
        # A chain holds at most MAX_CHAIN keys: a longer one (a very long sequence of small pages)
        # loses its head. The kept part's first key is then declared a head, so one page loses
        # its parent link; declaring nothing would leave every new page without one.
        room = MAX_CHAIN - len(tkeys)
        tail = list(prefix[-room:]) if room > 0 and prefix else []
        if not all(isinstance(k, str) for k in tail):
            log.warning("tierd: prefix_keys holds something other than page hashes: chain not declared")
            return
        chain = [self.key(k) for k in tail] + tkeys[-MAX_CHAIN:]
        try:
            self.store.declare_prefix(chain)
        except TierdError as exc:  # a duplicate page, a dead daemon (the store below says so too)
            log.warning("tierd: prefix chain of %d pages not declared: %s", len(chain), exc)

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many of ``keys``, from the first, are stored: one batched question."""
        try:
            return self.store.prefix_length([self.key(k) for k in keys])
        except TierdError as exc:
            log.warning("tierd: lookup of %d pages failed: %s", len(keys), exc)
            return 0

    # -- tensor calls (the older interface) -----------------------------------------------------

    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: list[str], target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> list[torch.Tensor | None]:
        outs = list(target_locations) if target_locations is not None else None
        try:
            return list(self.store.get_many([self.key(k) for k in keys], outs=outs))
        except TierdError as exc:
            log.warning("tierd: %d pages not loaded: %s", len(keys), exc)
            return [None] * len(keys)

    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any | None = None, target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> bool:
        if values is None or len(values) != len(keys):
            raise InvalidArgument(f"batch_set needs one value per key, got {0 if values is None else len(values)} "
                                  f"for {len(keys)}")
        tkeys = [self.key(k) for k in keys]
        try:
            present = self.store.exists_many(tkeys)
            todo = [(tkeys[i], values[i]) for i in range(len(keys)) if not present[i]]
            return not todo or all(self.store.put_many(todo, tier=self._tier))
        except TierdError as exc:
            log.warning("tierd: %d pages not stored: %s", len(keys), exc)
            return False

    def exists(self, key: str) -> bool:
        return self.store.exists(self.key(key))

    def clear(self) -> None:
        """Delete this rank's pages (its keyspace's), nobody else's."""
        self.store.delete_many(self.store.keys(self._prefix))

    def close(self) -> None:
        if self._owned:
            self.store.close()
