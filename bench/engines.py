"""Serving engines' backends side by side: tierd's LMCache connector and SGLang backend against their peers.

    bash .ci/engines && python bench/engines.py [--quick] [--out DIR]

256-token chunks of a Llama-3-8B shape (32 layers x K,V x 256 tokens x 8 KV heads x
128 dims, bf16: 32 MiB a chunk), stored and loaded in batches of 8, in one run on
the same disk, every backend once a round, in alternation (issue 17):

* LMCache: the L2 adapter that LMCache's native_plugin factory builds over
  ``tierd.integrations.lmcache.TierdConnector`` (through ``tierd serve``), beside
  LMCache's own filesystem L2 adapter (``fs``, with and without O_DIRECT);
* SGLang: ``TierdHiCacheStorage`` (``batch_set_v1/batch_get_v1``, zero-copy into
  the host pool) beside SGLang's ``HiCacheFile`` (its ``batch_set_v2/batch_get_v2``
  path over the same pool);
* tierd twice each: chunks kept on its nvme tier (``tier="nvme"``) and on host.

Loads "from disk" read what the page cache does not hold: after a store the
peers' files are synced and dropped from the page cache (posix_fadvise
DONTNEED), and tierd's nvme tier reads with O_DIRECT. Beside them: fio's
O_DIRECT sequential read and write on the same disk, and memcpy for chunks on
host. Host pool: SGLang's host-pool modules need its GPU runtime, so
:class:`PagePool` reproduces ``MHATokenToKVPoolHost``'s page_first buffer and page views.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import (  # noqa: E402
    MIB,
    BenchContext,
    private_daemon,
    pyplot,
    row,
    save_figure,
    standalone,
    verdict,
)

LAYERS, HEADS, DIM, TOKENS = 32, 8, 128, 256
CHUNK_BYTES = LAYERS * 2 * TOKENS * HEADS * DIM * 2
BATCH = 8


def _drop_page_cache(directory: Path) -> None:
    """Sync ``directory``'s files and drop them from the page cache: the next read comes from the disk."""
    os.sync()
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@dataclass
class _Backend:
    """One system under test: how to store, load and delete a round's chunks, and its keys for round ``r``."""

    engine: str
    tag: str
    store: Callable[[list[Any]], None]
    load: Callable[[list[Any]], None]
    delete: Callable[[list[Any]], None]
    keys: Callable[[int], list[Any]]
    check: Callable[[], bool]
    close: Callable[[], None]
    cold: Path | None = None  # its files, dropped from the page cache before each load
    times: dict[str, list[float]] = field(default_factory=lambda: {"store": [], "one": [], "load": []})


def _rounds(backends: list[_Backend], n: int, reps: int, progress: Any) -> None:
    """``reps`` rounds after one untimed round, every backend once a round, their order rotated.

    A round stores ``n`` new chunks, loads one of them (not loaded before: a load may promote
    it), loads all, and deletes them. The untimed round touches arena pages and destinations
    once, as in an engine that has been up a while; alternating the backends round by round
    keeps the disk's drift (2x over minutes on this VM) out of their ratios.
    """
    task = progress.add_task("engines: rounds", total=(reps + 1) * len(backends))
    for rep in range(reps + 1):
        order = backends[rep % len(backends):] + backends[: rep % len(backends)]
        for b in order:
            keys = b.keys(rep)
            t_store = _timed(lambda: b.store(keys))
            if b.cold is not None:
                _drop_page_cache(b.cold)
            t_one = _timed(lambda: b.load(keys[-1:]))
            t_load = _timed(lambda: b.load(keys))
            b.delete(keys)
            if rep:
                b.times["store"].append(t_store)
                b.times["one"].append(t_one)
                b.times["load"].append(t_load)
            progress.advance(task)
    for b in backends:
        if not b.check():
            raise RuntimeError(f"{b.engine} {b.tag}: loaded chunks differ from the stored ones")


