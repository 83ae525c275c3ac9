"""Soak: serving engines' clients write 10x the tiers while the daemon is stopped and restarted.

    python bench/soak.py [--quick] [--out DIR] [--host-mib 64] [--nvme-mib 256] [--multiple 10]

One real ``tierd serve`` (host 64 MiB, nvme 256 MiB by default) on a real Unix
socket, and engine-like clients, each on its own thread, each in a closed loop
(a store, then a read of what it stored a little earlier):

* ``lmcache``: the L2 adapter LMCache's own ``--l2-adapter`` parsing and
  native_plugin factory build over ``tierd.integrations.lmcache.TierdConnector``
  (as bench/engines.py does); stores, lookups (with their locks) and loads
  are submitted as LMCache's controllers submit them and waited for on the
  adapter's eventfds, consumed as LMCache consumes them;
* ``sglang``: ``TierdHiCacheStorage`` built by SGLang's ``StorageBackendFactory``
  (dynamic backend) over a page_first host pool: ``batch_set_v1``, then
  ``batch_exists`` and ``batch_get_v1`` of earlier pages, as HiCache's
  prefetch does;
* ``kv``: a :class:`tierd.PrefixKVStore` over ``tierd.connect()``;
* ``durable``: ``store.put(..., durable=True)`` into ``ckpt`` (not a cache),
  keeping a ledger of every acknowledged put and deleting its oldest keys to
  stay under a quota well inside nvme.

Together they store ``--multiple`` (at least 10) times the tiers' capacity
while the daemon is stopped and started again 4 times on the same socket and
nvme directory (SIGTERM, SIGKILL, SIGTERM, SIGKILL), at evenly spaced points
of the bytes to write. Reported per interval: each client's store success
rate (items stored of items offered) and hit ratio (items read back, bytes
checked, of items asked for), the daemon's RSS and open fds; over the run:
exceptions that escaped an adapter call into the engine (goal 0; for the
``tierd`` API clients, exceptions other than tierd's documented errors),
calls that never returned, durable objects lost (every acknowledged durable
put read back and compared after each restart and at the end; goal 0), and
per restart, each client's first successful store after the new daemon sent
READY=1 (goal <= 1 s). Without LMCache or SGLang installed, their clients
are left out and the report says so.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tierd  # noqa: E402
from bench._common import MIB, BenchContext, pyplot, row, save_figure, standalone, verdict  # noqa: E402

RESTARTS = (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL)
CLIENTS = ("lmcache", "sglang", "kv", "durable")
CACHES = ("lmcache", "sglang", "kv")  # the clients that read back what they stored
# tierd's documented failures of a call through its own API (a daemon away, a block evicted between a
# lookup and its read, a full tier or a quota): counted as failed calls, not as errors escaping.
DOCUMENTED = (tierd.DaemonUnavailable, tierd.NotFound, tierd.OutOfSpace, tierd.QuotaExceeded)
_LAYERS, _HEADS, _DIM = 4, 8, 64  # a toy model: 8 KiB of KV a token (bf16, K and V)
_TOKEN_BYTES = _LAYERS * 2 * _HEADS * _DIM * 2


@dataclass
class SoakConfig:
    """One soak run's sizes; ``short()`` is the test suite's."""

    host: int = 64 * MIB
    nvme: int = 256 * MIB
    item: int = 256 << 10  # bytes of one chunk, page, block or durable object
    batch: int = 8  # items a store call
    multiple: float = 10.0  # bytes to store, in tier capacities
    interval_s: float = 1.0
    min_down_s: float = 1.0  # the daemon stays down at least this long (and until every client failed a call)
    retry_s: float = 0.02  # a client's pause after a failed call (an engine's next request)
    call_timeout_s: float = 30.0  # a call not back by then is counted as hung
    recover_cap_s: float = 20.0  # how long a restart waits for every client's first store
    max_s: float = 1200.0  # the whole run, whatever was stored by then
    engines: bool = True  # the LMCache and SGLang clients (when installed)
    seed: int = 0

    @classmethod
    def short(cls, *, engines: bool = True) -> SoakConfig:
        return cls(host=8 * MIB, nvme=32 * MIB, item=64 << 10, interval_s=0.5, min_down_s=0.0,
                   call_timeout_s=20.0, recover_cap_s=20.0, max_s=150.0, engines=engines)

    @property
    def capacity(self) -> int:
        return self.host + self.nvme

    @property
    def durable_quota(self) -> int:
        """What the durable writer keeps stored at most: an eighth of nvme."""
        return self.nvme // 8


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


# -- bytes each client can check -------------------------------------------------------------


class Pattern:
    """Items of one shape whose bytes say which item they are: one of 8 random bodies, and the
    item's number in their first four int16 words (15 bits each), so a read checks every byte."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.bases = [torch.randint(-(2**15), 2**15, shape, dtype=torch.int16, generator=g) for _ in range(8)]

    @staticmethod
    def _head(t: torch.Tensor) -> torch.Tensor:
        return t[(0,) * (t.dim() - 1)][:4]

    @staticmethod
    def _words(ident: int) -> torch.Tensor:
        return torch.tensor([(ident >> s) & 0x7FFF for s in (0, 15, 30, 45)], dtype=torch.int16)

    def fill(self, dst: torch.Tensor, ident: int) -> None:
        """Write item ``ident`` into ``dst`` (an int16 view of the right shape, strided or not)."""
        dst.copy_(self.bases[ident % 8])
        self._head(dst).copy_(self._words(ident))

    def make(self, ident: int) -> torch.Tensor:
        out = self.bases[ident % 8].clone()
        self._head(out).copy_(self._words(ident))
        return out

    def clear(self, dst: torch.Tensor) -> None:
        """Zero ``dst``'s number: a load that claims success without writing is caught."""
        self._head(dst).zero_()

    def check(self, got: torch.Tensor, ident: int) -> bool:
        return got.shape == self.bases[0].shape and torch.equal(got, self.make(ident))


# -- clients ---------------------------------------------------------------------------------


@dataclass
class Counters:
    items: int = 0  # offered to a store
    stored: int = 0  # acknowledged
    items_up: int = 0  # offered while a daemon was up (from its READY=1 to its stop signal)
    stored_up: int = 0
    bytes: int = 0  # of acknowledged items
    asked: int = 0  # items read back
    hits: int = 0  # read back with the right bytes
    asked_up: int = 0  # asked while a daemon was up
    hits_up: int = 0
    corrupt: int = 0  # read back "successfully" with the wrong bytes
    calls_failed: int = 0


