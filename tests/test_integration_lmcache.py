"""tierd as LMCache's L2: the connector created by LMCache's own CLI parsing and native_plugin factory.

Runs only where the real ``lmcache`` package is installed (``.ci/engines`` installs it as
../shared/INTEGRATIONS.md describes; ``.ci/run`` runs these tests in its third step).
"""

from __future__ import annotations

import argparse
import json
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

pytest.importorskip("lmcache.v1.distributed.l2_adapters.native_plugin_l2_adapter")

from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters import create_l2_adapter  # noqa: E402
from lmcache.v1.distributed.l2_adapters.config import (  # noqa: E402
    add_l2_adapters_args,
    parse_args_to_l2_adapters_config,
)
from lmcache.v1.memory_management import MemoryObjMetadata, TensorMemoryObj  # noqa: E402

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


def test_a_dead_daemon_fails_batches_without_hanging(daemon: Daemon) -> None:
    adapter = _adapter(socket=str(daemon.socket))
    try:
        keys = _keys(2)
        assert _store(adapter, keys, [_obj(1), _obj(2)]) >= 0
        daemon.kill()
        assert _store(adapter, _keys(4)[2:], [_obj(3), _obj(4)]) == -1
        assert _lookup(adapter, keys) == []
        assert _load(adapter, keys, [_obj(), _obj()]) == []
    finally:
        adapter.close()


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
