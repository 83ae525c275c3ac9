"""Durable objects survive close, reopen and kill -9; faults lose nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import flip_byte, small_config
from daemon import Daemon

import tierd


def _tensor(i: int, n: int = 50_000) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) * (i + 1) + i


def test_a_smaller_nvme_size_refuses_to_start_and_drops_nothing(nvme_dir: Path) -> None:
    """Restarting with tiers.nvme.size below the durable data is a config error, never a loss."""
    big, small = (small_config(nvme_dir, host="16MiB", nvme=size) for size in ("256MiB", "64MiB"))
    for cfg in (big, small):
        cfg["tiers"]["nvme"]["slab_size"] = "16MiB"
    with tierd.open(big) as s:
        for i in range(24):  # 96 MiB of durable 4 MiB objects
            s.put(f"ckpt/{i}", torch.full((1 << 20,), float(i)), durable=True)
    with pytest.raises(tierd.ConfigError, match="tiers.nvme.size .* at least"):
        tierd.open(small)
    with tierd.open(big) as s:  # the old size: every object is back
        assert s.keys("ckpt/") == sorted(f"ckpt/{i}" for i in range(24))
        for i in range(24):
            assert torch.equal(s.get(f"ckpt/{i}"), torch.full((1 << 20,), float(i)))


def test_durable_survive_reopen_volatile_do_not(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir)
    with tierd.open(cfg) as s:
        for i in range(5):
            s.put(f"ckpt/{i}", _tensor(i), durable=True, codec=["none", "zstd", "bytegroup"][i % 3])
        s.put("tmp/v", _tensor(9))
        s.put("tmp/vn", _tensor(10), tier="nvme")
        s.put("ckpt/bytes", b"durable bytes", durable=True)
        s.put("ckpt/empty", torch.empty(0, 3), durable=True)
        s.delete("ckpt/4")
    with tierd.open(cfg) as s:
        assert s.keys() == ["ckpt/0", "ckpt/1", "ckpt/2", "ckpt/3", "ckpt/bytes", "ckpt/empty"]
        for i in range(4):
            assert torch.equal(s.get(f"ckpt/{i}"), _tensor(i))
            assert s.info(f"ckpt/{i}").durable
        assert s.get("ckpt/bytes") == b"durable bytes"
        assert s.get("ckpt/empty").shape == (0, 3)
        assert s.stats()["nvme"].used_bytes > 0
        for k in s.keys():
            s.delete(k)
        # The volatile nvme object's extents were never in the durable index:
        # they were free from the moment the store reopened.
        assert s.stats()["nvme"].used_bytes == 0


def test_namespace_default_durable(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir, namespaces={"ckpt": {"durable": True, "codec": "zstd"}})
    with tierd.open(cfg) as s:
        s.put("ckpt/a", _tensor(1))
        info = s.info("ckpt/a")
        assert info.durable and info.codec == "zstd"
    with tierd.open(cfg) as s:
        assert torch.equal(s.get("ckpt/a"), _tensor(1))


_WRITER = textwrap.dedent(
    """
    import sys, torch, tierd
    sys.path.insert(0, {tests!r})
    from conftest import flip_byte, small_config
    store = tierd.open(small_config({path!r}, host="16MiB", nvme="128MiB"))
    store.put("tmp/volatile", torch.ones(1000))
    i = 0
    while True:
        key = f"d/{{i % 40}}"
        store.put(key, torch.arange(30_000 + i, dtype=torch.int64) * 7 + i, durable=True,
                  codec="zstd" if i % 2 else "none")
        print(f"ACK {{key}} {{i}}", flush=True)
        if i % 5 == 4:
            store.delete(f"d/{{(i - 2) % 40}}")
            print(f"DEL d/{{(i - 2) % 40}}", flush=True)
        i += 1
    """
)


@pytest.mark.parametrize("kill_after", [3, 17, 60])
def test_kill_9_loses_no_acknowledged_durable_object(nvme_dir: Path, kill_after: int) -> None:
    tests = str(Path(__file__).parent)
    code = _WRITER.format(tests=tests, path=str(nvme_dir))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    expected: dict[str, int] = {}
    last = -1
    deleting: str | None = None  # a delete in flight at the kill may or may not land

    def record(line: str) -> None:
        nonlocal last, deleting
        word, key, *rest = line.split()
        if word == "ACK":
            expected[key] = last = int(rest[0])
            deleting = f"d/{(last - 2) % 40}" if last % 5 == 4 else None
        else:
            expected.pop(key, None)
            deleting = None

    for line in proc.stdout:
        record(line)
        if last + 1 >= kill_after:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    for line in proc.stdout:  # lines printed before the kill landed are acknowledged too
        record(line)

    def value(i: int) -> torch.Tensor:
        return torch.arange(30_000 + i, dtype=torch.int64) * 7 + i

    in_flight_key, in_flight_i = f"d/{(last + 1) % 40}", last + 1
    with tierd.open(small_config(nvme_dir, host="16MiB", nvme="128MiB")) as s:
        assert not s.exists("tmp/volatile")
        for key, i in expected.items():
            if key == deleting and not s.exists(key):
                continue
            got = s.get(key)
            # The unacknowledged put in flight at the kill may or may not have landed.
            assert torch.equal(got, value(i)) or (key == in_flight_key and torch.equal(got, value(in_flight_i))), key
        # Nothing deleted comes back; only the in-flight put may add a key.
        assert set(s.keys("d/")) - set(expected) <= {in_flight_key}


def test_flipped_byte_raises_corrupt_object(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir)
    with tierd.open(cfg) as s:
        s.put("c/x", _tensor(3, 400_000), durable=True)
        loc = s.engine.locations("c/x")["nvme"]
        assert loc is not None
        chunk = loc.chunks[-1]
        slab = s.engine.nvme.slab_file(chunk.slab)
    with open(slab, "r+b") as fh:
        fh.seek(chunk.offset + 17)
        b = fh.read(1)
        fh.seek(chunk.offset + 17)
        fh.write(bytes([b[0] ^ 1]))
    with tierd.open(cfg) as s:
        with pytest.raises(tierd.CorruptObject, match="checksum mismatch"):
            s.get("c/x")
        assert s.info("c/x").tier == "nvme"  # nothing corrupt was promoted


@pytest.mark.parametrize("through", ["embedded", "daemon"])
def test_a_corrupt_block_is_a_reported_miss_in_a_batch(nvme_dir: Path, through: str) -> None:
    cfg = small_config(nvme_dir)
    blocks = {f"c/{i}": _tensor(i, 100_000) for i in range(3)}
    with tierd.open(cfg) as s:
        s.put_many(blocks, durable=True)
        chunk = s.engine.locations("c/1")["nvme"].chunks[0]
        slab = s.engine.nvme.slab_file(chunk.slab)
    flip_byte(slab, chunk.offset + 99, 4)
    # Shared: the daemon then reads the keys as the embedded store wrote them (no uid scope).
    daemon = Daemon(nvme_dir, namespaces={"c": {"shared": True}}).start() if through == "daemon" else None
    try:
        with (daemon.connect() if daemon is not None else tierd.open(cfg)) as s:
            got = s.get_many(["c/0", "c/1", "c/2"])
            assert got[1] is None and isinstance(got.errors["c/1"], tierd.CorruptObject)  # a miss, reported
            assert torch.equal(got[0], blocks["c/0"]) and torch.equal(got[2], blocks["c/2"])  # the others served
            assert list(got.errors) == ["c/1"]
    finally:
        if daemon is not None:
            daemon.close()


def test_tiny_nvme_fills_up_with_out_of_space_and_keeps_everything(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir, host="4MiB", nvme="8MiB")
    stored: dict[str, torch.Tensor] = {}
    with tierd.open(cfg) as s:
        with pytest.raises(tierd.OutOfSpace, match="full|no room"):
            for i in range(100):
                t = torch.full((1 << 20,), i, dtype=torch.uint8)
                s.put(f"f/{i}", t)
                stored[f"f/{i}"] = t
        assert len(stored) >= 10  # host + nvme held about 12 MiB
        failed = f"f/{len(stored)}"
        assert not s.exists(failed)
        for k, t in stored.items():
            assert torch.equal(s.get(k), t), k
        # Overwriting with something too large keeps the old value.
        with pytest.raises(tierd.OutOfSpace):
            s.put("f/0", torch.zeros(64 << 20, dtype=torch.uint8))
        assert torch.equal(s.get("f/0"), stored["f/0"])


def test_full_disk_is_out_of_space(tmp_path: Path) -> None:
    """A real filesystem that fills up (a loop-free stand-in: a tiny tmpfs needs root)."""
    if os.geteuid() != 0 or subprocess.run(["which", "mount"], capture_output=True).returncode:
        pytest.skip("mounting a tiny tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        cfg = small_config(mnt, host="1MiB", nvme="64MiB")
        cfg["tiers"]["nvme"]["slab_size"] = "2MiB"
        kept: dict[str, torch.Tensor] = {}
        with tierd.open(cfg) as s:
            with pytest.raises(tierd.OutOfSpace, match="disk .* is full|full"):
                for i in range(40):
                    t = torch.full((700_000,), i, dtype=torch.uint8)
                    s.put(f"d/{i}", t, tier="nvme")
                    kept[f"d/{i}"] = t
            for k, t in kept.items():
                assert torch.equal(s.get(k), t)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_second_store_on_same_directory_is_refused(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir)
    with tierd.open(cfg):
        with pytest.raises(tierd.TierdError, match="in use"):
            tierd.open(cfg)
