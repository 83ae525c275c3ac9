"""tierd as LMCache's L2: the connector created by LMCache's own CLI parsing and native_plugin factory.

Runs only where the real ``lmcache`` package is installed (``.ci/engines`` installs it as
../shared/INTEGRATIONS.md describes; ``.ci/run`` runs these tests in its third step).
"""

from __future__ import annotations

import argparse
import json
import logging
import select
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config
from daemon import Daemon

import tierd
from tierd.testing import wait_until

pytest.importorskip("lmcache.v1.distributed.l2_adapters.native_plugin_l2_adapter")

from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters import create_l2_adapter  # noqa: E402
from lmcache.v1.distributed.l2_adapters.config import (  # noqa: E402
    add_l2_adapters_args,
    parse_args_to_l2_adapters_config,
)
from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj  # noqa: E402

from tierd.integrations.lmcache import TierdConnector  # noqa: E402

# LMCache's logging attaches opentelemetry-sdk's LoggingHandler, which that package deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk`:DeprecationWarning")

CHUNK = (2, 16, 8, 64)  # [k/v, tokens, heads, head_dim] bf16: 32 KiB, an LMCache chunk of a toy model


def _adapter(**params: Any) -> Any:
    """An L2 adapter the way LMCache's server builds one from ``--l2-adapter JSON``."""
    spec = {"type": "native_plugin", "module_path": "tierd.integrations.lmcache", "class_name": "TierdConnector",
            "adapter_params": params}
    parser = add_l2_adapters_args(argparse.ArgumentParser())
    config = parse_args_to_l2_adapters_config(parser.parse_args(["--l2-adapter", json.dumps(spec)]))
    return create_l2_adapter(config.adapters[0])


def _obj(seed: int | None = None, shape: tuple[int, ...] = CHUNK) -> TensorMemoryObj:
    data = torch.empty(shape, dtype=torch.bfloat16)
    if seed is None:
        data.zero_()
    else:
        data.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    meta = MemoryObjMetadata(shape=torch.Size(shape), dtype=torch.bfloat16, address=0,
                             phy_size=data.numel() * 2, ref_count=1)
    return TensorMemoryObj(data.view(torch.uint8).reshape(-1), meta, None)


def _keys(n: int, *, salt: str = "", model: str = "meta-llama/Llama-3.1-8B") -> list[ObjectKey]:
    return [ObjectKey(chunk_hash=i.to_bytes(16, "little"), model_name=model, kv_rank=0, cache_salt=salt)
            for i in range(n)]