def _figures(b: _Backend, n: int) -> dict[str, float]:
    total = n * CHUNK_BYTES
    return {"store_gbs": total / statistics.median(b.times["store"]) / 1e9,
            "load_gbs": total / statistics.median(b.times["load"]) / 1e9,
            "load_chunk_ms": statistics.median(b.times["one"]) * 1e3}


# -- LMCache ---------------------------------------------------------------------------------------


def _lmcache_adapter(spec: dict[str, Any]) -> Any:
    from lmcache.v1.distributed.l2_adapters import create_l2_adapter
    from lmcache.v1.distributed.l2_adapters.config import add_l2_adapters_args, parse_args_to_l2_adapters_config

    args = add_l2_adapters_args(argparse.ArgumentParser()).parse_args(["--l2-adapter", json.dumps(spec)])
    return create_l2_adapter(parse_args_to_l2_adapters_config(args).adapters[0])


def _lmcache_objs(n: int, seed: int) -> tuple[list[Any], list[Any]]:
    """``n`` chunks as LMCache memory objects (page-aligned, like its L1 allocator's), and ``n`` empty ones."""
    from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj

    shape = torch.Size((LAYERS, 2, TOKENS, HEADS * DIM))

    def obj(fill: bool) -> Any:
        raw = torch.empty(CHUNK_BYTES + 4096, dtype=torch.uint8)
        start = (-raw.data_ptr()) % 4096
        raw = raw[start : start + CHUNK_BYTES]
        if fill:
            raw.copy_(torch.randint(0, 256, (CHUNK_BYTES,), dtype=torch.uint8, generator=gen))
        else:
            raw.zero_()  # touched, as L1 memory is
        meta = MemoryObjMetadata(shape=shape, dtype=torch.bfloat16, address=0, phy_size=CHUNK_BYTES, ref_count=1)
        return TensorMemoryObj(raw, meta, None)

    gen = torch.Generator().manual_seed(seed)
    return [obj(True) for _ in range(n)], [obj(False) for _ in range(n)]


def _lmcache_backend(tag: str, spec: dict[str, Any], n: int, cold: Path | None) -> _Backend:
    from lmcache.v1.distributed.api import ObjectKey

    adapter = _lmcache_adapter(spec)

    def wait(fd: int, poll: Callable[[], Any]) -> Any:
        while (result := poll()) is None:
            select.select([fd], [], [], 1.0)
        return result

    def store(keys: list[Any]) -> None:
        for i in range(0, len(keys), BATCH):
            task = adapter.submit_store_task(keys[i : i + BATCH], src[i : i + BATCH])
            if wait(adapter.get_store_event_fd(), lambda: adapter.pop_completed_store_tasks().get(task)) < 0:
                raise RuntimeError(f"lmcache {tag}: a store failed")

    def load(keys: list[Any]) -> None:
        objs = dst[-len(keys):]
        for i in range(0, len(keys), BATCH):
            task = adapter.submit_load_task(keys[i : i + BATCH], objs[i : i + BATCH])
            got = wait(adapter.get_load_event_fd(), lambda: adapter.query_load_result(task))
            if got.popcount() != len(keys[i : i + BATCH]):
                raise RuntimeError(f"lmcache {tag}: a load missed")

    def keys(rep: int) -> list[Any]:
        return [ObjectKey(chunk_hash=(rep * 10_000 + i).to_bytes(16, "little"), model_name="meta-llama/Llama-3-8B",
                          kv_rank=0) for i in range(n)]

    src, dst = _lmcache_objs(n, seed=1)
    return _Backend("lmcache", tag, store, load, adapter.delete, keys,
                    lambda: all(torch.equal(d.raw_data, s.raw_data) for d, s in zip(dst, src, strict=True)),
                    adapter.close, cold)