class Client:
    """One engine-like client on its own thread: ``step()`` in a loop until the run stops."""

    name = ""

    def __init__(self, cfg: SoakConfig, sock: str, index: int) -> None:
        self.cfg, self.sock, self.index = cfg, sock, index
        self.daemon_up: Callable[[], bool] = lambda: True
        self.rng = random.Random(cfg.seed * 100 + index)
        self.lock = threading.Lock()
        self.c = Counters()
        self.failures: collections.Counter[str] = collections.Counter()  # documented failures, by kind
        self.escaped: list[dict[str, Any]] = []  # exceptions out of an adapter call
        self.escaped_n = 0
        self.hung: list[dict[str, Any]] = []
        self.store_ok_at: list[float] = []  # monotonic instants of acknowledged stores
        self.failed_at: float = 0.0  # the last failed call
        self.last_failure = ""  # what the engine saw of it
        self.inflight: tuple[str, float] | None = None  # (call, since)
        self.flagged: set[float] = set()
        self.window: collections.deque[list[int]] = collections.deque(maxlen=self._window_batches())
        self.next_ident = 0
        self.thread: threading.Thread | None = None
        self.died: str | None = None

    def _window_batches(self) -> int:
        """Batches read back from: half of this client's share of the tiers (the caches share equally)."""
        share = (self.cfg.capacity - self.cfg.durable_quota) / len(CACHES)
        return max(1, int(share / 2 / (self.cfg.batch * self.cfg.item)))

    # the calls, watched

    def call(self, what: str, fn: Callable[[], Any], *, adapter: bool, watch: bool = True) -> tuple[bool, Any]:
        """Run one call into the adapter; (True, its result), or (False, the exception) counted:
        any exception escaping an engine adapter, and anything but tierd's documented errors
        from the tierd API, is an error raised into the engine. ``watch``: the client's thread
        makes the call (the sampler's health questions are not watched for hangs)."""
        if watch:
            self.inflight = (what, time.monotonic())
        try:
            return True, fn()
        except Exception as exc:  # noqa: BLE001 - everything an engine would see is counted
            if not adapter and isinstance(exc, DOCUMENTED):
                self.note_failure(type(exc).__name__, f"{what} raised {type(exc).__name__}: {exc}")
            else:
                self.note_escaped(what, exc)
            return False, exc
        finally:
            if watch:
                self.inflight = None

    def note_failure(self, kind: str, note: str) -> None:
        with self.lock:
            self.failures[kind] += 1
            self.c.calls_failed += 1
            self.failed_at = time.monotonic()
            self.last_failure = note

    def note_escaped(self, what: str, exc: BaseException) -> None:
        with self.lock:
            self.escaped_n += 1
            self.c.calls_failed += 1
            self.failed_at = time.monotonic()
            self.last_failure = f"{what} raised {type(exc).__name__}: {exc}"
            if len(self.escaped) < 20:
                frames = traceback.extract_tb(exc.__traceback__)
                where = f"{frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}" if frames else "?"
                self.escaped.append({"t": time.monotonic(), "call": what, "error": f"{type(exc).__name__}: {exc}",
                                     "where": where})

    def note_hung(self, what: str, since: float) -> None:
        with self.lock:
            if since in self.flagged:
                return
            self.flagged.add(since)
            self.hung.append({"call": what, "since": since})

    def stored(self, offered: int, ok: int, note: str = "") -> None:
        """A store call's outcome; ``note``: what the engine saw when it failed (without an exception)."""
        up = self.daemon_up()
        with self.lock:
            self.c.items += offered
            self.c.stored += ok
            if up:
                self.c.items_up += offered
                self.c.stored_up += ok
            self.c.bytes += ok * self.cfg.item
            if ok:
                self.store_ok_at.append(time.monotonic())
            if ok < offered:
                self.failed_at = time.monotonic()
                if note:
                    self.last_failure = note

    def read(self, asked: int, hits: int, corrupt: int) -> None:
        up = self.daemon_up()
        with self.lock:
            self.c.asked += asked
            self.c.hits += hits
            self.c.corrupt += corrupt
            if up:
                self.c.asked_up += asked
                self.c.hits_up += hits

    def snapshot(self) -> Counters:
        with self.lock:
            return Counters(**asdict(self.c))

    def idents(self) -> list[int]:
        out = list(range(self.next_ident, self.next_ident + self.cfg.batch))
        self.next_ident += self.cfg.batch
        return out

    def earlier(self) -> list[int] | None:
        return self.rng.choice(self.window) if self.window else None

    # the loop

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                if not self.step():
                    stop.wait(self.cfg.retry_s)
        except BaseException as exc:  # noqa: BLE001 - the bench's own bug: reported, the run goes on
            self.died = "".join(traceback.format_exception(exc))

    def step(self) -> bool:
        """One store and one read; False when a call failed."""
        raise NotImplementedError

    def health(self) -> bool | None:
        """What the client reports about the daemon's health, where it reports any."""
        return None

    def close(self) -> None:
        pass