def _wait(fd: int, poll: Callable[[], Any], timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        select.select([fd], [], [], 0.2)
        result = poll()
        if result is not None:
            return result
    raise AssertionError("no completion within the timeout")


def _store(adapter: Any, keys: list[ObjectKey], objs: list[TensorMemoryObj]) -> Any:
    task = adapter.submit_store_task(keys, objs)
    return _wait(adapter.get_store_event_fd(), lambda: adapter.pop_completed_store_tasks().get(task))


def _lookup(adapter: Any, keys: list[ObjectKey]) -> list[int]:
    task = adapter.submit_lookup_and_lock_task(keys, {})
    bitmap = _wait(adapter.get_lookup_and_lock_event_fd(), lambda: adapter.query_lookup_and_lock_result(task))
    return sorted(bitmap.get_indices_list())


def _load(adapter: Any, keys: list[ObjectKey], objs: list[TensorMemoryObj]) -> list[int]:
    task = adapter.submit_load_task(keys, objs)
    bitmap = _wait(adapter.get_load_event_fd(), lambda: adapter.query_load_result(task))
    return sorted(bitmap.get_indices_list())


def test_store_lookup_load_delete_through_the_daemon(daemon: Daemon) -> None:
    adapter = _adapter(socket=str(daemon.socket))
    try:
        assert adapter.report_status()["is_healthy"]
        keys = _keys(12)
        objs = [_obj(i) for i in range(12)]
        result = _store(adapter, keys[:8], objs[:8])
        assert result == 8 * objs[0].get_size()  # L2StoreResult: the bytes stored, -1 on failure
        # Found exactly what was stored, in order; LMCache locks what it found.
        assert _lookup(adapter, keys) == list(range(8))
        outs = [_obj() for _ in range(12)]
        assert _load(adapter, keys, outs) == list(range(8))
        for i in range(8):
            assert torch.equal(outs[i].raw_data, objs[i].raw_data), i
        assert all(not outs[i].raw_data.any() for i in range(8, 12))  # misses leave the buffer alone
        adapter.submit_unlock(keys[:8])
        adapter.delete(keys[:4])
        assert _lookup(adapter, keys) == list(range(4, 8))
    finally:
        adapter.close()
    # The chunks are ordinary tierd objects under the lmcache namespace.
    with daemon.connect() as store:
        assert len(store.keys("lmcache/")) == 4


def test_workers_share_one_cache_through_the_daemon(daemon: Daemon) -> None:
    writer, reader = _adapter(socket=str(daemon.socket)), _adapter(socket=str(daemon.socket))
    try:
        keys, objs = _keys(6), [_obj(100 + i) for i in range(6)]
        assert _store(writer, keys, objs) >= 0
        outs = [_obj() for _ in range(6)]
        assert _load(reader, keys, outs) == list(range(6))
        assert all(torch.equal(o.raw_data, x.raw_data) for o, x in zip(outs, objs, strict=True))
    finally:
        writer.close()
        reader.close()


def test_tenants_and_salts_never_share(daemon: Daemon) -> None:
    a, b = _adapter(socket=str(daemon.socket), salt="tenant-a"), _adapter(socket=str(daemon.socket), salt="tenant-b")
    try:
        assert _store(a, _keys(3), [_obj(i) for i in range(3)]) >= 0
        assert _lookup(a, _keys(3)) == [0, 1, 2]
        assert _lookup(b, _keys(3)) == []
        # LMCache's own cache_salt is part of its key: a different salt is a different chunk.
        assert _lookup(a, _keys(3, salt="other")) == []
    finally:
        a.close()
        b.close()
    with tierd.connect(daemon.socket) as store:
        assert all("tenant" not in key for key in store.keys("lmcache/"))  # the salt is hashed


def test_a_buffer_of_the_wrong_size_misses_and_the_rest_load(daemon: Daemon) -> None:
    adapter = _adapter(socket=str(daemon.socket))
    try:
        keys, objs = _keys(3), [_obj(i) for i in range(3)]
        assert _store(adapter, keys, objs) >= 0
        outs = [_obj(), _obj(shape=(2, 8, 8, 64)), _obj()]
        assert _load(adapter, keys, outs) == [0, 2]
        assert torch.equal(outs[2].raw_data, objs[2].raw_data)
        assert not outs[1].raw_data.any()
    finally:
        adapter.close()


def test_a_killed_daemon_misses_and_the_same_adapter_serves_after_a_restart(daemon: Daemon) -> None:
    """kill -9 of the daemon: LMCache sees failed stores and misses, never an exception, and its
    status says unhealthy; once a daemon serves on the socket again, the same adapter (LMCache
    never detaches an L2 for errors) stores and loads again without a restart."""
    adapter = _adapter(socket=str(daemon.socket))
    try:
        keys, objs = _keys(6), [_obj(i) for i in range(6)]
        assert _store(adapter, keys[:2], objs[:2]) >= 0
        assert adapter.report_status()["is_healthy"]
        daemon.kill()
        status = adapter.report_status()
        assert status["is_healthy"] is False and "does not answer" in status["tierd_error"]
        assert _store(adapter, keys[2:4], objs[2:4]) == -1  # L2StoreResult: failed, nothing counted
        assert _lookup(adapter, keys) == []
        assert _load(adapter, keys, [_obj() for _ in keys]) == []
        adapter.delete(keys[:1])  # LMCache's eviction: returns, the key stays counted
        assert adapter.get_usage().total_bytes_used == 2 * objs[0].get_size()

        daemon.start()  # a new daemon on the same socket: volatile chunks are gone
        assert wait_until(lambda: adapter.report_status()["is_healthy"], timeout_s=30)
        assert _store(adapter, keys[2:6], objs[2:6]) == 4 * objs[0].get_size()
        assert _lookup(adapter, keys) == [2, 3, 4, 5]
        outs = [_obj() for _ in keys]
        assert _load(adapter, keys, outs) == [2, 3, 4, 5]
        assert all(torch.equal(outs[i].raw_data, objs[i].raw_data) for i in range(2, 6))
        adapter.submit_unlock(keys[2:6])
        # The keys lost with the old daemon leave LMCache's accounting when its eviction deletes them.
        adapter.delete(keys[:2])
        assert adapter.get_usage().total_bytes_used == 4 * objs[0].get_size()
    finally:
        adapter.close()


def test_a_bad_key_misses_alone_in_lookups_and_loads(daemon: Daemon, caplog: pytest.LogCaptureFixture) -> None:
    """A model name over tierd's 1 KiB key limit or with a NUL byte is a miss of its own, logged
    with its reason; the other keys of the same lookup and load hit."""
    adapter = _adapter(socket=str(daemon.socket))
    try:
        good, objs = _keys(3), [_obj(i) for i in range(3)]
        assert _store(adapter, good, objs) >= 0
        long_name, nul_name = _keys(1, model="m" * 2000)[0], _keys(1, model="llama\x00x")[0]
        mixed = [good[0], long_name, good[1], nul_name, good[2]]
        with caplog.at_level(logging.WARNING, logger="tierd.integrations.lmcache"):
            assert _lookup(adapter, mixed) == [0, 2, 4]
            outs = [_obj() for _ in mixed]
            assert _load(adapter, mixed, outs) == [0, 2, 4]
        assert all(torch.equal(outs[j].raw_data, objs[i].raw_data) for i, j in enumerate((0, 2, 4)))
        assert "1024 bytes" in caplog.text and "(2000" not in caplog.text  # the reason, the key shortened
        adapter.submit_unlock([good[0], good[1], good[2]])
    finally:
        adapter.close()


class _Counted:
    """The keys LMCache's accounting counts as stored in its L2 (what its eviction listens to)."""

    def __init__(self) -> None:
        self.keys: set[ObjectKey] = set()

    def on_l2_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        self.keys.update(keys)

    def on_l2_keys_accessed(self, keys: list[ObjectKey]) -> None:
        pass

    def on_l2_keys_deleted(self, keys: list[ObjectKey]) -> None:
        self.keys.difference_update(keys)


def test_lmcache_counts_exactly_the_chunks_tierd_holds(nvme_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stores where only part of a batch can land (a namespace quota, a bad key) report failure and
    keep none of it, so LMCache's accounting and tierd agree after every step; a chunk LMCache
    already counts survives a later failed batch that stores it again."""
    # Room for three 32 KiB chunks; chunks over inline_max_bytes are stored one by one, each
    # against the quota, so a batch lands in part.
    d = Daemon(nvme_dir, namespaces={"lmcache": {"quota": "100KiB"}}, daemon={"inline_max_bytes": 16384}).start()
    adapter = _adapter(socket=str(d.socket))
    counted = _Counted()
    adapter.register_listener(counted)
    keys, objs = _keys(8), [_obj(i) for i in range(8)]
    bad_key = _keys(1, model="m" * 2000)[0]

    def agree() -> None:
        held = _lookup(adapter, keys)
        adapter.submit_unlock(keys)
        assert {keys[i] for i in held} == counted.keys
        assert adapter.get_usage().total_bytes_used == len(held) * objs[0].get_size()
        with d.connect() as store:
            assert len(store.keys("lmcache/")) == len(held)

    try:
        with caplog.at_level(logging.WARNING, logger="tierd.integrations.lmcache"):
            assert _store(adapter, keys[:2], objs[:2]) == 2 * objs[0].get_size()
            agree()
            assert _store(adapter, keys[2:6], objs[2:6]) == -1  # one fits the quota, three do not
            agree()
            assert "QuotaExceeded" in caplog.text
            assert _store(adapter, [keys[0], keys[6], bad_key], [objs[0], objs[6], objs[0]]) == -1
            agree()
            assert counted.keys == {keys[0], keys[1]}
            adapter.delete([keys[0], keys[5]])  # counted and held; never stored
            agree()
            assert counted.keys == {keys[1]}
            assert _store(adapter, keys[2:4], objs[2:4]) == 2 * objs[0].get_size()
            agree()
    finally:
        adapter.close()
        d.close()


def test_a_bad_buffer_fails_its_own_item(daemon: Daemon) -> None:
    """The connector's own interface: an empty buffer or something that is not a buffer fails its
    item (logged), nothing is stored for it, and the store batch reports failure with its reason;
    a buffer list of another length fails the batch. Loads miss on such items alone."""
    connector = TierdConnector(socket=str(daemon.socket))
    try:
        objs = [_obj(i) for i in range(2)] + [_obj(), _obj()]  # byte_array views their memory: keep them
        good = [o.byte_array for o in objs[:2]]
        ids = [connector.submit_batch_set(["a", "b", "c"], [good[0], memoryview(b""), good[1]]),
               connector.submit_batch_set(["d", "e"], [good[0], None]),
               connector.submit_batch_set(["f"], []),
               connector.submit_batch_set(["g", "h"], good)]
        done = {}
        assert wait_until(lambda: done.update((c[0], c[1:]) for c in connector.drain_completions()) or len(done) == 4,
                          timeout_s=30)
        assert [done[i][0] for i in ids] == [False, False, False, True]
        assert "empty buffer" in done[ids[0]][1] and "b" in done[ids[0]][1]
        assert "1 keys but 0 buffers" in done[ids[2]][1]
        assert sorted(connector.store.keys("lmcache/")) == ["lmcache/g", "lmcache/h"]
        outs = [objs[2].byte_array, memoryview(bytearray(3)), None, objs[3].byte_array]
        fid = connector.submit_batch_get(["g", "h", "g", "h"], outs)
        assert wait_until(lambda: done.update((c[0], c[1:]) for c in connector.drain_completions()) or fid in done,
                          timeout_s=30)
        assert done[fid][2] == [True, False, False, True]
        assert bytes(outs[0]) == bytes(good[0]) and bytes(outs[3]) == bytes(good[1])
    finally:
        connector.close()


def test_batches_after_close_complete_failed_without_raising(daemon: Daemon) -> None:
    """After close() a submit is a logged no-op that completes not ok (what LMCache's fs adapter
    does for a delete after close); it never raises into LMCache."""
    connector = TierdConnector(socket=str(daemon.socket))
    obj = _obj(1)
    buf = obj.byte_array  # a view of obj's memory
    connector.close()
    ids = [connector.submit_batch_set(["k"], [buf]), connector.submit_batch_get(["k"], [buf]),
           connector.submit_batch_exists(["k", "j"]), connector.submit_batch_delete(["k"])]
    done = connector.drain_completions()
    assert [fid for fid, *_ in done] == ids
    assert all(not ok and "closed" in error for _, ok, error, _ in done)
    assert [per_key for *_, per_key in done] == [[False], [False], [False, False], [False]]
    connector.close()  # twice: nothing


def test_embedded_engine_with_a_config(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir, host="8MiB")
    adapter = _adapter(config=cfg)
    try:
        keys, objs = _keys(40), [_obj(i) for i in range(40)]  # 1.25 MiB: fits host
        assert _store(adapter, keys, objs) >= 0
        outs = [_obj() for _ in range(40)]
        assert _load(adapter, keys, outs) == list(range(40))
        assert all(torch.equal(o.raw_data, x.raw_data) for o, x in zip(outs, objs, strict=True))
    finally:
        adapter.close()


def test_missing_interface_parameters_are_clear(nvme_dir: Path) -> None:
    with pytest.raises(tierd.InvalidArgument, match="namespace"):
        _adapter(config=small_config(nvme_dir), namespace="a/b")
    with pytest.raises(tierd.DaemonUnavailable):
        _adapter(socket="/tmp/no-such-tierd.sock")


def test_lmcaches_storage_manager_gets_its_l2_back_after_a_daemon_restart(daemon: Daemon) -> None:
    """LMCache's own StorageManager (L1, store and prefetch controllers) over tierd: chunks written
    to L1 reach tierd; with the daemon killed, writes stay in L1, prefetches miss and the status
    says why, nothing raises; after a restart on the same socket the same StorageManager stores
    to tierd and prefetches from it again."""
    from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, PrefetchTaskSpec
    from lmcache.v1.distributed.config import (
        EvictionConfig,
        L1ManagerConfig,
        L1MemoryManagerConfig,
        StorageManagerConfig,
    )
    from lmcache.v1.distributed.l2_adapters.config import L2AdaptersConfig
    from lmcache.v1.distributed.l2_adapters.native_plugin_l2_adapter import NativePluginL2AdapterConfig
    from lmcache.v1.distributed.storage_manager import StorageManager

    layout = MemoryLayoutDesc(shapes=[torch.Size(CHUNK)], dtypes=[torch.bfloat16])
    l1 = L1ManagerConfig(memory_config=L1MemoryManagerConfig(size_in_bytes=16 << 20, use_lazy=False,
                                                             init_size_in_bytes=16 << 20, align_bytes=0x1000),
                         write_ttl_seconds=600, read_ttl_seconds=300)
    l2 = NativePluginL2AdapterConfig(module_path="tierd.integrations.lmcache", class_name="TierdConnector",
                                     adapter_params={"socket": str(daemon.socket)})
    sm = StorageManager(StorageManagerConfig(l1_manager_config=l1, eviction_config=EvictionConfig("LRU"),
                                             l2_adapter_config=L2AdaptersConfig(adapters=[l2])))

    def write(keys: list[ObjectKey], seed: int) -> list[torch.Tensor]:
        reserved = sm.reserve_write(keys, layout)
        assert set(reserved) == set(keys)
        data = []
        for i, key in enumerate(keys):
            raw = reserved[key].byte_array
            src = _obj(seed + i).raw_data
            torch.frombuffer(raw, dtype=torch.uint8).copy_(src)
            data.append(src)
        sm.finish_write(keys)
        return data

    def prefetched(keys: list[ObjectKey]) -> int:
        handle = sm.submit_prefetch_task(PrefetchTaskSpec(key_groups=[GroupedObjectKeys(keys, 0, layout)]))
        assert sm.wait_prefetch_status(handle, timeout=30)
        result = sm.query_prefetch_status(handle)
        assert result is not None
        return result.hit_cells[0].popcount()

    def in_tierd() -> int:
        with daemon.connect() as store:
            return len(store.keys("lmcache/"))

    def l2_status() -> dict[str, Any]:
        return sm.report_status()["l2_adapters"][0]

    try:
        a, b, c = _keys(4), _keys(8)[4:], _keys(12)[8:]
        write(a, 0)
        assert wait_until(lambda: in_tierd() == 4, timeout_s=30)
        assert l2_status()["is_healthy"] and sm.report_status()["is_healthy"]

        daemon.kill()
        write(b, 10)  # stays in L1; LMCache logs the failed L2 store
        assert wait_until(lambda: l2_status()["tierd_failed_batches"] >= 1, timeout_s=30)
        status = sm.report_status()
        assert not status["is_healthy"] and "does not answer" in status["l2_adapters"][0]["tierd_error"]
        sm.clear()
        assert prefetched(a) == 0  # the L2 misses; no error reaches LMCache

        daemon.start()
        assert wait_until(lambda: l2_status()["is_healthy"], timeout_s=30)
        data = write(c, 20)
        assert wait_until(lambda: in_tierd() == 4, timeout_s=30)  # c alone: a went with the old daemon
        sm.clear()
        assert prefetched(c) == 4
        with sm.read_prefetched_results(c) as objs:
            assert objs is not None
            assert all(torch.equal(torch.frombuffer(o.byte_array, dtype=torch.uint8), d)
                       for o, d in zip(objs, data, strict=True))
        sm.finish_read_prefetched(c)
    finally:
        sm.close()