def _lmcache(ctx: BenchContext, sock_host: str, sock_nvme: str, n: int) -> list[_Backend]:
    plugin = {"type": "native_plugin", "module_path": "tierd.integrations.lmcache", "class_name": "TierdConnector"}
    out = [_lmcache_backend("tierd_nvme", {**plugin, "adapter_params": {"socket": sock_nvme, "tier": "nvme"}}, n, None),
           _lmcache_backend("tierd_host", {**plugin, "adapter_params": {"socket": sock_host}}, n, None)]
    for odirect in (False, True):
        d = ctx.workdir / f"lmcache-fs-{int(odirect)}"
        spec = {"type": "fs", "base_path": str(d), "use_odirect": odirect}
        out.append(_lmcache_backend(f"fs{'_odirect' if odirect else ''}", spec, n, d))
    return out


# -- SGLang ----------------------------------------------------------------------------------------


class PagePool:
    """SGLang's MHA host pool in the page_first layout (pool_host/mha.py): buffer and page views."""

    def __init__(self, pages: int, seed: int | None) -> None:
        self.page_size, self.layout, self.dtype, self.layer_num = TOKENS, "page_first", torch.bfloat16, LAYERS
        self.head_num, self.head_dim = HEADS, DIM
        self.kv_buffer = torch.empty(2, pages * TOKENS, LAYERS, HEADS, DIM, dtype=self.dtype).zero_()  # touched
        if seed is not None:
            flat = self.kv_buffer.view(torch.int16).view(-1)
            flat.copy_(torch.randint(-(2**15), 2**15, flat.shape, dtype=torch.int16,
                                     generator=torch.Generator().manual_seed(seed)))

    def get_data_page(self, index: int, flat: bool = True) -> torch.Tensor:
        page = self.kv_buffer[:, index : index + self.page_size]
        return page.flatten() if flat else page

    def get_dummy_flat_data_page(self) -> torch.Tensor:
        return torch.zeros(2 * self.page_size * LAYERS * HEADS * DIM, dtype=self.dtype)

    def set_from_flat_data_page(self, index: int, data_page: torch.Tensor) -> None:
        self.kv_buffer[:, index : index + self.page_size] = data_page.reshape(2, self.page_size, LAYERS, HEADS, DIM)


def _sglang_config(extra: dict[str, Any]) -> Any:
    from sglang.srt.mem_cache.hicache_storage import HiCacheStorageConfig

    return HiCacheStorageConfig(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, attn_cp_rank=0, attn_cp_size=1,
                                is_mla_model=False, enable_storage_metrics=False, is_page_first_layout=True,
                                model_name="meta-llama/Llama-3-8B", extra_config=extra)


def _sglang_backend(tag: str, backend: Any, n: int, *, v2: bool, cold: Path | None) -> _Backend:
    from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer

    from tierd.integrations.sglang import TierdHiCacheStorage

    src, dst = PagePool(n, seed=2), PagePool(n, seed=None)

    def io(pool: PagePool, keys: list[str], first: int, write: bool) -> None:
        for i in range(0, len(keys), BATCH):
            batch = keys[i : i + BATCH]
            idx = torch.arange((first + i) * TOKENS, (first + i + len(batch)) * TOKENS)
            if v2:  # HiCacheFile's own batched path (SGLang's file backend offers no v1)
                backend.registered_pools = {PoolName.KV: pool}
                transfer = [PoolTransfer(name=PoolName.KV, host_indices=idx, keys=batch)]
                ok = (backend.batch_set_v2 if write else backend.batch_get_v2)(transfer)[PoolName.KV]
            else:
                backend.register_mem_pool_host(pool)
                ok = (backend.batch_set_v1 if write else backend.batch_get_v1)(batch, idx)
            if not all(ok):
                raise RuntimeError(f"sglang {tag}: a {'store' if write else 'load'} failed")

    def delete(keys: list[str]) -> None:
        if isinstance(backend, TierdHiCacheStorage):
            backend.store.delete_many([backend.key(k) for k in keys])
        else:
            backend.clear()

    return _Backend("sglang", tag, lambda keys: io(src, keys, 0, True), lambda keys: io(dst, keys, n - len(keys), False),
                    delete, lambda rep: [f"{rep:04d}{i:060x}" for i in range(n)],
                    # bitwise: random bf16 bits hold NaNs, which torch.equal calls unequal
                    lambda: torch.equal(src.kv_buffer.view(torch.int16), dst.kv_buffer.view(torch.int16)),
                    getattr(backend, "close", lambda: None), cold)


