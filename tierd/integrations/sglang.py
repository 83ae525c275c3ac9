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

Extra pools: models whose cache has more than KV pages (Mamba and other
recurrent state, sliding-window KV, DeepSeek's DSA indexer: SGLang's
``HybridCacheController``) register each host pool by name
(``register_mem_host_pool_v2``) and move their pages with the v2 calls.
``batch_set_v2`` / ``batch_get_v2`` take one ``PoolTransfer`` per pool and
answer ``{pool name: [ok per key]}``; ``batch_exists_v2`` answers the usable
prefix: the KV pages' stored prefix, cut where a pool misses a page it needs
(``all_pages``: every page of the prefix; ``trailing_pages``: the last N
pages before the prefix's end, so a prefix may be restorable at 5 pages and
not at 4: ``restorable_prefix_pages`` lists every usable length). A pool
named ``kv`` is the KV pages themselves. This is SGLang's own file backend's
contract (``HiCacheFile``), ``block_groups`` excepted, which neither
supports. Extra pools' pages go through a staging page of the pool
(``get_dummy_flat_data_page``, then ``set_from_flat_data_page``) as SGLang's
file backend does: a Mamba pool's page is assembled from several buffers,
not a view to copy into.

Per-item results: in every batch call, a key tierd cannot store (a NUL, over
1 KiB: tierd's key rules), a host index outside the registered pool, or a
buffer of the wrong size fails that key alone (False, None or a miss, with a
logged reason) and stores nothing for it; the batch's other keys go on.
Host indices whose count does not match the keys (a page's worth per key)
fail the whole call's keys, as SGLang's file backend does. ``batch_exists``
stops at a key tierd cannot store (it is not stored).

Keys already stored are kept: a ``set`` or ``batch_set*`` of a stored key
writes nothing and reports True, as ``HiCacheFile`` skips a page whose file
exists (a page hash names its content, so another rank's or an earlier
request's copy serves as well). A page that cannot be loaded into the pool's
page (stored with another size, by an older tierd) is dropped when a load
finds it, so the next backup stores it again instead of the key staying
broken.

While the daemon is away (killed, restarting) the backend never raises into
SGLang: lookups answer a miss (``exists`` False, ``batch_exists`` 0, no
restorable prefix), loads fail, stores report False per key, ``clear``
returns False; SGLang recomputes what its L3 cannot give. It logs the
outage once and once more when the daemon serves again. A store from
``tierd.connect()`` reconnects by itself, so once the daemon is back (a
new one on the same socket) the backend serves again with no engine restart.

Keys: SGLang's page hashes under a prefix naming the
:class:`tierd.KVKeyspace` of this rank's pages: model, KV dtype, host-pool
layout and interface, page size, tensor-parallel rank (none for MLA, whose KV every rank
replicates), pipeline stage and context-parallel slice, and the tenant
salt (hashed). Pages are shared exactly where their bytes are
interchangeable. Each extra pool has a keyspace of its own (its name, dtype,
layout and page size; Mamba state is per TP rank even for MLA, as in
SGLang's file backend).

Prefix chains: with ``"hicache_storage_pass_prefix_keys": true`` in the
extra config, SGLang passes each ``batch_set_v1`` the page hashes before
its keys (``extra_info.prefix_keys``: ``prefix_keys + keys`` is one chain
from the sequence start), and the backend declares that chain
(``Store.declare_prefix``). A namespace with ``access = "prefix"`` then
knows each page's parent: a page whose children are cached is not evicted
before them, and new pages are admitted by how often their kind is read
again. Other namespaces ignore the declaration. Extra pools with the
``all_pages`` policy declare their chains too; trailing pools hold no chain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

import tierd
from tierd.clients.kv import KVKeyspace
from tierd.engine.keys import MAX_CHAIN, validate_key
from tierd.errors import DaemonUnavailable, InvalidArgument, StoreClosed, TierdError
from tierd.integrations._stores import check_namespace, key_part, open_for

__all__ = ["TierdHiCacheStorage"]

log = logging.getLogger(__name__)

_PARAMS = ("socket", "embedded", "config", "namespace", "salt", "tier")
_KV = PoolName.KV.value


def _pool_name(name: Any) -> str:
    """A pool's name as text: SGLang passes ``PoolName`` members or plain strings."""
    return str(name.value) if isinstance(name, Enum) else str(name)


def _shown(page_hash: Any) -> str:
    """A page hash for a log line: a 2000-character one is cut."""
    text = repr(page_hash)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(str(page_hash))} chars)"


class _Pool:
    """One host pool as the backend moves its pages.

    ``direct``: its pages are views into the pool that tierd reads into in place (the KV
    pool under the v1 interface); else a load goes through a staging page. ``flat``: its pages
    are stored flat (the older interface's objects), else in the pool's page shape.
    """

    __slots__ = ("name", "host", "prefix", "page", "size", "page_bytes", "direct", "flat")

    def __init__(self, name: str, host: Any, prefix: str, *, direct: bool, flat: bool) -> None:
        self.name, self.host, self.prefix = name, host, prefix
        self.direct, self.flat = direct, flat
        # Host indices are in the controller's (logical) space: under decode context parallelism
        # dcp_size of them share one row of the pool, so its logical sizes bound them.
        self.page = int(getattr(host, "logical_page_size", None) or getattr(host, "page_size", 1) or 1)
        size = getattr(host, "logical_size", None)
        size = getattr(host, "size", None) if size is None else size
        self.size = int(size) if hasattr(size, "__index__") else None  # None: only negatives are refused
        self.page_bytes = self._page_bytes(host)

    @staticmethod
    def _page_bytes(host: Any) -> int | None:
        """Bytes of one page, from the pool's staging page; None where the pool has none to show."""
        if host is None:
            return None
        try:
            page = host.get_dummy_flat_data_page()
        except Exception:  # a pool without one (or unable to make one here): sizes go unchecked
            return None
        return int(page.numel() * page.element_size())


class TierdHiCacheStorage(HiCacheStorage):
    """SGLang's HiCache storage interface over a tierd store; see the module's docstring.

    Args:
        storage_config: SGLang's ``HiCacheStorageConfig``; its ``extra_config`` carries this
            backend's parameters (and SGLang's ``backend_name``/``module_path``/``class_name``).
        kwargs: what SGLang's factory passes besides (unused).
        store: an open :class:`tierd.Store` to use (from Python; not closed by :meth:`close`).

    SGLang calls it from its backup and prefetch threads at once; pools are registered
    before either starts.
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
        self._pools: dict[str, _Pool] = {}  # extra pools, by name (register_mem_host_pool_v2)
        self._away = False  # the store failed a whole call: logged once until one succeeds
        self.keyspace = self._keyspace(None)
        self._prefix = self._prefix_of(self.keyspace)
        self._kv = self._kv_pool(None)

    # -- keys ------------------------------------------------------------------------------

    def _keyspace(self, pool: Any, name: str = _KV) -> KVKeyspace:
        c = self.storage_config
        shard = []
        if c.pp_size > 1:
            shard.append(f"pp{c.pp_rank}/{c.pp_size}")
        if c.attn_cp_size > 1:
            shard.append(f"cp{c.attn_cp_rank}/{c.attn_cp_size}")
        if c.dcp_size > 1:
            shard.append(f"dcp{c.dcp_rank}/{c.dcp_size}")
        # MLA's latent KV is the same on every TP rank: the ranks share its pages. Mamba state is
        # split over the ranks whatever the attention (SGLang's file backend keys it per rank too).
        shared = c.is_mla_model and name != PoolName.MAMBA.value
        tp_rank, tp_size = (0, 1) if shared else (c.tp_rank, c.tp_size)
        # An extra pool's pages are stored alike under either interface: engines of both share them.
        layout = f"sglang:{getattr(pool, 'layout', '')}:{self._interface if name == _KV else name}"
        return KVKeyspace(
            model=c.model_name or "", dtype=str(getattr(pool, "dtype", "")).removeprefix("torch."),
            layout=layout, page_tokens=int(getattr(pool, "page_size", 1) or 1),
            tp_rank=tp_rank, tp_size=tp_size, shard=",".join(shard), salt=self._salt)

    def _prefix_of(self, keyspace: KVKeyspace) -> str:
        return f"{self.namespace}/{keyspace.digest().hex()}/"

    def key(self, page_hash: str, pool: str | None = None) -> str:
        """The tierd key a page is stored under (an extra pool's page: ``pool``, its name)."""
        return self._pool_prefix(pool) + key_part(page_hash)

    def _pool_prefix(self, pool: Any) -> str:
        if pool is None or _pool_name(pool) == _KV:
            return self._prefix
        name = _pool_name(pool)
        known = self._pools.get(name)
        # A pool never registered has a keyspace no page was stored under: its lookups miss.
        return known.prefix if known is not None else self._prefix_of(self._keyspace(None, name))

    def _kv_pool(self, host: Any) -> _Pool:
        return _Pool(_KV, host, self._prefix, direct=self._interface == "v1", flat=self._interface == "v0")

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        # The pool fixes what a page holds (dtype, layout, page size): part of every key from now on.
        super().register_mem_pool_host(mem_pool_host)
        self.keyspace = self._keyspace(mem_pool_host)
        self._prefix = self._prefix_of(self.keyspace)
        self._kv = self._kv_pool(mem_pool_host)

    def register_mem_host_pool_v2(self, host_pool: Any, host_pool_name: Any) -> None:
        """Register an extra pool (Mamba, SWA, indexer, ...) for the v2 calls, by its SGLang name."""
        super().register_mem_host_pool_v2(host_pool, host_pool_name)
        name = _pool_name(host_pool_name)
        if name == _KV:  # the KV pages themselves: the anchor pool's keys, whatever pool object names them
            if self.mem_pool_host is None:
                self.register_mem_pool_host(host_pool)
            return
        self._pools[name] = _Pool(name, host_pool, self._prefix_of(self._keyspace(host_pool, name)),
                                  direct=False, flat=False)

    def _tkeys(self, pool: _Pool | str, hashes: Sequence[Any], what: str) -> list[str | None]:
        """Each page's tierd key, None (logged) where tierd cannot take it: that page alone fails."""
        prefix = pool.prefix if isinstance(pool, _Pool) else pool
        out: list[str | None] = []
        for h in hashes:
            try:
                if not isinstance(h, str):
                    raise InvalidArgument(f"page hashes are strings, got {type(h).__name__}")
                out.append(validate_key(prefix + key_part(h)))
            except InvalidArgument as exc:
                log.warning("tierd: page %s %s: %s", _shown(h), what, exc)
                out.append(None)
        return out

    # -- a call the store could not serve at all ---------------------------------------------------

    def _failed(self, exc: TierdError, what: str) -> None:
        """Log a call the store failed as a whole. An unreachable daemon is logged once until a
        call succeeds again: while it is away every call fails, and SGLang makes many."""
        if isinstance(exc, (DaemonUnavailable, StoreClosed)):
            if not self._away:
                self._away = True
                log.warning("tierd: %s: %s; SGLang's L3 misses until the daemon serves again", what, exc)
            else:
                log.debug("tierd: %s: %s", what, exc)
            return
        log.warning("tierd: %s: %s", what, exc)

    def _served(self) -> None:
        if self._away:
            self._away = False
            log.warning("tierd: the daemon serves SGLang's L3 again")

    # -- host indices and pages ------------------------------------------------------------

    def _starts(self, pool: _Pool, n: int, host_indices: torch.Tensor | None, call: str) -> list[int | None] | None:
        """Each page's first host index, None (logged) for a page outside the pool; None for all
        when the count is not a page's worth per key (no page can be told from the next)."""
        count = 0 if host_indices is None else int(host_indices.numel())
        if count != n * pool.page:
            log.error("tierd: %s: %d %s pages of %d slots need %d host indices, got %d: none moved",
                      call, n, pool.name, pool.page, n * pool.page, count)
            return None
        if n == 0:
            return []
        assert host_indices is not None
        rows = host_indices.reshape(n, pool.page).to("cpu", torch.int64)
        firsts, lows, highs = rows[:, 0].tolist(), rows.amin(1).tolist(), rows.amax(1).tolist()
        starts: list[int | None] = []
        for first, low, high in zip(firsts, lows, highs, strict=True):
            # SGLang reads a page from its first index on (get_data_page(first)): that span must fit too.
            top = max(high, first + pool.page - 1)
            if low < 0 or (pool.size is not None and top >= pool.size):
                log.warning("tierd: %s: host indices %d..%d are outside the %s pool (%s slots): page not moved",
                            call, low, top, pool.name, pool.size)
                starts.append(None)
            else:
                starts.append(int(first))
        return starts

    def _page(self, pool: _Pool, start: int, page_hash: str, call: str) -> torch.Tensor | None:
        """The page at ``start`` to store, None (logged) where the pool gives no whole page."""
        try:
            page = pool.host.get_data_page(start, flat=pool.flat)
        except Exception as exc:  # SGLang's pool refused the index: this page fails
            log.warning("tierd: %s: page %s: the %s pool gives no page at %d: %s", call, _shown(page_hash),
                        pool.name, start, exc)
            return None
        nbytes = page.numel() * page.element_size()
        if pool.page_bytes is not None and nbytes != pool.page_bytes:
            log.warning("tierd: %s: page %s at host index %d holds %d bytes, the %s pool's pages %d: not stored",
                        call, _shown(page_hash), start, nbytes, pool.name, pool.page_bytes)
            return None
        return page

    # -- moving pages (every interface) ------------------------------------------------------

    def _write(self, pool: _Pool, call: str, hashes: Sequence[Any], host_indices: torch.Tensor | None,
               extra_info: HiCacheStorageExtraInfo | None, *, chain: bool) -> list[bool]:
        done = [False] * len(hashes)
        tkeys = self._tkeys(pool, hashes, "not stored")
        starts = self._starts(pool, len(hashes), host_indices, call)
        if starts is None:
            return done
        if chain:
            self._declare_chain(pool, tkeys, extra_info)
        items = []
        for i, (tkey, start) in enumerate(zip(tkeys, starts, strict=True)):
            if tkey is None or start is None:
                continue
            page = self._page(pool, start, hashes[i], call)
            if page is not None:
                items.append((i, tkey, page))
        return self._store_new(items, done, call)

    def _store_new(self, items: list[tuple[int, str, Any]], done: list[bool], call: str) -> list[bool]:
        """Put each ``(i, key, value)`` not stored yet; ``done[i]`` True where the key is stored."""
        if not items:
            return done
        try:
            present = self.store.exists_many([key for _, key, _ in items])
            # Keys already stored are kept (HiCacheFile skips a page whose file exists): written by
            # another rank or an earlier request, the same page hash names the same bytes.
            todo = [item for item, here in zip(items, present, strict=True) if not here]
            for (i, _, _), here in zip(items, present, strict=True):
                done[i] = bool(here)
            if todo:
                stored = self.store.put_many([(key, value) for _, key, value in todo], tier=self._tier)
                for (i, _, _), ok in zip(todo, stored, strict=True):
                    done[i] = bool(ok)
                for key, exc in stored.errors.items():
                    log.warning("tierd: %s: page %s not stored: %s", call, key, exc)
        except TierdError as exc:
            self._failed(exc, f"{call}: {len(items)} pages not stored")
            return [False] * len(done)
        self._served()
        return done

    def _read(self, pool: _Pool, call: str, hashes: Sequence[Any], host_indices: torch.Tensor | None) -> list[bool]:
        done = [False] * len(hashes)
        tkeys = self._tkeys(pool, hashes, "not loaded")
        starts = self._starts(pool, len(hashes), host_indices, call)
        if starts is None:
            return done
        items = []
        for i, (tkey, start) in enumerate(zip(tkeys, starts, strict=True)):
            if tkey is None or start is None:
                continue
            try:
                # In place where the page is a view into the pool; else into a staging page.
                out = (pool.host.get_data_page(start, flat=False) if pool.direct
                       else pool.host.get_dummy_flat_data_page())
            except Exception as exc:  # SGLang's pool refused the index: this page fails
                log.warning("tierd: %s: page %s: the %s pool gives no page at %d: %s", call, _shown(hashes[i]),
                            pool.name, start, exc)
                continue
            items.append((i, tkey, start, out))
        if not items:
            return done
        try:
            got = self.store.get_many([key for _, key, _, _ in items], outs=[out for _, _, _, out in items])
        except TierdError as exc:  # the daemon is gone: a miss for SGLang, which recomputes
            self._failed(exc, f"{call}: {len(items)} pages not loaded")
            return done
        self._served()
        unfit = []
        for (i, key, start, out), value in zip(items, got, strict=True):
            if value is None:
                exc = got.errors.get(key)
                if exc is not None:
                    log.warning("tierd: %s: page %s not loaded: %s", call, key, exc)
                    if isinstance(exc, InvalidArgument):  # stored with another size or shape than the pool's
                        unfit.append(key)
                continue
            if not pool.direct:
                try:
                    pool.host.set_from_flat_data_page(start, out)
                except Exception as exc:  # the pool refused the page: a miss
                    log.warning("tierd: %s: page %s not loaded into the %s pool: %s", call, key, pool.name, exc)
                    continue
            done[i] = True
        if unfit:
            self._drop(unfit, call)
        return done

    def _drop(self, keys: list[str], call: str) -> None:
        """Delete pages no load into this pool can use, so the next backup stores them again (stored
        keys are kept, so such a page would stay a hit that never loads)."""
        try:
            self.store.delete_many(keys)
        except TierdError as exc:
            self._failed(exc, f"{call}: {len(keys)} unloadable pages not dropped")
            return
        log.warning("tierd: %s: dropped %d pages that do not fit the pool's pages; the next backup stores them",
                    call, len(keys))

    def _declare_chain(self, pool: _Pool, tkeys: list[str | None], extra_info: HiCacheStorageExtraInfo | None) -> None:
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
        if any(k is None for k in tkeys):
            log.warning("tierd: a page of this batch has a key tierd cannot take: chain not declared")
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
        chain = [pool.prefix + key_part(k) for k in tail] + [k for k in tkeys[-MAX_CHAIN:] if k is not None]
        try:
            self.store.declare_prefix(chain)
        except TierdError as exc:  # a duplicate page, a dead daemon (the store below says so too)
            log.warning("tierd: prefix chain of %d pages not declared: %s", len(chain), exc)

    # -- zero-copy batches into the host pool (v1) -----------------------------------------------

    def _anchor(self, call: str) -> _Pool:
        if self.mem_pool_host is None:
            raise InvalidArgument(f"{call} needs the host pool: register_mem_pool_host first")
        return self._kv

    def batch_get_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not keys:
            return []
        return self._read(self._anchor("batch_get_v1"), "batch_get_v1", keys, host_indices)

    def batch_set_v1(self, keys: list[str], host_indices: torch.Tensor,
                     extra_info: HiCacheStorageExtraInfo | None = None) -> list[bool]:
        if not keys:
            return []
        return self._write(self._anchor("batch_set_v1"), "batch_set_v1", keys, host_indices, extra_info, chain=True)

    def batch_exists(self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None) -> int:
        """How many of ``keys``, from the first, are stored: one batched question."""
        tkeys = self._tkeys(self._kv, keys, "not looked up")
        valid = [k for k in tkeys[: tkeys.index(None) if None in tkeys else len(tkeys)] if k is not None]
        if not valid:
            return 0
        try:
            n = self.store.prefix_length(valid)
        except TierdError as exc:
            self._failed(exc, f"lookup of {len(keys)} pages failed")
            return 0
        self._served()
        return n

    # -- extra pools (v2) ----------------------------------------------------------------------

    def _transfer_pool(self, transfer: PoolTransfer, call: str) -> _Pool | None:
        name = _pool_name(transfer.name)
        if name == _KV:
            pool: _Pool | None = self._kv if self.mem_pool_host is not None else None
        else:
            pool = self._pools.get(name)
        if pool is None:
            log.error("tierd: %s: no %s pool registered (register_mem_host_pool_v2): its %d pages not moved",
                      call, name, len(transfer.keys or []))
        return pool

    def batch_set_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        """Store each transfer's pages from its pool; ``{pool name: [stored per key]}``."""
        results: dict[str, list[bool]] = {}
        for transfer in transfers or []:
            keys = list(transfer.keys or [])
            pool = self._transfer_pool(transfer, "batch_set_v2")
            if pool is None or not keys:
                results[transfer.name] = [False] * len(keys)
                continue
            # Trailing pools (a window of states) are no chain from the sequence start.
            chain = transfer.hit_policy == PoolHitPolicy.ALL_PAGES
            results[transfer.name] = self._write(pool, f"batch_set_v2[{pool.name}]", keys, transfer.host_indices,
                                                 extra_info, chain=chain)
        return results

    def batch_get_v2(self, transfers: list[PoolTransfer],
                     extra_info: HiCacheStorageExtraInfo | None = None) -> dict[str, list[bool]]:
        """Load each transfer's pages into its pool; ``{pool name: [loaded per key]}``."""
        results: dict[str, list[bool]] = {}
        for transfer in transfers or []:
            keys = list(transfer.keys or [])
            pool = self._transfer_pool(transfer, "batch_get_v2")
            if pool is None or not keys:
                results[transfer.name] = [False] * len(keys)
                continue
            results[transfer.name] = self._read(pool, f"batch_get_v2[{pool.name}]", keys, transfer.host_indices)
        return results

    def batch_exists_v2(self, keys: list[str], pool_transfers: list[PoolTransfer] | None = None,
                        extra_info: HiCacheStorageExtraInfo | None = None) -> PoolTransferResult:
        """The usable prefix of ``keys`` (in pages) with every pool of ``pool_transfers``.

        ``kv_hit_pages``: the longest prefix every pool can restore; ``extra_pool_hit_pages``:
        each pool's own boundary (KV's under ``PoolName.KV``; a pool whose boundary is 0 is left
        out); ``restorable_prefix_pages``: every usable prefix length. A pool checks the pages of
        ``keys`` (``transfer.keys`` gives only a trailing pool's window: its length). One
        batched question for all pools.

        A pool with another hit policy (``block_groups``: no SGLang backend has one) is logged and
        makes the whole answer a miss: nothing is raised into SGLang.
        """
        transfers = list(pool_transfers or [])
        for transfer in transfers:
            if transfer.hit_policy not in (PoolHitPolicy.ALL_PAGES, PoolHitPolicy.TRAILING_PAGES):
                log.warning("tierd: hit policy %s of pool %s is not supported (use all_pages or trailing_pages); "
                            "a miss", _pool_name(transfer.hit_policy), _pool_name(transfer.name))
                return PoolTransferResult(0, {}, [])
        kv_keys = self._tkeys(self._kv, keys, "not looked up")
        usable = kv_keys.index(None) if None in kv_keys else len(kv_keys)  # a key tierd cannot take is not stored
        pool_keys = [self._tkeys(self._pool_prefix(t.name), keys[:usable], "not looked up") for t in transfers]
        asked = [k for k in kv_keys[:usable] if k is not None] + [k for ks in pool_keys for k in ks if k is not None]
        if not asked:
            return PoolTransferResult(0, {}, [])
        try:
            found = dict(zip(asked, self.store.exists_many(asked), strict=True))
        except TierdError as exc:
            self._failed(exc, f"lookup of {len(keys)} pages in {1 + len(transfers)} pools failed")
            return PoolTransferResult(0, {}, [])
        self._served()

        kv_pages = next((i for i in range(usable) if not found.get(kv_keys[i] or "")), usable)
        hits: dict[Any, int] = {PoolName.KV: kv_pages} if kv_pages else {}
        restorable = list(range(1, kv_pages + 1))
        for transfer, tkeys in zip(transfers, pool_keys, strict=True):
            if not restorable:
                break
            has = [bool(found.get(k or "")) for k in tkeys[:kv_pages]]
            if transfer.hit_policy == PoolHitPolicy.ALL_PAGES:
                boundary = next((i for i in range(kv_pages) if not has[i]), kv_pages)
                ok = set(range(1, boundary + 1))
            else:
                # A trailing pool restores a prefix when the last N pages before its end are stored.
                window = max(1, len(transfer.keys or ()))
                ok = {p for p in range(1, kv_pages + 1) if all(has[max(0, p - window):p])}
                boundary = max(ok, default=0)
            if boundary:
                hits[transfer.name] = boundary
            restorable = [p for p in restorable if p in ok]
        return PoolTransferResult(restorable[-1] if restorable else 0, hits, restorable)

    # -- tensor calls (the older interface) -----------------------------------------------------

    def get(self, key: str, target_location: Any | None = None, target_sizes: Any | None = None) -> torch.Tensor | None:
        return self.batch_get([key], [target_location] if target_location is not None else None)[0]

    def batch_get(self, keys: list[str], target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> list[torch.Tensor | None]:
        outs = list(target_locations) if target_locations is not None else None
        values: list[torch.Tensor | None] = [None] * len(keys)
        if outs is not None and len(outs) != len(keys):
            log.warning("tierd: batch_get needs one target location per key, got %d for %d: all missed",
                        len(outs), len(keys))
            return values
        tkeys = self._tkeys(self._kv, keys, "not loaded")
        todo = []
        for i, tkey in enumerate(tkeys):
            out = outs[i] if outs is not None else None
            if out is not None and not isinstance(out, torch.Tensor):
                log.warning("tierd: page %s not loaded: its target is a %s, not a tensor", _shown(keys[i]),
                            type(out).__name__)
            elif tkey is not None:
                todo.append((i, tkey, out))
        if not todo:
            return values
        try:
            got = self.store.get_many([key for _, key, _ in todo],
                                      outs=[out for _, _, out in todo] if outs is not None else None)
        except TierdError as exc:
            self._failed(exc, f"{len(todo)} pages not loaded")
            return values
        self._served()
        for (i, key, _), value in zip(todo, got, strict=True):
            values[i] = value
            if key in got.errors:
                log.warning("tierd: page %s not loaded: %s", key, got.errors[key])
        return values

    def set(self, key: str, value: Any | None = None, target_location: Any | None = None,
            target_sizes: Any | None = None) -> bool:
        return self.batch_set([key], [value])

    def batch_set(self, keys: list[str], values: Any | None = None, target_locations: Any | None = None,
                  target_sizes: Any | None = None) -> bool:
        """Store each key's value (a flat page); True when every key is stored (kept or new).

        One bad item fails only itself: the others are stored all the same.
        """
        if values is None or len(values) != len(keys):
            log.warning("tierd: batch_set needs one value per key, got %d for %d: nothing stored",
                        0 if values is None else len(values), len(keys))
            return False
        done = [False] * len(keys)
        items = []
        for i, tkey in enumerate(self._tkeys(self._kv, keys, "not stored")):
            value = values[i]
            if tkey is None:
                continue
            if not isinstance(value, torch.Tensor):
                log.warning("tierd: page %s not stored: its value is a %s, not a tensor", _shown(keys[i]),
                            type(value).__name__)
                continue
            nbytes = value.numel() * value.element_size()
            # A page that cannot load into the pool's pages would stay a hit that never loads.
            if self._kv.page_bytes is not None and nbytes != self._kv.page_bytes:
                log.warning("tierd: page %s not stored: it holds %d bytes, the host pool's pages %d",
                            _shown(keys[i]), nbytes, self._kv.page_bytes)
                continue
            items.append((i, tkey, value))
        return all(self._store_new(items, done, "batch_set"))

    def exists(self, key: str) -> bool:
        tkey = self._tkeys(self._kv, [key], "not looked up")[0]
        if tkey is None:
            return False
        try:
            found = self.store.exists(tkey)
        except TierdError as exc:
            self._failed(exc, "lookup of 1 page failed")
            return False
        self._served()
        return found

    def clear(self) -> bool:
        """Delete this rank's pages (its keyspaces', every pool's), nobody else's; False when the
        store could not be asked (nothing is raised)."""
        try:
            for prefix in dict.fromkeys([self._prefix, *(p.prefix for p in self._pools.values())]):
                self.store.delete_many(self.store.keys(prefix))
        except TierdError as exc:
            self._failed(exc, "clear failed")
            return False
        self._served()
        return True

    def close(self) -> None:
        if self._owned:
            self.store.close()
