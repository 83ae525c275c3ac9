"""The cxl tier and NUMA binding, with real mbind(2) and real placement read back from the kernel.

This machine has no CXL memory: its one NUMA node (node 0) has CPUs. The
tier is bound to node 0 here, which the config allows with a warning; the
code path (memfd, mbind, fallocate, numa_maps) is the one a CPU-less node
takes. Discovery is also tested on a fake sysfs tree.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config
from daemon import Daemon

import tierd
from tierd.doctor import run_checks
from tierd.errors import ConfigError
from tierd.testing import TierTests
from tierd.tiers.cxl import CxlTier, cpuless_nodes, dax_device, dax_devices
from tierd.tiers.host import HostLocation, HostTier
from tierd.tiers.numa import NODE_ROOT, mapping_placement, numa_nodes, parse_cpulist

MIB = 1 << 20


def cxl_config(nvme_dir: Path, *, host: str = "4MiB", cxl: str = "8MiB", **cxl_keys: Any) -> dict[str, Any]:
    cfg = small_config(nvme_dir, host=host)
    cfg["tiers"]["cxl"] = {"node": 0, "size": cxl, **cxl_keys}
    return cfg


def _blob(i: int, n: int = MIB) -> torch.Tensor:
    return torch.full((n,), i % 251, dtype=torch.uint8)


# -- the tier contract and placement -----------------------------------------------


class TestCxlTier(TierTests):
    @pytest.fixture
    def tier(self) -> Iterator[CxlTier]:
        t = CxlTier(16 * MIB, nodes=[0])
        yield t
        t.close()

    def backdoor_read(self, tier: Any, location: HostLocation) -> bytes:
        return os.pread(tier.fd, location.nbytes, location.offset)  # the memfd, not the mapping


def test_cxl_arena_pages_are_on_the_bound_node() -> None:
    tier = CxlTier(8 * MIB, nodes=[0])
    try:
        placement = tier.placement()
        assert placement is not None and placement.policy == "bind:0"
        loc = tier.write(torch.ones(4 * MIB, dtype=torch.uint8), codec=tierd.codecs.get_codec("none"), itemsize=1,
                         durable=False)
        placement = tier.placement()
        assert placement is not None
        # Every page we wrote is resident, and on node 0 only.
        assert placement.nodes == (0,)
        assert placement.pages[0] * placement.page_bytes >= 4 * MIB
        # fallocate reserved the whole arena at start: the memfd holds all of it already.
        assert os.fstat(tier.fd).st_blocks * 512 >= 8 * MIB
        tier.free(loc)
    finally:
        tier.close()


def test_host_numa_node_binds_the_memfd_for_every_mapping() -> None:
    host = HostTier(4 * MIB, numa_node=0)
    try:
        # A daemon client maps the same memfd: the binding is the file's, so its mapping follows it too.
        client = mmap.mmap(host.fd, 4 * MIB, flags=mmap.MAP_SHARED)
        try:
            client[: 2 * MIB] = b"\x01" * (2 * MIB)
            address = torch.frombuffer(client, dtype=torch.uint8).data_ptr()
            placement = mapping_placement(address)
            assert placement is not None and placement.policy == "bind:0"
            assert placement.nodes == (0,) and placement.pages[0] * placement.page_bytes >= 2 * MIB
        finally:
            client.close()
        unbound = HostTier(MIB)
        placement = unbound.placement()
        assert placement is not None and placement.policy == "default"
        unbound.close()
    finally:
        host.close()


def test_binding_to_a_node_the_kernel_refuses_is_a_config_error() -> None:
    missing = max(numa_nodes(), default=0) + 1
    with pytest.raises(ConfigError, match=rf"tiers.cxl.node: .* NUMA node\(s\) \[{missing}\]"):
        CxlTier(MIB, nodes=[missing])
    with pytest.raises(ConfigError, match="tiers.host.numa_node"):
        HostTier(MIB, numa_node=missing)


# -- discovery -----------------------------------------------------------------------


def test_discovery_on_this_machine() -> None:
    nodes = numa_nodes()
    assert 0 in nodes and nodes[0].mem_total_bytes > 0
    # Independently of the parser: a node is CPU-less exactly when its cpulist file is empty.
    empty = {n for n in nodes if not (NODE_ROOT / f"node{n}" / "cpulist").read_text().strip()}
    assert {n.id for n in cpuless_nodes()} == {n for n in empty if nodes[n].mem_total_bytes}
    assert set(os.sched_getaffinity(0)) <= {c for n in nodes.values() for c in n.cpus}
    if not empty:  # this CI machine: node 0 has the CPUs, there is no CXL memory
        assert cpuless_nodes() == []
    assert dax_devices() == [d for d in dax_devices() if d.path.startswith("/dev/dax")]


def _fake_sysfs(root: Path) -> tuple[Path, Path, Path]:
    node_root = root / "sys/devices/system/node"
    for name, cpus, total_kb in (("node0", "0-3,8", 16 << 20), ("node1", "\n", 64 << 20), ("node2", "", 0)):
        d = node_root / name
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpus)
        (d / "meminfo").write_text(f"Node {name[4:]} MemTotal:  {total_kb} kB\nNode {name[4:]} MemFree:   {total_kb // 2} kB\n"
                                   f"Node {name[4:]} HugePages_Total:     0\n")
    (node_root / "possible").write_text("0-2\n")
    (node_root / "power").mkdir()
    dev = root / "dev"
    dev.mkdir()
    (dev / "dax0.0").write_text("")  # stands in for the character device
    (dev / "dax1.0").write_text("")  # no sysfs entry: skipped
    dax_sys = root / "sys/bus/dax/devices/dax0.0"
    dax_sys.mkdir(parents=True)
    (dax_sys / "size").write_text(str(32 << 30))
    (dax_sys / "align").write_text(str(1 << 30))
    return node_root, dev, root / "sys"


def test_discovery_parses_a_fake_sysfs_tree(tmp_path: Path) -> None:
    node_root, dev, sys_root = _fake_sysfs(tmp_path)
    nodes = numa_nodes(node_root)
    assert sorted(nodes) == [0, 1, 2]
    assert nodes[0].cpus == (0, 1, 2, 3, 8) and not nodes[0].cpuless
    assert nodes[1].cpuless and nodes[1].mem_total_bytes == 64 << 30 and nodes[1].mem_free_bytes == 32 << 30
    assert [n.id for n in cpuless_nodes(node_root)] == [1]  # node2 has no memory either: not a memory tier
    devices = dax_devices(dev, sys_root)
    assert [(Path(d.path).name, d.size_bytes, d.align_bytes) for d in devices] == [("dax0.0", 32 << 30, 1 << 30)]
    with pytest.raises(ValueError, match="sysfs gives no size"):
        dax_device(dev / "dax1.0", sys_root)
    assert numa_nodes(tmp_path / "absent") == {}


@pytest.mark.parametrize(("text", "cpus"), [("0-1", (0, 1)), ("", ()), ("\n", ()), ("0,2-4,7", (0, 2, 3, 4, 7))])
def test_parse_cpulist(text: str, cpus: tuple[int, ...]) -> None:
    assert parse_cpulist(text) == cpus


# -- configuration -------------------------------------------------------------------


def test_config_names_node_or_stays_off(nvme_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="tierd.config"):
        cfg = tierd.load_config(cxl_config(nvme_dir, cxl="16MiB"))
    assert cfg.tiers.cxl.enabled and cfg.tiers.cxl.nodes == (0,)
    assert "NUMA node 0 is not CPU-less" in caplog.text
    # A size without node or devdax: the machine's CPU-less nodes, and here there are none.
    if not cpuless_nodes():
        off = tierd.load_config(cxl_config(nvme_dir, node=None))
        assert not off.tiers.cxl.enabled
    env = {"TIERD_TIERS_CXL_NODE": "0", "TIERD_TIERS_CXL_SIZE": "32MiB"}
    assert tierd.load_config(small_config(nvme_dir), env=env).tiers.cxl.size == 32 * MIB
    assert not tierd.load_config(cxl_config(nvme_dir, cxl="0")).tiers.cxl.enabled


# -- the engine: host -> cxl -> nvme ---------------------------------------------------------


def _fill_and_check(store: tierd.Store, n: int = 24) -> dict[str, str]:
    blobs = {f"chain/{i}": _blob(i) for i in range(n)}  # 24 MiB through a 4 MiB host and an 8 MiB cxl tier
    for key, t in blobs.items():
        store.put(key, t)
    where = {k: store.info(k).tier for k in blobs}
    assert {"host", "cxl", "nvme"} <= set(where.values()), where
    assert where["chain/0"] == "nvme" and where[f"chain/{n - 1}"] == "host"  # the oldest went furthest
    stats = store.stats()
    assert stats["cxl"].demoted_bytes >= 8 * MIB and stats["nvme"].demoted_bytes >= 4 * MIB
    assert 0 < stats["cxl"].objects and stats["cxl"].used_bytes <= stats["cxl"].capacity_bytes
    for key, t in blobs.items():
        assert torch.equal(store.get(key), t), key
    return where


def test_demotion_chain_embedded(nvme_dir: Path) -> None:
    with tierd.open(cxl_config(nvme_dir)) as store:
        where = _fill_and_check(store)
        cxl_key = next(k for k, t in where.items() if t == "cxl")
        store.delete(f"chain/{len(where) - 1}")  # make room on host
        store.move(cxl_key, "cxl")
        store.get(cxl_key)
        assert store.info(cxl_key).tier == "host"  # promoted by the get
        assert store.stats()["cxl"].hits >= 1
        placement = store.engine.cxl.placement()  # type: ignore[attr-defined]
        assert placement is not None and placement.policy == "bind:0" and placement.nodes == (0,)


def test_put_and_move_to_cxl(nvme_dir: Path) -> None:
    with tierd.open(cxl_config(nvme_dir, host="16MiB")) as store:
        t = torch.randn(256, 256)
        store.put("m/x", t, tier="cxl")
        assert store.info("m/x").tiers == ("cxl",)
        store.move("m/x", "nvme")
        assert store.info("m/x").tiers == ("nvme",)
        store.move("m/x", "cxl")  # promotion from nvme into cxl
        assert store.info("m/x").tiers == ("cxl",)
        store.move("m/x", "host")
        assert store.info("m/x").tiers == ("host",)
        store.move("m/x", "cxl")  # demotion from host into cxl
        assert store.info("m/x").tiers == ("cxl",)
        out = torch.empty_like(t)
        store.get("m/x", out=out)
        assert torch.equal(out, t)
        store.put("m/big", torch.zeros(9 * MIB, dtype=torch.uint8), durable=True)
        with pytest.raises(tierd.OutOfSpace, match="cxl tier has no room"):
            store.move("m/big", "cxl")  # larger than the whole cxl tier
        # Nothing lost on the way.
        assert torch.equal(store.get("m/big"), torch.zeros(9 * MIB, dtype=torch.uint8))


def test_durable_objects_keep_their_nvme_copy_and_survive_a_restart(nvme_dir: Path) -> None:
    t = torch.arange(100_000, dtype=torch.int64)
    with tierd.open(cxl_config(nvme_dir)) as store:
        store.put("ckpt/w", t, durable=True, tier="cxl")
        assert store.info("ckpt/w").tiers == ("cxl", "nvme")
        store.get("ckpt/w")  # promoted: the cxl cache copy moves up, the durable nvme copy stays
        assert store.info("ckpt/w").tiers == ("host", "nvme")
        store.move("ckpt/w", "nvme")
        assert store.info("ckpt/w").tiers == ("nvme",)
    with tierd.open(cxl_config(nvme_dir)) as store:
        assert torch.equal(store.get("ckpt/w"), t)


def test_a_cxl_object_is_read_without_host_room(nvme_dir: Path) -> None:
    with tierd.open(cxl_config(nvme_dir, host="4MiB")) as store:
        store.put("pin/a", torch.zeros(4 * MIB, dtype=torch.uint8), pin=True)  # host full, nothing may leave
        t = _blob(3, 2 * MIB)
        store.put("c/x", t)
        assert store.info("c/x").tier == "cxl"
        assert torch.equal(store.get("c/x"), t)  # copied out of cxl, not promoted
        assert store.info("c/x").tier == "cxl"


def test_metrics_and_doctor_list_the_cxl_tier(nvme_dir: Path) -> None:
    from prometheus_client import generate_latest

    from tierd.daemon.metrics import Metrics

    with tierd.open(cxl_config(nvme_dir)) as store:
        store.put("x/y", torch.ones(10), tier="cxl")
        text = generate_latest(Metrics(store.stats).registry).decode()
        assert 'tierd_tier_capacity_bytes{tier="cxl"} 8.388608e+06' in text
        assert 'tierd_tier_objects{tier="cxl"} 1.0' in text
    checks = {c.name: c for c in run_checks(tierd.load_config(cxl_config(nvme_dir)))}
    assert checks["cxl tier"].status in ("ok", "warn") and "8.0 MiB on NUMA node(s) 0" in checks["cxl tier"].detail
    assert "NUMA node 0" in checks and "CPU-less nodes" in checks["CXL memory"].detail
    assert checks["cxl tier"].status == ("ok" if numa_nodes()[0].cpuless else "warn")


def test_demotion_chain_through_a_daemon(nvme_dir: Path) -> None:
    daemon = Daemon(nvme_dir, host="4MiB", tiers={"cxl": {"node": 0, "size": "8MiB"}}).start()
    try:
        with daemon.connect() as store:
            _fill_and_check(store)
            # The daemon's cxl arena is bound in the daemon: ask the kernel about its mapping there.
            assert daemon.proc is not None
            maps = Path(f"/proc/{daemon.proc.pid}/numa_maps").read_text().splitlines()
            arena = [line for line in maps if "memfd:tierd-cxl" in line]
            assert arena and all(" bind:0 " in line for line in arena)
            assert any(" N0=" in line for line in arena)
            # A get over the socket promotes out of cxl into the host arena the client maps.
            # (Pinned: the background mover, still busy after the scan above, cannot move it first.)
            store.put("p/x", _blob(7), tier="cxl", pin=True)
            hits = store.stats()["cxl"].hits
            assert torch.equal(store.get("p/x"), _blob(7))
            assert store.info("p/x").tier == "host" and store.stats()["cxl"].hits == hits + 1
            store.move("p/x", "nvme")
            assert store.info("p/x").tier == "nvme"
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
        daemon.close()