def _sglang(ctx: BenchContext, sock_host: str, sock_nvme: str, n: int) -> list[_Backend]:
    from sglang.srt.mem_cache.hicache_storage import HiCacheFile

    from tierd.integrations.sglang import TierdHiCacheStorage

    out = []
    for tag, extra in (("tierd_nvme", {"socket": sock_nvme, "tier": "nvme"}), ("tierd_host", {"socket": sock_host})):
        out.append(_sglang_backend(tag, TierdHiCacheStorage(_sglang_config({"interface_v1": 1, **extra})), n,
                                   v2=False, cold=None))
    d = ctx.workdir / "hicache-file"
    out.append(_sglang_backend("hicache_file", HiCacheFile(_sglang_config({"file_storage_path": str(d)})), n, v2=True,
                               cold=d))
    return out


# -- the suite --------------------------------------------------------------------------------------


def run(ctx: BenchContext) -> dict[str, Any]:
    n = 8 if ctx.smoke else 16 if ctx.quick else 32
    reps = 1 if ctx.smoke else 2 if ctx.quick else 3
    res: dict[str, Any] = {"chunk_bytes": CHUNK_BYTES, "chunks": n, "batch": BATCH, "reps": reps}
    missing = [m for m in ("lmcache", "sglang") if not _importable(m)]
    if missing:
        res["not_run"] = f"{' and '.join(missing)} not installed (bash .ci/engines)"
        return res
    res["memcpy_gbs"] = ctx.memcpy()
    res["fio_write_gbs"], res["fio_read_gbs"] = ctx.fio("write"), ctx.fio("read")
    total = n * CHUNK_BYTES
    host_size = f"{2 * total // MIB + 256}MiB"
    nvme_size = f"{2 * total // MIB + 512}MiB"
    (ctx.workdir / "dh").mkdir()
    (ctx.workdir / "dn").mkdir()
    # Two daemons: one whose host tier holds every chunk, one whose chunks go to nvme (tier="nvme").
    with private_daemon(ctx.workdir / "dh", host_size=host_size, nvme_size=nvme_size) as sock_host, \
            private_daemon(ctx.workdir / "dn", host_size=f"{3 * BATCH * CHUNK_BYTES // MIB}MiB",
                           nvme_size=nvme_size) as sock_nvme:
        backends = _lmcache(ctx, sock_host, sock_nvme, n) + _sglang(ctx, sock_host, sock_nvme, n)
        try:
            _rounds(backends, n, reps, ctx.progress)
        finally:
            for b in backends:
                b.close()
    for b in backends:
        res.setdefault(b.engine, {})[b.tag] = _figures(b, n)
    return res


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


_ROWS = (("lmcache", "LMCache L2", (("fs", "LMCache fs"), ("fs_odirect", "LMCache fs, O_DIRECT"))),
         ("sglang", "SGLang HiCache", (("hicache_file", "HiCacheFile"),)))


