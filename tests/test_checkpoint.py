"""Checkpoints: round trips, snapshots, crashes, corruption, retention, several ranks."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tierd
from tierd import checkpoint
from tierd.testing import wait_until


def _state(seed: int = 0, scale: int = 1) -> dict:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(256 * scale, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 256 * scale)).square().mean().backward()
        opt.step()
    return {"model": model.state_dict(), "optim": opt.state_dict(), "step": 2, "rng": torch.get_rng_state(),
            "np_rng": np.random.get_state(), "py_rng": random.getstate(), "note": "hello", "inf": float("inf"),
            "blob": b"\x00\x01", "mixed": [1, 2.5, None, (3, "x")], "half": torch.randn(33, 7).half(),
            "flags": torch.rand(100) > 0.5}


def _assert_same(a: object, b: object, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a.reshape(-1).view(torch.uint8) if a.dtype != torch.bool else a,
                           b.reshape(-1).view(torch.uint8) if b.dtype != torch.bool else b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), path
        for k in a:
            _assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{path}.{i}")
    else:
        assert a == b or (isinstance(a, float) and a != a and b != b), path


@pytest.mark.parametrize("codec", ["none", "zstd", "bytegroup"])
def test_round_trip_bitwise(tmp_path: Path, codec: str) -> None:
    sd = _state()
    checkpoint.save(sd, tmp_path / "c", codec=codec, shard_bytes=1 << 20, step=2)
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert manifest["codec"] == codec and len(manifest["shards"]) > 1
    _assert_same(sd, checkpoint.load(tmp_path / "c"))


def test_uncompressed_shard_reads_with_safetensors(tmp_path: Path) -> None:
    sd = _state()
    checkpoint.save(sd, tmp_path / "c")
    shard = next((tmp_path / "c").glob("*.safetensors"))
    loaded = load_file(str(shard))
    assert torch.equal(loaded["model.0.weight"], sd["model"]["0.weight"])
    assert torch.equal(loaded["optim.state.0.exp_avg"], sd["optim"]["state"][0]["exp_avg"])


def test_load_into_fills_in_place_and_reads_only_needed_shards(tmp_path: Path) -> None:
    sd = _state()
    checkpoint.save({"model": sd["model"], "optim": sd["optim"]}, tmp_path / "c", shard_bytes=1 << 20)
    target = _state(seed=1)["model"]
    ptrs = {k: v.data_ptr() for k, v in target.items()}
    # Shards holding only optimizer state are never opened: remove them.
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    model_shards = {e["shard"] for k, e in manifest["tensors"].items() if k.startswith("model.")}
    for name in set(manifest["shards"]) - model_shards:
        (tmp_path / "c" / name).unlink()
    out = checkpoint.load(tmp_path / "c", into={"model": target})
    assert all(out["model"][k] is target[k] and target[k].data_ptr() == ptrs[k] for k in target)
    _assert_same(sd["model"], target)
    assert out["optim"]["state"][0]["exp_avg"] is None


def test_async_save_is_a_snapshot(tmp_path: Path) -> None:
    w = torch.zeros(1 << 20)
    pending = checkpoint.async_save({"w": w}, tmp_path / "c")
    pending.staged.result(timeout=60)
    w.add_(1.0)  # training goes on: the checkpoint must not see this
    assert pending.durable.result(timeout=120) == tmp_path / "c"
    assert torch.equal(checkpoint.load(tmp_path / "c")["w"], torch.zeros(1 << 20))


def test_one_save_in_flight(tmp_path: Path) -> None:
    first = checkpoint.async_save({"w": torch.randn(4 << 20)}, tmp_path / "a")
    second = checkpoint.async_save({"w": torch.randn(16)}, tmp_path / "b")
    assert first.durable.done()  # the second waited for the first before staging
    second.result(timeout=60)


def test_corrupt_shard_names_tensor_and_shard(tmp_path: Path) -> None:
    sd = {"a": torch.arange(100_000, dtype=torch.int64), "b": torch.ones(10)}
    checkpoint.save(sd, tmp_path / "c")
    shard = next((tmp_path / "c").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-200] ^= 0xFF  # inside the last bytes of tensor "a" or "b"
    shard.write_bytes(bytes(data))
    with pytest.raises(tierd.CorruptObject, match=r"tensor '(a|b)' in shard shard-00000.safetensors fails its checksum"):
        checkpoint.load(tmp_path / "c")


def test_latest_ignores_incomplete_and_keep_last_retains(tmp_path: Path) -> None:
    for step in range(4):
        checkpoint.save({"w": torch.full((10,), step)}, tmp_path / f"step-{step}", step=step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-2", "step-3"]
    assert checkpoint.latest(tmp_path) == tmp_path / "step-3"
    (tmp_path / "step-9").mkdir()  # a save that died before its manifest
    (tmp_path / "step-9" / "shard-00000.safetensors").write_bytes(b"partial")
    assert checkpoint.latest(tmp_path) == tmp_path / "step-3"
    shard = tmp_path / "step-3" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])  # truncated: no longer complete
    assert checkpoint.latest(tmp_path) == tmp_path / "step-2"
    with pytest.raises(tierd.NotFound, match="no manifest.json"):
        checkpoint.load(tmp_path / "step-9")
    with pytest.raises(tierd.InvalidArgument, match="holds a checkpoint already"):
        checkpoint.save({"w": torch.zeros(1)}, tmp_path / "step-2")


def test_bad_values(tmp_path: Path) -> None:
    with pytest.raises(tierd.InvalidArgument, match="cannot checkpoint a set"):
        checkpoint.save({"s": {1, 2}}, tmp_path / "c")


_SAVER = textwrap.dedent(
    """
    import sys, torch
    from tierd import checkpoint
    root = sys.argv[1]
    for step in range(1, 100):
        sd = {"w": torch.full((64 << 20,), float(step)), "step": step}   # 256 MiB a save
        pending = checkpoint.async_save(sd, f"{root}/step-{step}", step=step)
        pending.staged.result()
        print("STAGED", step, flush=True)
        pending.durable.result()
        print("DURABLE", step, flush=True)
    """
)


def test_kill_9_during_the_durable_write_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    durable = 0
    for line in proc.stdout:
        word, step = line.split()
        if word == "DURABLE":
            durable = int(step)
        elif word == "STAGED" and int(step) == 2:
            os.kill(proc.pid, signal.SIGKILL)  # step 2 is being written now
            break
    proc.wait(timeout=60)
    for line in proc.stdout:
        if line.startswith("DURABLE"):
            durable = int(line.split()[1])
    assert durable >= 1
    best = checkpoint.latest(tmp_path)
    assert best is not None and best.name in {f"step-{durable}", f"step-{durable + 1}"}
    loaded = checkpoint.load(best)
    assert torch.equal(loaded["w"], torch.full((64 << 20,), float(loaded["step"])))


_RANK = textwrap.dedent(
    """
    import os, sys, torch, torch.distributed as dist
    from tierd import checkpoint
    rank, root = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=2)
    sd = {"shard": torch.full((1000,), float(rank)), "rank": rank}
    checkpoint.save(sd, f"{root}/ckpt", step=5)
    back = checkpoint.load(f"{root}/ckpt")
    assert back["rank"] == rank and torch.equal(back["shard"], sd["shard"]), back
    print("OK", rank, flush=True)
    dist.destroy_process_group()
    """
)


def test_two_ranks_with_gloo(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _RANK, str(r), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert sorted(manifest["shards"]) == ["rank00000-shard-00000.safetensors", "rank00001-shard-00000.safetensors"]
    assert checkpoint.latest(tmp_path) == tmp_path / "ckpt"


@pytest.mark.parametrize("kind", ["embedded", "gpu-tier", "daemon"])
def test_staging_in_a_store_arena(tmp_path: Path, kind: str) -> None:
    from conftest import small_config
    from daemon import Daemon

    from tierd.clients.gpu import GpuTierStore
    from tierd.tiers.gpu import GpuTier

    sd = _state()
    if kind != "daemon":
        store = tierd.open(small_config(tmp_path / "nvme", host="64MiB"))
        if kind == "gpu-tier":  # the wrapper tierd.open() returns when a gpu budget is set
            store = GpuTierStore(store, GpuTier("cpu", 8 << 20))
        with store:
            used = store.stats()["host"].used_bytes
            checkpoint.async_save(sd, tmp_path / "c", store=store).result()
            assert store.stats()["host"].used_bytes == used  # staging space given back
    else:
        d = Daemon(tmp_path / "nvme", host="64MiB").start()
        try:
            with d.connect() as store:
                checkpoint.save(sd, tmp_path / "c", store=store)
                assert wait_until(lambda: store.stats()["host"].used_bytes == 0, timeout_s=10)
        finally:
            d.close()
    _assert_same(sd, checkpoint.load(tmp_path / "c"))


_STRAGGLER = textwrap.dedent(
    """
    import os, sys, threading, torch, torch.distributed as dist
    os.environ["TIERD_CHECKPOINT_BARRIER_S"] = "3"
    import tierd
    from tierd import checkpoint
    rank, root = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{root}/init", rank=rank, world_size=2)
    if rank == 0:
        try:
            checkpoint.save({"w": torch.ones(10)}, f"{root}/ckpt")
            print("SAVED")
        except tierd.TierdError as exc:
            print("RAISED", "timed out" in str(exc), flush=True)
    else:
        checkpoint._dist()   # joins the checkpoint group like every rank must, then never saves
        threading.Event().wait(8)  # alive in the group, never arriving at the barrier
    """
)


def test_barrier_timeout_raises_instead_of_hanging(tmp_path: Path) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", _STRAGGLER, str(r), str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    out0, err0 = procs[0].communicate(timeout=120)
    procs[1].kill()
    procs[1].wait(timeout=30)
    assert "RAISED True" in out0, err0[-2000:]
    assert checkpoint.latest(tmp_path) is None  # nothing was committed


def test_flipped_byte_in_a_compressed_shard_is_corrupt_object(tmp_path: Path) -> None:
    sd = {"w": (torch.randn(256, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)}
    checkpoint.save(sd, tmp_path / "z", codec="zstd")
    shard = next((tmp_path / "z").glob("*.tierd"))
    data = bytearray(shard.read_bytes())
    # A single flipped bit of an entropy-coded stream may decode to the very same
    # bytes (then nothing is wrong to report); a byte every 10 KiB surely does not.
    for pos in range(5000, len(data), 10_000):
        data[pos] ^= 0x10
    shard.write_bytes(bytes(data))
    with pytest.raises(tierd.CorruptObject, match=r"tensor 'w' in shard shard-00000.tierd"):
        checkpoint.load(tmp_path / "z")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/x", "..", "a\x00b"])
def test_manifest_naming_a_shard_outside_its_directory_is_refused(tmp_path: Path, bad: str) -> None:
    checkpoint.save({"w": torch.ones(10)}, tmp_path / "c", step=1)
    manifest = tmp_path / "c" / checkpoint.MANIFEST
    doc = json.loads(manifest.read_text())
    (name,) = doc["shards"]
    doc["shards"][bad] = doc["shards"].pop(name)
    for entry in doc["tensors"].values():
        entry["shard"] = bad
    manifest.write_text(json.dumps(doc))
    with pytest.raises(tierd.CorruptObject, match="outside its directory"):
        checkpoint.load(tmp_path / "c")
    assert checkpoint.latest(tmp_path) is None  # not a complete checkpoint either


def _resident_bytes(buf: object) -> int:
    """Resident bytes of the mapping holding ``buf`` (an mmap), from /proc/self/smaps."""
    import ctypes

    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "Rss:":
            return int(line.split()[1]) * 1024
    raise AssertionError("mapping not found")


def test_prepare_faults_the_staging_pool_in_ahead_and_the_first_save_reuses_it(tmp_path: Path) -> None:
    from tierd.clients import checkpoint as ckpt

    size = (ckpt._pool.nbytes or 0) + (48 << 20)  # larger than any earlier test's pool: a new mapping
    state = {"w": torch.randn(size >> 2)}
    ckpt.prepare(state).result(timeout=60)
    buf = ckpt._pool._buf
    assert ckpt._pool.nbytes >= size
    assert _resident_bytes(buf) >= size, "the pool was mapped but not faulted in"
    pending = checkpoint.async_save(state, tmp_path / "c1")
    pending.result()
    assert ckpt._pool._buf is buf  # the first save used the prepared pool, no new mapping
    assert torch.equal(checkpoint.load(tmp_path / "c1")["w"], state["w"])


# -- staging while training runs (Note [staging while training runs]) ----------------------


def _gated_deferred_copy(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Hold the background copy of the optimizer's tensors until the returned event is set."""
    from tierd.clients import checkpoint as ckpt

    real = ckpt._copy_in
    gate = threading.Event()

    def gated(staged, shards, tensors, only, skip):  # noqa: ANN001, ANN202
        if only is not None:
            assert gate.wait(timeout=60), "the test never released the deferred copy"
        real(staged, shards, tensors, only, skip)

    monkeypatch.setattr(ckpt, "_copy_in", gated)
    return gate