class LMCacheClient(Client):
    name = "lmcache"

    def __init__(self, cfg: SoakConfig, sock: str, index: int) -> None:
        super().__init__(cfg, sock, index)
        from lmcache.v1.distributed.api import ObjectKey
        from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj
        from lmcache.v1.platform.event_notifier import consume_fd

        from bench.engines import _lmcache_adapter

        self._key_type, self._consume = ObjectKey, consume_fd
        plugin = {"type": "native_plugin", "module_path": "tierd.integrations.lmcache", "class_name": "TierdConnector",
                  "adapter_params": {"socket": sock}}
        self.adapter = _lmcache_adapter(plugin)
        tokens = cfg.item // (2 * _HEADS * _DIM * 2)
        shape = (2, tokens, _HEADS, _DIM)
        self.pattern = Pattern((cfg.item // 2,), seed=cfg.seed * 100 + index)

        def obj() -> Any:
            data = torch.zeros(cfg.item, dtype=torch.uint8)
            meta = MemoryObjMetadata(shape=torch.Size(shape), dtype=torch.bfloat16, address=0, phy_size=cfg.item,
                                     ref_count=1)
            return TensorMemoryObj(data, meta, None)

        self.src = [obj() for _ in range(cfg.batch)]
        self.dst = [obj() for _ in range(cfg.batch)]

    def _keys(self, idents: list[int]) -> list[Any]:
        return [self._key_type(chunk_hash=i.to_bytes(16, "little"), model_name="soak/toy-model", kv_rank=0)
                for i in idents]

    def _wait(self, what: str, fd_of: Callable[[], int], poll: Callable[[], Any]) -> Any:
        """Wait on the adapter's eventfd as LMCache's controllers do (poll it, consume it, ask for
        results); None if nothing completed within the call timeout (counted as hung)."""
        since = time.monotonic()
        self.inflight = (what, since)
        try:
            fd = fd_of()
            while True:
                result = poll()
                if result is not None:
                    return result
                left = since + self.cfg.call_timeout_s - time.monotonic()
                if left <= 0:
                    self.note_hung(what, since)
                    return None
                readable, _, _ = select.select([fd], [], [], min(left, 1.0))
                if readable:
                    self._consume(fd)
        finally:
            self.inflight = None

    def step(self) -> bool:
        a = self.adapter
        idents = self.idents()
        keys = self._keys(idents)
        for obj, ident in zip(self.src, idents, strict=True):
            self.pattern.fill(obj.raw_data.view(torch.int16), ident)
        ok, task = self.call("submit_store_task", lambda: a.submit_store_task(keys, self.src), adapter=True)
        if not ok:
            self.stored(len(keys), 0)
            self._read()
            return False
        done: dict[Any, Any] = {}

        def popped() -> Any:
            ok, got = self.call("pop_completed_store_tasks", a.pop_completed_store_tasks, adapter=True, watch=False)
            if ok:
                done.update(got)
            return done.get(task)

        result = self._wait("store completion", a.get_store_event_fd, popped)
        landed = result is not None and int(result) >= 0
        self.stored(len(keys), len(keys) if landed else 0,
                    note=f"a store of {len(keys)} chunks completed with "
                         + ("nothing (no completion)" if result is None else f"L2StoreResult {int(result)}"))
        if landed:
            self.window.append(idents)
        read_ok = self._read()
        return landed and read_ok

    def _read(self) -> bool:
        a = self.adapter
        idents = self.earlier()
        if idents is None:
            return True
        keys = self._keys(idents)
        ok, task = self.call("submit_lookup_and_lock_task", lambda: a.submit_lookup_and_lock_task(keys, {}),
                             adapter=True)
        if not ok:
            self.read(len(keys), 0, 0)
            return False
        bitmap = self._wait("lookup completion", a.get_lookup_and_lock_event_fd,
                            lambda: self.call("query_lookup_and_lock_result",
                                              lambda: a.query_lookup_and_lock_result(task), adapter=True,
                                              watch=False)[1])
        found = [] if bitmap is None or isinstance(bitmap, BaseException) else sorted(bitmap.get_indices_list())
        hits = corrupt = 0
        if found:
            fkeys = [keys[i] for i in found]
            objs = self.dst[: len(found)]
            for o in objs:
                self.pattern.clear(o.raw_data.view(torch.int16))
            ok, task = self.call("submit_load_task", lambda: a.submit_load_task(fkeys, objs), adapter=True)
            if ok:
                loaded = self._wait("load completion", a.get_load_event_fd,
                                    lambda: self.call("query_load_result", lambda: a.query_load_result(task),
                                                      adapter=True, watch=False)[1])
                if loaded is not None and not isinstance(loaded, BaseException):
                    for j in loaded.get_indices_list():
                        if self.pattern.check(objs[j].raw_data.view(torch.int16), idents[found[j]]):
                            hits += 1
                        else:
                            corrupt += 1
            self.call("submit_unlock", lambda: a.submit_unlock(fkeys), adapter=True)
        self.read(len(keys), hits, corrupt)
        return True

    def health(self) -> bool | None:
        ok, status = self.call("report_status", self.adapter.report_status, adapter=True, watch=False)
        return bool(status.get("is_healthy")) if ok else None

    def close(self) -> None:
        self.call("close", self.adapter.close, adapter=True)


def _bools(res: list[Any]) -> str:
    """[False x 8], [True x 6, False x 2]: a batch's per-item answers, run-length."""
    runs: list[list[Any]] = []
    for x in res:
        if runs and runs[-1][0] == bool(x):
            runs[-1][1] += 1
        else:
            runs.append([bool(x), 1])
    return "[" + ", ".join(f"{v} x {n}" for v, n in runs) + "]"


class _HostPool:
    """SGLang's MHA host pool, page_first (pool_host/mha.py's buffer and page views), as
    tests/test_integration_sglang.py's: SGLang's own pool modules need its GPU runtime."""

    layout, dtype = "page_first", torch.bfloat16

    def __init__(self, pages: int, page_size: int) -> None:
        self.page_size, self.size = page_size, pages * page_size
        self.kv_buffer = torch.zeros(2, self.size, _LAYERS, _HEADS, _DIM, dtype=self.dtype)

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[:, index : index + self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2 * self.page_size * _LAYERS * _HEADS * _DIM, dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        page = self.get_data_page(index, flat=False)
        page.copy_(data_page.reshape(page.shape))

    def page16(self, slot: int) -> torch.Tensor:
        return self.kv_buffer[:, slot * self.page_size : (slot + 1) * self.page_size].view(torch.int16)


class SGLangClient(Client):
    name = "sglang"

    def __init__(self, cfg: SoakConfig, sock: str, index: int) -> None:
        super().__init__(cfg, sock, index)
        from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig
        from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory

        page = cfg.item // _TOKEN_BYTES
        self.pool = _HostPool(2 * cfg.batch, page)  # slots 0..batch-1 written, batch..2*batch-1 read into
        extra = {"backend_name": "tierd", "interface_v1": 1, "module_path": "tierd.integrations.sglang",
                 "class_name": "TierdHiCacheStorage", "socket": sock}
        config = HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                      is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                      model_name="soak/toy-model", extra_config=extra)
        self.backend = StorageBackendFactory.create_backend("dynamic", config, self.pool)
        self.backend.register_mem_pool_host(self.pool)
        self.pattern = Pattern(tuple(self.pool.page16(0).shape), seed=cfg.seed * 100 + index)

    def _indices(self, first_slot: int, n: int) -> torch.Tensor:
        p = self.pool.page_size
        return torch.arange(first_slot * p, (first_slot + n) * p, dtype=torch.int64)

    @staticmethod
    def _keys(idents: list[int]) -> list[str]:
        return [f"{i:064x}" for i in idents]  # SGLang's page hashes: hex digests

    def step(self) -> bool:
        b = self.backend
        idents = self.idents()
        for slot, ident in enumerate(idents):
            self.pattern.fill(self.pool.page16(slot), ident)
        keys = self._keys(idents)
        ok, res = self.call("batch_set_v1", lambda: b.batch_set_v1(keys, self._indices(0, len(keys))), adapter=True)
        stored = sum(bool(x) for x in res) if ok else 0
        self.stored(len(keys), stored, note=f"batch_set_v1 of {len(keys)} pages returned {_bools(res)}" if ok else "")
        if ok and stored == len(keys):
            self.window.append(idents)
        read_ok = self._read()
        return ok and stored == len(keys) and read_ok

    def _read(self) -> bool:
        b = self.backend
        idents = self.earlier()
        if idents is None:
            return True
        keys = self._keys(idents)
        ok, n = self.call("batch_exists", lambda: b.batch_exists(keys), adapter=True)
        if not ok:
            self.read(len(keys), 0, 0)
            return False
        hits = corrupt = 0
        if n:
            first = self.cfg.batch
            for j in range(n):
                self.pattern.clear(self.pool.page16(first + j))
            ok, got = self.call("batch_get_v1", lambda: b.batch_get_v1(keys[:n], self._indices(first, n)),
                                adapter=True)
            for j in range(n if ok else 0):
                if got[j]:
                    if self.pattern.check(self.pool.page16(first + j), idents[j]):
                        hits += 1
                    else:
                        corrupt += 1
        self.read(len(keys), hits, corrupt)
        return True

    def close(self) -> None:
        self.call("close", self.backend.close, adapter=True)


class PrefixKVClient(Client):
    name = "kv"

    def __init__(self, cfg: SoakConfig, sock: str, index: int) -> None:
        super().__init__(cfg, sock, index)
        self.store = tierd.connect(sock)
        self.block = cfg.item // _TOKEN_BYTES
        self.kv = tierd.PrefixKVStore(self.store, model="soak/toy-model", block_tokens=self.block)
        self.pattern = Pattern((_LAYERS, 2, self.block, _HEADS, _DIM), seed=cfg.seed * 100 + index)
        self.buf = torch.empty(_LAYERS, 2, self.block * cfg.batch, _HEADS, _DIM, dtype=torch.bfloat16)

    def _tokens(self, idents: list[int]) -> torch.Tensor:
        """A conversation of ``batch`` blocks, its own (the first block's number starts its tokens)."""
        return torch.arange(len(idents) * self.block, dtype=torch.int64) + idents[0] * self.block

    def _block(self, t: torch.Tensor, j: int) -> torch.Tensor:
        return t[:, :, j * self.block : (j + 1) * self.block].view(torch.int16)

    def step(self) -> bool:
        idents = self.idents()
        for j, ident in enumerate(idents):
            self.pattern.fill(self._block(self.buf, j), ident)
        tokens = self._tokens(idents)
        ok, _ = self.call("PrefixKVStore.put", lambda: self.kv.put(tokens, self.buf), adapter=False)
        self.stored(len(idents), len(idents) if ok else 0)
        if ok:
            self.window.append(idents)
        read_ok = self._read()
        return ok and read_ok

    def _read(self) -> bool:
        idents = self.earlier()
        if idents is None:
            return True
        ok, got = self.call("PrefixKVStore.get", lambda: self.kv.get(self._tokens(idents)), adapter=False)
        hits = corrupt = 0
        if ok:
            for j in range(got.shape[2] // self.block):
                if self.pattern.check(self._block(got, j), idents[j]):
                    hits += 1
                else:
                    corrupt += 1
        self.read(len(idents), hits, corrupt)
        return ok

    def health(self) -> bool | None:
        ok, healthy = self.call("Store.healthy", self.store.healthy, adapter=True, watch=False)  # never raises
        return bool(healthy) if ok else None

    def close(self) -> None:
        self.call("PrefixKVStore.close", self.kv.close, adapter=False)
        self.call("Store.close", self.store.close, adapter=False)


class DurableClient(Client):
    """A checkpoint writer: one durable object a call, never an unacknowledged key reused; the
    oldest acknowledged keys deleted to stay under the quota."""

    name = "durable"

    def __init__(self, cfg: SoakConfig, sock: str, index: int) -> None:
        super().__init__(cfg, sock, index)
        self.store = tierd.connect(sock)
        self.pattern = Pattern((cfg.item // 128, 64), seed=cfg.seed * 100 + index)
        self.ledger: collections.OrderedDict[str, int] = collections.OrderedDict()  # acknowledged key -> ident
        self.unsure: set[str] = set()  # puts or deletes whose answer never came: may or may not be stored
        self.ledger_lock = threading.Lock()  # a check reads the ledger while nothing changes it
        self.acknowledged = 0
        self.deleted = 0

    @staticmethod
    def key(ident: int) -> str:
        return f"ckpt/soak/{ident:010d}"

    def step(self) -> bool:
        with self.ledger_lock:
            trimmed = self._trim()  # failed: the put is still tried (the quota guard holds twice this much)
            ident = self.idents()[0]
            key = self.key(ident)
            value = self.pattern.make(ident)
            ok, _ = self.call("Store.put(durable=True)", lambda: self.store.put(key, value, durable=True),
                              adapter=False)
            self.stored(1, 1 if ok else 0)
            if ok:
                self.ledger[key] = ident
                self.acknowledged += 1
            else:
                self.unsure.add(key)
            return ok and trimmed

    def idents(self) -> list[int]:
        ident = self.next_ident
        self.next_ident += 1
        return [ident]

    def _trim(self) -> bool:
        """Delete the oldest acknowledged keys (and unanswered ones) over the quota."""
        over = len(self.ledger) + 1 - max(1, self.cfg.durable_quota // self.cfg.item)
        victims = [*self.unsure, *list(self.ledger)[: max(0, over)]]
        if not victims:
            return True
        ok, res = self.call("Store.delete_many", lambda: self.store.delete_many(victims), adapter=False)
        if not ok:
            for key in victims:  # perhaps deleted: no longer checked
                self.unsure.add(key)
                self.ledger.pop(key, None)
            return False
        for key in victims:
            self.unsure.discard(key)
            if self.ledger.pop(key, None) is not None:
                self.deleted += 1
        return True

    def close(self) -> None:
        self.call("Store.close", self.store.close, adapter=False)


# -- the daemon ----------------------------------------------------------------------------


class SoakDaemon:
    """``tierd serve`` on one socket and one nvme directory, stopped and started again."""

    def __init__(self, cfg: SoakConfig, workdir: Path) -> None:
        from tierd.daemon.launch import spawn

        self._spawn = spawn
        self.run_dir = Path(tempfile.mkdtemp(prefix="tierd-soak-", dir="/tmp"))  # AF_UNIX paths are short
        self.socket = str(self.run_dir / "tierd.sock")
        nvme = workdir / "nvme"
        nvme.mkdir(parents=True, exist_ok=True)
        self.config = self.run_dir / "tierd.toml"
        self.config.write_text(
            f'[tiers.host]\nsize = {cfg.host}\n'
            f'[tiers.nvme]\npath = "{nvme}"\nsize = {cfg.nvme}\nslab_size = {min(cfg.nvme, 64 * MIB)}\n'
            f'chunk_size = {MIB}\n'
            f'[daemon]\nsocket = "{self.socket}"\nmetrics = ""\ndrain_timeout_s = 10.0\n'
            # A guard: the writer stays under durable_quota; unanswered puts may hold as much again.
            f'[namespaces.ckpt]\nquota = {2 * cfg.durable_quota}\n')
        self.log_path = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it; the monotonic instant it sent READY=1 (it accepts connections from then on)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TIERD_")}
        with open(self.log_path, "ab") as log:
            try:
                self.proc = self._spawn(self.config, env=env, log=log)
            except tierd.DaemonUnavailable as exc:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise tierd.DaemonUnavailable(f"{exc}; its log ends:\n{tail}") from None
        return time.monotonic()

    def stop(self, sig: int) -> int | None:
        """Send ``sig`` and wait for the exit; its code (a drain longer than its timeout is killed)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=60)
            return None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop(signal.SIGTERM)
        shutil.rmtree(self.run_dir, ignore_errors=True)


# -- the run -------------------------------------------------------------------------------


class _Progress:
    """rich.progress when given one; nothing otherwise."""

    def __init__(self, progress: Any, total: int) -> None:
        self.progress = progress
        self.task = progress.add_task("soak: MiB stored (4 restarts)", total=total // MIB) if progress else None

    def update(self, done: int, what: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=done // MIB, description=f"soak: {what}")


class Soak:
    def __init__(self, cfg: SoakConfig, workdir: Path, progress: Any = None) -> None:
        self.cfg, self.workdir = cfg, workdir
        self.daemon = SoakDaemon(cfg, workdir)
        self.stop = threading.Event()
        self.t0 = 0.0
        self.clients: list[Client] = []
        self.intervals: list[dict[str, Any]] = []
        self.restarts: list[dict[str, Any]] = []
        self.checks: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []  # stops and starts, for the plot
        self.changed = threading.Condition()
        self.progress = _Progress(progress, int(cfg.multiple * cfg.capacity))
        self.not_run: dict[str, str] = {}
        self.final_tiers: dict[str, Any] | None = None
        self.state = "starting"  # the daemon: starting, up, stopping (signalled), down
        self.logs = _LogLines(self.rel)

    def rel(self, t: float | None) -> float | None:
        return None if t is None else round(t - self.t0, 3)

    def total_bytes(self) -> int:
        return sum(c.snapshot().bytes for c in self.clients)

    # clients

    def _kinds(self) -> list[type[Client]]:
        """The clients to run; the engines' modules imported now, before the daemon starts (seconds)."""
        kinds: list[type[Client]] = []
        if self.cfg.engines:
            for cls, module in ((LMCacheClient, "lmcache"), (SGLangClient, "sglang")):
                if installed(module):
                    kinds.append(cls)
                else:
                    self.not_run[cls.name] = f"{module} is not installed (bash .ci/engines)"
        else:
            self.not_run.update({n: "left out (engines=False)" for n in ("lmcache", "sglang")})
        if LMCacheClient in kinds:
            import lmcache.v1.distributed.l2_adapters.native_plugin_l2_adapter  # noqa: F401
            import lmcache.v1.memory_management  # noqa: F401
        if SGLangClient in kinds:
            import sglang.srt.mem_cache.storage.backend_factory  # noqa: F401
        return [*kinds, PrefixKVClient, DurableClient]

    def _make_clients(self, kinds: list[type[Client]]) -> None:
        self.clients = [cls(self.cfg, self.daemon.socket, i) for i, cls in enumerate(kinds)]
        for c in self.clients:
            c.daemon_up = lambda: self.state == "up"

    def _durable(self) -> DurableClient:
        return next(c for c in self.clients if isinstance(c, DurableClient))

    # sampling

    def _sampler(self) -> None:
        last = {c.name: Counters() for c in self.clients}
        proc: psutil.Process | None = None
        next_at = time.monotonic() + self.cfg.interval_s
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self.cfg.interval_s
            row_: dict[str, Any] = {"t": self.rel(time.monotonic()), "state": self.state, "up": False,
                                    "rss_mib": None, "fds": None,
                                    "store_ok": {}, "stored": {}, "hit": {}, "health": {}, "escaped": 0, "hung": 0}
            pid = self.daemon.pid
            if pid is not None:
                try:
                    if proc is None or proc.pid != pid:
                        proc = psutil.Process(pid)
                    if proc.status() != psutil.STATUS_ZOMBIE:  # killed, not reaped yet
                        row_.update(up=True, rss_mib=round(proc.memory_info().rss / MIB, 1), fds=proc.num_fds())
                except psutil.Error:
                    proc = None
            now = time.monotonic()
            for c in self.clients:
                snap, before = c.snapshot(), last[c.name]
                last[c.name] = snap
                items = snap.items - before.items
                row_["store_ok"][c.name] = round((snap.stored - before.stored) / items, 3) if items else None
                row_["stored"][c.name] = snap.stored - before.stored
                asked = snap.asked - before.asked
                if c.name in CACHES:
                    row_["hit"][c.name] = round((snap.hits - before.hits) / asked, 3) if asked else None
                health = c.health()
                if health is not None:
                    row_["health"][c.name] = health
                inflight = c.inflight
                if inflight is not None and now - inflight[1] > self.cfg.call_timeout_s:
                    c.note_hung(inflight[0], inflight[1])
            row_["escaped"] = sum(c.escaped_n for c in self.clients)
            row_["hung"] = sum(len(c.hung) for c in self.clients)
            self.intervals.append(row_)
            total = self.total_bytes()
            self.progress.update(total, f"{total / self.cfg.capacity:.1f}x of the tiers stored, "
                                        f"{len(self.restarts)} of {len(RESTARTS)} restarts")
            with self.changed:
                self.changed.notify_all()

    def _wait_for(self, cond: Callable[[], bool], timeout_s: float) -> bool:
        """Until ``cond()`` holds, looked at every 20 ms (the clients' own instants are what is reported)."""
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not cond():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(min(left, 0.02))
        return True

    # durable check

    def check_durable(self, when: str) -> dict[str, Any]:
        """Read back every acknowledged durable put and compare its bytes (the writer waits)."""
        w = self._durable()
        out: dict[str, Any] = {"when": when, "t": self.rel(time.monotonic()), "checked": 0, "lost": 0, "corrupt": 0,
                               "unreadable": 0, "lost_keys": []}
        with w.ledger_lock:
            ledger = list(w.ledger.items())
            out["checked"] = len(ledger)
            try:
                store = tierd.connect(self.daemon.socket)
            except tierd.DaemonUnavailable as exc:
                out["unreadable"] = len(ledger)
                out["error"] = str(exc)
                return out
            try:
                for at in range(0, len(ledger), 32):
                    part = ledger[at : at + 32]
                    got = store.get_many([k for k, _ in part])
                    for (key, ident), value in zip(part, got, strict=True):
                        if value is None:
                            err = got.errors.get(key)
                            if err is None or isinstance(err, tierd.NotFound):
                                out["lost"] += 1
                                out["lost_keys"].append(key)
                            else:
                                out["unreadable"] += 1
                                out.setdefault("error", f"{type(err).__name__}: {err}")
                        elif not w.pattern.check(value, ident):
                            out["corrupt"] += 1
                            out["lost_keys"].append(key)
            except tierd.TierdError as exc:
                out["unreadable"] = out["checked"] - out["lost"] - out["corrupt"]
                out["error"] = f"{type(exc).__name__}: {exc}"
            finally:
                store.close()
        out["lost_keys"] = out["lost_keys"][:20]
        self.checks.append(out)
        return out

    def tier_stats(self) -> dict[str, Any] | None:
        """The daemon's tiers now (counters since it started): used, capacity, cache objects dropped."""
        try:
            with tierd.connect(self.daemon.socket) as store:
                stats = store.stats()
        except tierd.TierdError:
            return None
        return {name: {"used_mib": round(t.used_bytes / MIB, 1), "capacity_mib": round(t.capacity_bytes / MIB, 1),
                       "evicted": t.evicted, "evicted_mib": round(t.evicted_bytes / MIB, 1)}
                for name, t in stats.tiers.items()}

    # restarts

    def restart(self, n: int, sig: int) -> None:
        name = signal.Signals(sig).name
        rec: dict[str, Any] = {"n": n, "signal": name, "tiers_before": self.tier_stats()}
        t_stop = time.monotonic()
        rec["at_s"] = self.rel(t_stop)
        self.events.append({"kind": "stop", "signal": name, "t": self.rel(t_stop)})
        self.state = "stopping"
        rec["exit_code"] = self.daemon.stop(sig)
        t_exit = time.monotonic()
        self.state = "down"
        self.events.append({"kind": "exit", "t": self.rel(t_exit)})
        rec["stop_s"] = round(t_exit - t_stop, 3)
        # Down until every client has seen it (a failed call), and at least min_down_s.
        seen = self._wait_for(lambda: all(c.failed_at > t_exit for c in self.clients), 15.0)
        rec["every_client_failed_while_down"] = seen
        rec["failed_while_down"] = {c.name: c.failed_at > t_exit for c in self.clients}
        rec["seen_while_down"] = {c.name: c.last_failure for c in self.clients if c.failed_at > t_exit}
        left = t_exit + self.cfg.min_down_s - time.monotonic()
        if left > 0:
            self.stop.wait(left)
        before = {c.name: len(c.store_ok_at) for c in self.clients}
        self.state = "starting"
        ready = self.daemon.start()
        self.state = "up"
        rec["down_s"] = round(ready - t_exit, 3)
        rec["ready_at_s"] = self.rel(ready)
        self.events.append({"kind": "ready", "t": self.rel(ready)})

        def first_after(c: Client) -> float | None:
            with c.lock:
                later = [t for t in c.store_ok_at[before[c.name]:] if t >= ready]
            return later[0] if later else None

        self._wait_for(lambda: all(first_after(c) is not None for c in self.clients), self.cfg.recover_cap_s)
        rec["first_store_s"] = {c.name: None if (t := first_after(c)) is None else round(t - ready, 3)
                                for c in self.clients}
        check = self.check_durable(f"after restart {n} ({name})")
        rec["durable"] = {k: check[k] for k in ("checked", "lost", "corrupt", "unreadable")}
        self.restarts.append(rec)

    # the whole run

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        target = int(cfg.multiple * cfg.capacity)
        points = [target * (i + 1) // (len(RESTARTS) + 1) for i in range(len(RESTARTS))]
        started = time.monotonic()
        kinds = self._kinds()
        self.t0 = self.daemon.start()  # times are from the first daemon's READY=1
        self.state = "up"
        self.events.append({"kind": "ready", "t": 0.0})
        threads: list[threading.Thread] = []
        self.logs.attach()
        try:
            self._make_clients(kinds)
            for c in self.clients:
                c.thread = threading.Thread(target=c.run, args=(self.stop,), name=f"soak-{c.name}", daemon=True)
                threads.append(c.thread)
            sampler = threading.Thread(target=self._sampler, name="soak-sampler", daemon=True)
            for t in [*threads, sampler]:
                t.start()
            restarted = 0
            deadline = self.t0 + cfg.max_s
            while True:
                now = time.monotonic()
                total = self.total_bytes()
                if restarted < len(RESTARTS):
                    due_at = self.t0 + cfg.max_s * (restarted + 1) / (len(RESTARTS) + 1)
                    if total >= points[restarted] or now >= due_at:
                        restarted += 1
                        self.restart(restarted, RESTARTS[restarted - 1])
                        continue
                elif total >= target:
                    break
                if now >= deadline:
                    break
                self._wait_for(lambda: False, 0.05)
            self.stop.set()
            self.final_tiers = self.tier_stats()
            for t in threads:
                t.join(timeout=cfg.call_timeout_s + 5)
            sampler.join(timeout=10)
            still = [c.name for c in self.clients if c.thread is not None and c.thread.is_alive()]
            for c in self.clients:
                if c.name not in still:
                    c.close()
            final = self.check_durable("at the end")
            stored = self.total_bytes()
            self.progress.update(stored, f"{stored / cfg.capacity:.1f}x of the tiers stored, "
                                         f"{len(self.restarts)} of {len(RESTARTS)} restarts")
        finally:
            self.stop.set()
            self.daemon.close()
            self.logs.detach()
        return self._result(target, stored, final, still, time.monotonic() - started)

    def _result(self, target: int, stored: int, final: dict[str, Any], still: list[str], seconds: float,
                ) -> dict[str, Any]:
        cfg = self.cfg
        clients: dict[str, Any] = {}
        for c in self.clients:
            s = c.snapshot()
            clients[c.name] = {
                **asdict(s), "store_ok": round(s.stored / s.items, 4) if s.items else None,
                "hit": round(s.hits / s.asked, 4) if s.asked else None, "escaped": c.escaped_n,
                "escaped_samples": [dict(e, t=self.rel(e["t"])) for e in c.escaped],
                "hung": [{"call": h["call"], "since": self.rel(h["since"])} for h in c.hung] + (
                    [{"call": "its thread never stopped", "since": None}] if c.name in still else []),
                "store_ok_up": round(s.stored_up / s.items_up, 4) if s.items_up else None,
                "hit_up": round(s.hits_up / s.asked_up, 4) if s.asked_up else None,
                "failures": dict(c.failures), "died": c.died}
        w = self._durable()
        lost = sum(ch["lost"] + ch["corrupt"] for ch in self.checks)
        firsts = {c.name: [r["first_store_s"][c.name] for r in self.restarts] for c in self.clients}
        return {
            "config": asdict(cfg), "capacity_bytes": cfg.capacity, "target_bytes": target, "stored_bytes": stored,
            "multiple": round(stored / cfg.capacity, 2), "seconds": round(seconds, 1), "clients": clients,
            "not_run": self.not_run, "logs": self.logs.result(), "restarts": self.restarts,
            "intervals": self.intervals, "events": self.events, "tiers_at_end": self.final_tiers,
            "durable": {"acknowledged": w.acknowledged, "deleted": w.deleted, "held_at_end": final["checked"],
                        "checks": self.checks, "lost": lost},
            "summary": {"escaped": sum(c.escaped_n for c in self.clients),
                        "hung": sum(len(v["hung"]) for v in clients.values()),
                        "corrupt_reads": sum(v["corrupt"] for v in clients.values()),
                        "durable_lost": lost, "restarts": len(self.restarts),
                        "served_after_every_restart": {n: len(v) == len(RESTARTS) and all(x is not None for x in v)
                                                       for n, v in firsts.items()},
                        "worst_first_store_s": {n: max((x for x in v if x is not None), default=None)
                                                for n, v in firsts.items()},
                        "health": _health(self.intervals),
                        "rss_mib": _ends([r["rss_mib"] for r in self.intervals]),
                        "fds": _ends([r["fds"] for r in self.intervals])},
        }


class _LogLines:
    """What tierd and the engines log in this process during the run (what an operator would see
    of the restarts): counted by logger and level, the first lines of each kept; not printed."""

    def __init__(self, rel: Callable[[float], float | None]) -> None:
        import logging

        self.rel = rel
        self.counts: collections.Counter[str] = collections.Counter()
        self.first: dict[str, list[str]] = {}
        outer = self

        class Handler(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                key = f"{record.name} {record.levelname}"
                outer.counts[key] += 1
                lines = outer.first.setdefault(key, [])
                if len(lines) < 6:
                    lines.append(f"{outer.rel(record.created - time.time() + time.monotonic()):.2f} s: "
                                 f"{record.getMessage()[:300]}")

        self.handler = Handler(logging.WARNING)
        self.loggers = [logging.getLogger(n) for n in ("tierd", "lmcache", "sglang")]
        self.saved: list[tuple[bool, int]] = []

    def attach(self) -> None:
        import logging

        for lg in self.loggers:
            self.saved.append((lg.propagate, lg.level))
            lg.addHandler(self.handler)
            lg.propagate = False
            if lg.getEffectiveLevel() > logging.WARNING or lg.level == logging.NOTSET:
                lg.setLevel(logging.WARNING)

    def detach(self) -> None:
        for lg, (propagate, level) in zip(self.loggers, self.saved, strict=False):
            lg.removeHandler(self.handler)
            lg.propagate = propagate
            lg.setLevel(level)
        self.saved = []

    def result(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "first": self.first}


def _health(intervals: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Per client that reports health: samples saying healthy while no daemon ran, and unhealthy
    while one did (a sample at an interval's end; a restart inside the interval can explain one)."""
    out: dict[str, dict[str, int]] = {}
    for r in intervals:
        for name, healthy in r["health"].items():
            h = out.setdefault(name, {"samples": 0, "healthy_while_down": 0, "unhealthy_while_up": 0})
            h["samples"] += 1
            h["healthy_while_down"] += int(healthy and not r["up"])
            h["unhealthy_while_up"] += int(not healthy and r["up"])
    return out


def _ends(values: list[Any]) -> dict[str, Any]:
    seen = [v for v in values if v is not None]
    return {"first": seen[0], "last": seen[-1], "max": max(seen)} if seen else {}


def run_soak(cfg: SoakConfig, workdir: Path, progress: Any = None) -> dict[str, Any]:
    """One soak run (the bench's and the test's); ``workdir`` holds the nvme tier and the daemon's log."""
    return Soak(cfg, workdir, progress).run()


# -- the suite ------------------------------------------------------------------------------


def _config(ctx: BenchContext) -> SoakConfig:
    if ctx.smoke:
        cfg = SoakConfig.short()
    elif ctx.quick:
        cfg = SoakConfig(host=16 * MIB, nvme=64 * MIB, item=128 << 10, interval_s=0.5, min_down_s=0.5)
    else:
        cfg = SoakConfig()
    o = ctx.options
    for opt, attr, scale in (("host_mib", "host", MIB), ("nvme_mib", "nvme", MIB), ("item_kib", "item", 1024)):
        if o.get(opt) is not None:
            setattr(cfg, attr, int(o[opt]) * scale)
    for opt in ("multiple", "interval_s", "min_down_s", "max_s"):
        if o.get(opt) is not None:
            setattr(cfg, opt, float(o[opt]))
    if cfg.multiple < 10:
        raise tierd.InvalidArgument(f"--multiple must be at least 10 (times the tiers' capacity), got {cfg.multiple}")
    return cfg


def run(ctx: BenchContext) -> dict[str, Any]:
    cfg = _config(ctx)
    res = run_soak(cfg, ctx.workdir, ctx.progress)
    for table in _tables(res):
        ctx.console.print(table)
    return res


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}"


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f}"


def _short(name: str) -> str:
    return {"lmcache": "lmc", "sglang": "sgl", "kv": "kv", "durable": "dur"}[name]


def _interval_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = list(res["clients"])
    caches = [n for n in names if n in CACHES]
    header = ["t s", "daemon", *(f"ok%\n{_short(n)}" for n in names), *(f"hit%\n{_short(n)}" for n in caches),
              "RSS\nMiB", "fds", "err"]
    marks = _marks(res)
    rows = []
    for r in res["intervals"]:
        seen = []
        while marks and marks[0][0] <= r["t"]:
            seen.append(marks.pop(0)[1])
        state = ",".join(seen) or {"stopping": "drain", "starting": "down"}.get(r["state"], r["state"])
        rows.append([f"{r['t']:.1f}", state, *(_pct(r["store_ok"].get(n)) for n in names),
                     *(_pct(r["hit"].get(n)) for n in caches), "-" if r["rss_mib"] is None else f"{r['rss_mib']:.0f}",
                     "-" if r["fds"] is None else str(r["fds"]), str(r["escaped"] + r["hung"])])
    return header, rows


def _marks(res: dict[str, Any]) -> list[tuple[float, str]]:
    """(instant, label) of each signal and each READY=1 after the first, in order (exits unmarked)."""
    labels = {"SIGTERM": "TERM", "SIGKILL": "KILL"}
    return [(e["t"], labels[e["signal"]] if e["kind"] == "stop" else "READY") for e in res["events"][1:]
            if e["kind"] != "exit"]


def _restart_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    names = list(res["clients"])
    header = ["#", "sig", "at\ns", "MiB\ndropped", "stop\ns", "down\ns", *(f"{_short(n)}\ns" for n in names),
              "durable\nlost"]
    rows = []
    for r in res["restarts"]:
        d = r["durable"]
        tiers = r.get("tiers_before")
        dropped = "-" if tiers is None else f"{sum(t['evicted_mib'] for t in tiers.values()):.0f}"
        rows.append([str(r["n"]), r["signal"].removeprefix("SIG"), f"{r['at_s']:.1f}", dropped, f"{r['stop_s']:.2f}",
                     f"{r['down_s']:.2f}", *(_s(r["first_store_s"][n]) for n in names),
                     f"{d['lost'] + d['corrupt']}/{d['checked']}"])
    return header, rows


def _client_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["client", "MiB\nstored", "ok %", "ok %\nup", "hit %\nup", "bad", "err", "hung", "failed calls"]
    short = {"DaemonUnavailable": "away", "NotFound": "gone", "OutOfSpace": "full", "QuotaExceeded": "quota"}
    rows = []
    for name, c in res["clients"].items():
        kinds = " ".join(f"{short.get(k, k)} {v}" for k, v in sorted(c["failures"].items())) or "-"
        rows.append([name, f"{c['bytes'] / MIB:.0f}", _pct(c["store_ok"]), _pct(c["store_ok_up"]), _pct(c["hit_up"]),
                     str(c["corrupt"]), str(c["escaped"]), str(len(c["hung"])), kinds])
    return header, rows


def _rich(title: str, header: list[str], rows: list[list[str]]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 or h.startswith("failed") else "right", no_wrap=True)
    for r in rows:
        table.add_row(*r)
    return table


def _tables(res: dict[str, Any]) -> list[Any]:
    return [_rich("soak: per client", *_client_rows(res)),
            _rich("soak: restarts (READY=1 to each client's first store)", *_restart_rows(res)),
            _rich(f"soak: per {res['config']['interval_s']:g} s", *_interval_rows(res))]


def _md(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(h.replace("\n", " ") for h in header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows)]


def markdown(res: dict[str, Any]) -> str:
    cfg, s = res["config"], res["summary"]
    lines = [f"Daemon: host {cfg['host'] // MIB} MiB + nvme {cfg['nvme'] // MIB} MiB = {res['capacity_bytes'] // MIB} "
             f"MiB; {len(res['clients'])} clients ({', '.join(res['clients'])}), items of {cfg['item'] >> 10} KiB, "
             f"{cfg['batch']} a store (the durable writer 1), stored {res['stored_bytes'] / MIB:.0f} MiB = "
             f"{res['multiple']:.1f}x the tiers in {res['seconds']:.0f} s with {s['restarts']} restarts "
             "(TERM, KILL, TERM, KILL) on the same socket and nvme directory.\n"]
    for name, why in res["not_run"].items():
        lines.append(f"* {name}: not run: {why}.")
    lines += ["", "#### Goals\n", *_md(["measure", "result", "goal"], _goal_rows(res)), "",
              "#### Per client\n", *_md(*_client_rows(res)), "",
              "ok %: items stored of items offered to a store; up: while a daemon was up (READY=1 to its stop "
              "signal); hit %: items read back with the right bytes of items asked for (earlier items of the same "
              "client, from half its share of the tiers); bad: items read back with wrong bytes; err: exceptions "
              "that escaped an adapter call (for the tierd API clients, any but DaemonUnavailable, NotFound, "
              "OutOfSpace, QuotaExceeded: failed calls, by kind in the last column); hung: calls not back within "
              f"{cfg['call_timeout_s']:g} s.\n",
              "#### Restarts\n", *_md(*_restart_rows(res)), "",
              "MiB dropped: cache objects the daemon dropped from full tiers to admit new ones, since it started "
              "(its stats() before the signal); stop s: signal to exit; down s: exit to the new daemon's READY=1; lmc s .. dur s: READY=1 to that "
              "client's first acknowledged store; durable lost: acknowledged durable puts missing or different "
              "when read back after the restart / acknowledged ones held then.\n"]
    seen = [(r["n"], r["signal"], n, note) for r in res["restarts"] for n, note in r.get("seen_while_down", {}).items()]
    if seen:
        lines += ["#### What each client saw while the daemon was away (its last failed call)\n",
                  *(f"* restart {k} ({sig.removeprefix('SIG')}), {n}: {note[:240]}" for k, sig, n, note in seen), ""]
    logs = res.get("logs", {}).get("counts", {})
    if logs:
        lines += ["Log lines (WARNING and above) in the clients' process: "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(logs.items())) + ".\n"]
    lines += [f"#### Per {cfg['interval_s']:g} s\n", *_md(*_interval_rows(res)), "",
              "TERM/KILL: the daemon was signalled in that interval; drain: it was draining (SIGTERM); READY: a "
              "new daemon sent READY=1; err: errors raised into the engines and hung calls so far.\n"]
    errs = [(n, e) for n, c in res["clients"].items() for e in c["escaped_samples"]]
    if errs:
        lines += ["#### Exceptions raised into the engines (first ones)\n",
                  *(f"* {n}, `{e['call']}` at {e['t']:.1f} s: `{e['error'][:300]}` ({e['where']})"
                    for n, e in errs), ""]
    hung = [(n, h) for n, c in res["clients"].items() for h in c["hung"]]
    if hung:
        lines += ["#### Calls that never returned\n",
                  *(f"* {n}: `{h['call']}` since {h['since']} s" for n, h in hung), ""]
    return "\n".join(lines) + "\n"


def _goal_rows(res: dict[str, Any]) -> list[list[str]]:
    s = res["summary"]
    rows = [["bytes stored", f"{res['multiple']:.1f}x the tiers", ">= 10x"],
            ["exceptions raised into the engines", str(s["escaped"]), "0"],
            ["calls that never returned", str(s["hung"]), "0"],
            ["items read back with wrong bytes", str(s["corrupt_reads"]), "0"],
            ["durable objects lost", f"{s['durable_lost']} (of {res['durable']['acknowledged']} acknowledged)", "0"]]
    for name, worst in s["worst_first_store_s"].items():
        served = s["served_after_every_restart"][name]
        rows.append([f"{name}: READY=1 to first store, worst of {s['restarts']}",
                     _s(worst) + ("" if served else " (not served after every restart)"), "<= 1 s"])
    for name, h in s["health"].items():
        what = "report_status()['is_healthy']" if name == "lmcache" else "Store.healthy()"
        rows.append([f"{name}: {what} said healthy with no daemon / unhealthy with one",
                     f"{h['healthy_while_down']} / {h['unhealthy_while_up']} of {h['samples']} samples", "report"])
    end = res.get("tiers_at_end")
    if end:
        rows.append(["cache objects dropped from full tiers by the last daemon (since its start)",
                     f"{sum(t['evicted'] for t in end.values())} ({sum(t['evicted_mib'] for t in end.values()):.0f} MiB)",
                     "report"])
    rows.append(["daemon RSS MiB, first / last / max", "{first} / {last} / {max}".format(**s["rss_mib"])
                 if s["rss_mib"] else "-", "report"])
    rows.append(["daemon open fds, first / last / max", "{first} / {last} / {max}".format(**s["fds"])
                 if s["fds"] else "-", "report"])
    return rows


def headline(res: dict[str, Any], limits: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    s = res["summary"]
    rows = [row("soak: bytes stored with 4 restarts", f"{res['multiple']:.1f}x the tiers", issue=31, target=">= 10x",
                ratio=f"{res['multiple']:.1f}", status=verdict(res["multiple"] >= 10)),
            row("soak: exceptions raised into the engines", str(s["escaped"]), issue=31, target="0",
                ratio=str(s["escaped"]), status=verdict(s["escaped"] == 0)),
            row("soak: durable objects lost", str(s["durable_lost"]), issue=31, target="0",
                ratio=str(s["durable_lost"]), status=verdict(s["durable_lost"] == 0))]
    for name, worst in s["worst_first_store_s"].items():
        served = s["served_after_every_restart"][name]
        ok = served and worst is not None and worst <= 1.0
        rows.append(row(f"soak: {name} served again after READY=1 (worst)", _s(worst), issue=31, target="<= 1 s",
                        ratio=_s(worst), status=verdict(ok),
                        note="" if ok else "not served after every restart" if not served else ""))
    return rows


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None or not res["intervals"]:
        return []
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, height_ratios=[3, 2])
    ts = [r["t"] for r in res["intervals"]]
    for i, name in enumerate(res["clients"]):
        ok = [r["store_ok"].get(name) for r in res["intervals"]]
        ax1.plot(ts, [float("nan") if v is None else 100 * v for v in ok], color=f"C{i}", lw=1.3,
                 label=f"{name}: stores ok")
        if name in CACHES:
            hit = [r["hit"].get(name) for r in res["intervals"]]
            ax1.plot(ts, [float("nan") if v is None else 100 * v for v in hit], color=f"C{i}", lw=1, ls="--",
                     label=f"{name}: hit ratio")
    ax1.set(ylabel="% of items, per interval", ylim=(-3, 108),
            title=f"soak: {res['multiple']:.1f}x the tiers ({res['capacity_bytes'] // MIB} MiB) stored while the "
                  f"daemon was stopped and restarted {res['summary']['restarts']} times")
    ax1.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    rss = [float("nan") if r["rss_mib"] is None else r["rss_mib"] for r in res["intervals"]]
    fds = [float("nan") if r["fds"] is None else r["fds"] for r in res["intervals"]]
    ax2.plot(ts, rss, color="C0", label="daemon RSS (MiB)")
    ax2.set(xlabel="seconds from the first READY=1", ylabel="RSS MiB")
    ax3 = ax2.twinx()
    ax3.plot(ts, fds, color="C3", label="daemon open fds")
    ax3.set_ylabel("open fds")
    handles = ax2.get_legend_handles_labels()[0] + ax3.get_legend_handles_labels()[0]
    ax2.legend(handles, [str(h.get_label()) for h in handles], fontsize=7, loc="upper left",
               bbox_to_anchor=(1.06, 1.0))
    at: dict[str, float] = {}
    for e in res["events"][1:]:
        if e["kind"] == "stop":
            at = {"stop": e["t"]}
            for ax in (ax1, ax2):
                ax.axvline(e["t"], color="red" if e["signal"] == "SIGKILL" else "orange", lw=1.2)
            ax1.text(e["t"], 103, e["signal"].removeprefix("SIG"), fontsize=7, ha="center", va="bottom")
        elif e["kind"] == "exit":
            at["exit"] = e["t"]
        elif "stop" in at:
            for ax in (ax1, ax2):
                ax.axvspan(at["stop"], at.get("exit", at["stop"]), color="orange", alpha=0.15, lw=0)  # draining
                ax.axvspan(at.get("exit", at["stop"]), e["t"], color="gray", alpha=0.15, lw=0)  # no daemon
                ax.axvline(e["t"], color="green", lw=1, ls=":")
            ax1.text(e["t"], 103, "READY", fontsize=7, ha="center", va="bottom", color="green")
            at = {}
    return save_figure(fig, out, "soak")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "soak", argv,
                      host_mib={"type": int, "default": None, "help": "host tier MiB (default 64; --quick 16)"},
                      nvme_mib={"type": int, "default": None, "help": "nvme tier MiB (default 256; --quick 64)"},
                      item_kib={"type": int, "default": None, "help": "KiB of one chunk, page or block (default 256)"},
                      multiple={"type": float, "default": None, "help": "bytes to store, in tier capacities (>= 10)"},
                      interval_s={"type": float, "default": None, "help": "seconds a row of the report"},
                      min_down_s={"type": float, "default": None, "help": "seconds the daemon stays down at least"},
                      max_s={"type": float, "default": None, "help": "seconds the run may take at most"})


if __name__ == "__main__":
    raise SystemExit(main())