def markdown(res: dict[str, Any]) -> str:
    if "not_run" in res:
        return f"Not run: {res['not_run']}.\n"
    lines = [f"{res['chunks']} chunks of {res['chunk_bytes'] >> 20} MiB (256 tokens, Llama-3-8B shape), batches of "
             f"{res['batch']}, median of {res['reps']}. fio O_DIRECT: write {res['fio_write_gbs'] or 0:.2f} GB/s, "
             f"read {res['fio_read_gbs'] or 0:.2f} GB/s; memcpy (1 thread) {res['memcpy_gbs']:.2f} GB/s.\n",
             "| engine | backend | store GB/s | load GB/s | load 1 chunk ms | store / fio | load / fio | load / memcpy |",
             "|---|---|---|---|---|---|---|---|"]
    for engine, title, peers in _ROWS:
        for tag, name in (("tierd_nvme", "tierd, nvme tier"), ("tierd_host", "tierd, host tier"), *peers):
            r = res[engine][tag]
            lines.append(f"| {title} | {name} | {r['store_gbs']:.2f} | {r['load_gbs']:.2f} | {r['load_chunk_ms']:.1f} "
                         f"| {r['store_gbs'] / (res['fio_write_gbs'] or float('nan')):.2f} "
                         f"| {r['load_gbs'] / (res['fio_read_gbs'] or float('nan')):.2f} "
                         f"| {r['load_gbs'] / res['memcpy_gbs']:.2f} |")
    return "\n".join(lines) + "\n\n#### Targets (issue 17)\n\n" + _headline_table(res)


def headline(res: dict[str, Any], limits: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    if "not_run" in res:
        return [row("serving-engine backends", "-", issue=17, status=f"not run: {res['not_run']}")]
    rows = []
    for engine, title, peers in _ROWS:
        ours, host = res[engine]["tierd_nvme"], res[engine]["tierd_host"]
        for tag, peer_name in peers:
            peer = res[engine][tag]
            for op in ("store", "load"):
                ratio = ours[f"{op}_gbs"] / peer[f"{op}_gbs"]
                fio = res["fio_write_gbs" if op == "store" else "fio_read_gbs"] or 0.0
                rows.append(row(f"{title} {op}, 32 MiB chunks, tierd's nvme tier", f"{ours[f'{op}_gbs']:.2f} GB/s",
                                peer=f"{peer_name} {peer[f'{op}_gbs']:.2f} GB/s", vs_peer=f"{ratio:.2f}",
                                limit=f"fio {fio:.2f} GB/s", issue=17, target=">= 2x the peer",
                                status=verdict(ratio >= 2.0)))
        ratio = host["load_gbs"] / res["memcpy_gbs"]
        rows.append(row(f"{title} load, 32 MiB chunks on host", f"{host['load_gbs']:.2f} GB/s",
                        limit=f"memcpy {res['memcpy_gbs']:.2f} GB/s", vs_limit=f"{ratio:.2f}", issue=17,
                        target=">= 0.8x memcpy", status=verdict(ratio >= 0.8)))
    return rows


def _headline_table(res: dict[str, Any]) -> str:
    lines = ["| measure | tierd | peer | vs peer | limit | vs limit | target | status |", "|---|---|---|---|---|---|---|---|"]
    for r in headline(res):
        lines.append(f"| {r['measure']} | {r['tierd']} | {r['peer']} | {r['vs_peer']} | {r['limit']} | {r['vs_limit']} "
                     f"| {r['target']} | {r['status']} |")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None or "not_run" in res:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (engine, title, peers) in zip(axes, _ROWS, strict=True):
        names = [("tierd_nvme", "tierd nvme"), ("tierd_host", "tierd host"), *peers]
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], [res[engine][t]["store_gbs"] for t, _ in names], 0.4, label="store")
        ax.bar([x + 0.2 for x in xs], [res[engine][t]["load_gbs"] for t, _ in names], 0.4, label="load")
        if res.get("fio_read_gbs"):
            ax.axhline(res["fio_read_gbs"], color="gray", ls="--", lw=1, label="fio read")
        ax.axhline(res["memcpy_gbs"], color="black", ls=":", lw=1, label="memcpy")
        ax.set_xticks(list(xs), [n for _, n in names], rotation=15, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{title}: 32 MiB chunks")
        ax.legend(fontsize=7)
    return save_figure(fig, out, "engines")


def main(argv: list[str] | None = None) -> int:
    return standalone(sys.modules[__name__], "engines", argv)


if __name__ == "__main__":
    raise SystemExit(main())