def _trained(batchnorm: bool = False) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 128)] + ([torch.nn.BatchNorm1d(128)] if batchnorm else []) + [torch.nn.Linear(128, 4)]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train_step(model, opt)
    return model, opt


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, step: bool = True) -> None:
    opt.zero_grad()
    model(torch.randn(16, 64)).square().mean().backward()
    if step:
        opt.step()


def _snapshot(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "exp_avg": [opt.state[p]["exp_avg"].clone() for p in model.parameters()]}


def _assert_saved_is(path: Path, snap: dict, model: torch.nn.Module) -> None:
    saved = checkpoint.load(path)
    for k, v in snap["model"].items():
        assert torch.equal(saved["model"][k], v), k
    for i, v in enumerate(snap["exp_avg"]):
        assert torch.equal(saved["optim"]["state"][i]["exp_avg"], v), i


def test_async_save_with_optimizer_returns_before_staging_and_step_waits(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _trained()
    gate = _gated_deferred_copy(monkeypatch)
    staged_at_step: list[bool] = []

    def release(optimizer: Any, args: Any, kwargs: Any) -> None:  # runs before tierd's hook, registered later
        staged_at_step.append(pending.staged.done())
        gate.set()

    opt.register_step_pre_hook(release)
    snap = _snapshot(model, opt)
    pending = checkpoint.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "c",
                                    optimizer=opt)
    assert not pending.staged.done()  # returned at once: the parameters are copied in the background
    _train_step(model, opt, step=False)  # forward and backward proceed while it copies
    opt.step()  # must wait for the copy before it changes the parameters
    assert staged_at_step == [False]  # the copy had not even started when step() began ...
    assert pending.staged.done() and pending.step_wait_s > 0  # ... and step() waited for it
    with torch.no_grad():  # and right after step(), an in-place change
        for p in model.parameters():
            p.add_(1.0)
    pending.result(timeout=60)
    _assert_saved_is(tmp_path / "c", snap, model)
    assert not torch.equal(model[0].weight, snap["model"]["0.weight"])  # training did move on


