"""Media faults under a running daemon: the nvme directory made read-only or removed, redis killed.

Each fault must give a clear TierdError naming what broke, leave the daemon
up and serving host-tier objects, and lose nothing it acknowledged.
We run as root, so chmod stops no write: read-only means a real read-only
mount (a bind mount of the directory over itself, remounted ro, the per-mount
flag a filesystem remounted ro after errors also shows).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from daemon import Daemon

import tierd


def _mount(*args: str) -> None:
    res = subprocess.run(["mount", *args], capture_output=True, text=True)
    if res.returncode:
        raise OSError(res.stderr.strip() or f"mount {' '.join(args)} failed")


@pytest.fixture
def writable_mount(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs of our own (so a bind mount of it can be made read-only), or a skip with the reason."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", "size=96m", "tmpfs", str(mnt))
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {exc}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-R", "-l", str(mnt)], capture_output=True)


def _value(i: int, n: int) -> torch.Tensor:
    return torch.full((n,), i, dtype=torch.int32)


def _check_all(s: tierd.RemoteStore, objects: dict[str, torch.Tensor]) -> None:
    for key, t in objects.items():
        assert torch.equal(s.get(key), t), key


def test_nvme_directory_goes_read_only_under_a_running_daemon(writable_mount: Path, fault_report: Any) -> None:
    nvme = writable_mount / "nvme"
    d = Daemon(nvme, host="8MiB", nvme="48MiB").start()
    try:
        durable, volatile, small = {}, {}, {}
        with d.connect() as s:
            for i in range(5):
                durable[f"d/{i}"] = _value(i, 50_000)
                s.put(f"d/{i}", durable[f"d/{i}"], durable=True)
            for i in range(12):  # 12 x 1.2 MiB through an 8 MiB host tier: some now live on nvme
                volatile[f"v/{i}"] = _value(100 + i, 300_000)
                s.put(f"v/{i}", volatile[f"v/{i}"])
            assert any(s.info(k).tier == "nvme" for k in volatile)
            for i in range(10):
                small[f"h/{i}"] = _value(200 + i, 1000)
                s.put(f"h/{i}", small[f"h/{i}"])

            _mount("--bind", str(nvme), str(nvme))
            _mount("-o", "remount,ro,bind", str(nvme))

            with pytest.raises(tierd.MediaError, match=f"nvme tier '{nvme}' is on a read-only filesystem"):
                s.put("d/new", _value(7, 50_000), durable=True)
            with pytest.raises(tierd.MediaError, match="read-only"):
                s.put("v/new", _value(7, 300_000), tier="nvme")
            assert not s.exists("d/new") and not s.exists("v/new")
            # The host tier keeps serving, and everything acknowledged reads back.
            s.put("h/new", _value(9, 1000))
            small["h/new"] = _value(9, 1000)
            _check_all(s, durable | volatile | small)
            assert d.proc is not None and d.proc.poll() is None

            subprocess.run(["umount", str(nvme)], check=True)  # read-write again
            s.put("d/new", _value(7, 50_000), durable=True)
            durable["d/new"] = _value(7, 50_000)
        assert d.stop(signal.SIGTERM) == 0
        d.start()
        with d.connect() as s:
            _check_all(s, durable)  # every acknowledged durable object survived the fault and a restart
        fault_report("media faults", faults=1, acked_objects_checked=len(durable | volatile | small), lost=0)
    finally:
        d.close()


def test_nvme_directory_removed_under_a_running_daemon(nvme_dir: Path, fault_report: Any) -> None:
    d = Daemon(nvme_dir, host="8MiB", nvme="64MiB").start()
    try:
        kept = {}
        with d.connect() as s:
            for i in range(4):
                kept[f"d/{i}"] = _value(i, 50_000)
                s.put(f"d/{i}", kept[f"d/{i}"], durable=True)
            for i in range(10):
                kept[f"v/{i}"] = _value(100 + i, 300_000)
                s.put(f"v/{i}", kept[f"v/{i}"])

            shutil.rmtree(nvme_dir)  # slabs, LOCK and the LMDB index, while the daemon holds them open

            with pytest.raises(tierd.MediaError, match=f"nvme tier '{nvme_dir}': its slab directory is gone"):
                s.put("d/new", _value(7, 50_000), durable=True)
            s.put("h/new", _value(9, 1000))  # the host tier keeps serving
            _check_all(s, kept | {"h/new": _value(9, 1000)})  # acknowledged objects stay readable meanwhile

            (nvme_dir / "slabs").mkdir(parents=True)  # put back empty: the open slab files have no name any more
            with pytest.raises(tierd.MediaError, match="slab file slab-00000 was removed while in use.*restart"):
                s.put("d/new", _value(7, 50_000), durable=True)
            assert d.proc is not None and d.proc.poll() is None
        assert d.stop(signal.SIGTERM) == 0
        d.start()  # a fresh directory: the daemon starts and works again
        with d.connect() as s:
            s.put("d/again", _value(3, 50_000), durable=True)
            assert torch.equal(s.get("d/again"), _value(3, 50_000))
        fault_report("media faults", faults=1, acked_objects_checked=len(kept), lost=0)
    finally:
        d.close()


def test_redis_killed_under_a_running_daemon(nvme_dir: Path, redis_server: Any, fault_report: Any) -> None:
    d = Daemon(nvme_dir, host="8MiB", nvme="64MiB",
               tiers={"remote": {"url": redis_server.url, "timeout_s": 1.0}},
               namespaces={"wt": {"write_through": True}}).start()
    try:
        with d.connect() as s:
            s.put("r/x", _value(1, 100_000), tier="remote")
            s.put("h/x", _value(2, 1000))
            s.put("n/x", _value(3, 100_000), tier="nvme")
            redis_server.stop()  # killed

            with pytest.raises(tierd.MediaError, match="unreachable while reading.*local tiers keep working"):
                s.get("r/x")
            with pytest.raises(tierd.MediaError, match="unreachable while writing"):
                s.put("r/y", _value(4, 100_000), tier="remote")
            s.put("wt/x", _value(5, 100_000))  # write-through: the remote copy is a bonus, the put succeeds
            s.put("n/y", _value(6, 100_000), tier="nvme")
            s.put("h/y", _value(7, 1000))
            for key, i, n in (("h/x", 2, 1000), ("n/x", 3, 100_000), ("wt/x", 5, 100_000), ("n/y", 6, 100_000),
                              ("h/y", 7, 1000)):
                assert torch.equal(s.get(key), _value(i, n)), key
            assert d.proc is not None and d.proc.poll() is None
        fault_report("media faults", faults=1, acked_objects_checked=5, lost=0)
    finally:
        d.close()