def test_async_save_with_optimizer_copies_buffers_at_the_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = _trained(batchnorm=True)
    gate = _gated_deferred_copy(monkeypatch)
    snap = _snapshot(model, opt)
    pending = checkpoint.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "c",
                                    optimizer=opt)
    _train_step(model, opt, step=False)  # forward changes BatchNorm's running statistics, which no optimizer owns
    assert not torch.equal(model[1].running_mean, snap["model"]["1.running_mean"])
    gate.set()
    pending.result(timeout=60)
    _assert_saved_is(tmp_path / "c", snap, model)


def test_async_save_with_optimizer_registers_one_hook_and_a_step_after_staging_does_not_wait(tmp_path: Path) -> None:
    model, opt = _trained()
    for i in range(3):
        snap = _snapshot(model, opt)
        pending = checkpoint.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / f"c{i}",
                                        optimizer=opt)
        pending.staged.result(timeout=60)
        _train_step(model, opt)
        assert pending.step_wait_s == 0.0
        pending.result(timeout=60)
        _assert_saved_is(tmp_path / f"c{i}", snap, model)
    assert len(opt._optimizer_step_pre_hooks) == 1


def test_async_save_with_optimizer_failing_copy_lets_training_go_on(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from tierd.clients import checkpoint as ckpt

    model, opt = _trained()
    real = ckpt._copy_in

    def failing(staged, shards, tensors, only, skip):  # noqa: ANN001, ANN202
        if only is not None:
            raise OSError("injected")
        real(staged, shards, tensors, only, skip)

    monkeypatch.setattr(ckpt, "_copy_in", failing)
    pending = checkpoint.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, tmp_path / "c",
                                    optimizer=opt)
    _train_step(model, opt)  # does not hang, does not raise
    with pytest.raises(OSError, match="injected"):
        pending.result(timeout=60)
    assert not (tmp_path / "c" / checkpoint.MANIFEST).exists()
    monkeypatch.setattr(ckpt, "_copy_in", real)
    checkpoint.async_save({"model": model.state_dict()}, tmp_path / "d", optimizer=opt).result(timeout=60)


def test_async_save_optimizer_must_be_an_optimizer(tmp_path: Path) -> None:
    with pytest.raises(tierd.InvalidArgument, match="torch.optim.Optimizer"):
        checkpoint.async_save({"w": torch.ones(3)}, tmp_path / "c", optimizer=object())
