from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tierd.config import load_config
from tierd.errors import ConfigError
from tierd.units import parse_size


@pytest.mark.parametrize(
    ("text", "n"),
    [("8GiB", 8 << 30), ("512 MiB", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096), (4096, 4096), ("10KB", 10_000)],
)
def test_parse_size(text: str | int, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["8 gigs", "GiB", "-1", "1..2GiB", True, [0], {"a": 1}, None])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)  # type: ignore[arg-type]


def test_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = load_config()
    ram = psutil.virtual_memory().total
    assert cfg.tiers.host.size == min(ram // 4, 8 << 30)
    assert cfg.tiers.nvme.path == str(tmp_path / "tierd")
    free = psutil.disk_usage(str(tmp_path)).free
    assert cfg.tiers.nvme.size == min(2 * cfg.tiers.host.size, free // 10)


def test_toml_file_and_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "tierd.toml"
    f.write_text(
        f"""
        [tiers.host]
        size = "64MiB"
        [tiers.nvme]
        path = "{tmp_path / 'n'}"
        size = "1GiB"
        [namespaces.kv_cache]
        codec = "zstd"
        """
    )
    env = {"TIERD_TIERS_HOST_SIZE": "32MiB", "TIERD_NAMESPACES_KV_CACHE_DURABLE": "true",
           "TIERD_TIERS_NVME_IO_THREADS": "3", "TIERD_SOCKET": "/ignored"}
    cfg = load_config(f, env=env)
    assert cfg.tiers.host.size == 32 << 20
    assert cfg.tiers.nvme.size == 1 << 30 and cfg.tiers.nvme.io_threads == 3
    ns = cfg.namespace("kv_cache")
    assert ns.codec == "zstd" and ns.durable is True
    assert cfg.namespace("other").codec == "none"


@pytest.mark.parametrize(
    ("raw", "env", "match"),
    [
        ({"tiers": {"host": {"sise": "1GiB"}}}, {}, "unknown config key 'tiers.host.sise'"),
        ({"tiers": {"host": {"size": "8 gigs"}}}, {}, "tiers.host.size: unknown size unit"),
        ({"tiers": {"host": {"size": "100TiB"}}}, {}, "tiers.host.size is .* RAM"),
        ({"tiers": {"nvme": {"path": "/proc/tierd-cannot"}}}, {}, "tiers.nvme.path .* cannot be created"),
        ({"tiers": {"nvme": {"direct": "maybe"}}}, {}, "tiers.nvme.direct"),
        ({"namespaces": {"kv": {"codec": "lzma"}}}, {}, "namespaces.kv.codec"),
        ({}, {"TIERD_TIERS_HOST_SIZ": "1GiB"}, "TIERD_TIERS_HOST_SIZ names no config key"),
        ({}, {"TIERD_TIERS_HOST": "1GiB"}, "names a section"),
        ({"tiers": {"host": {"high_watermark": 0.5, "low_watermark": 0.8}}}, {}, "watermarks"),
        ({"tiers": {"nvme": {"chunk_size": 1000}}}, {}, "tiers.nvme.chunk_size must be a multiple of 4 KiB"),
        ({"tiers": {"host": {"numa_node": 4096}}}, {}, "tiers.host.numa_node: NUMA node 4096 does not exist"),
        ({"tiers": {"host": {"numa_node": 0, "size": 1}}}, {"TIERD_TIERS_HOST_SIZE": "100TiB"}, "tiers.host.size"),
        ({"tiers": {"cxl": {"node": 4096, "size": "1GiB"}}}, {}, "tiers.cxl.node: NUMA node 4096 does not exist"),
        ({"tiers": {"cxl": {"node": [0, 4096], "size": "1GiB"}}}, {}, "tiers.cxl.node: NUMA node 4096"),
        ({"tiers": {"cxl": {"node": 0, "size": "1000TiB"}}}, {}, r"tiers.cxl.size is .* but NUMA node\(s\) 0 hold"),
        ({"tiers": {"cxl": {"devdax": "/dev/dax-missing", "size": "1GiB"}}}, {},
         "tiers.cxl.devdax: '/dev/dax-missing' does not exist"),
        ({"tiers": {"cxl": {"devdax": "/dev/null", "size": "1GiB"}}}, {}, "tiers.cxl.devdax: .*sysfs gives no size"),
        ({"tiers": {"cxl": {"node": 0, "devdax": "/dev/dax0.0", "size": "1GiB"}}}, {}, "set node or devdax, not both"),
        ({"tiers": {"cxl": {"node": "two", "size": "1GiB"}}}, {}, "tiers.cxl.node"),
        ({}, {"TIERD_TIERS_CXL_NODE": "0,x", "TIERD_TIERS_CXL_SIZE": "1GiB"}, "tiers.cxl.node: expected node numbers"),
        ({"tiers": {"cxl": {"node": 0, "size": "-1"}}}, {}, "tiers.cxl.size"),
        ({"tiers": {"cxl": {"node": 0, "size": "1MiB", "low_watermark": 0.9, "high_watermark": 0.5}}}, {},
         "tiers.cxl watermarks"),
        ({"namespaces": {"kv": {"tier": "cxl"}}}, {}, "namespaces.kv.tier is 'cxl' but the cxl tier is off"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, raw: dict, env: dict, match: str) -> None:
    raw.setdefault("tiers", {}).setdefault("nvme", {}).setdefault("path", str(tmp_path))
    with pytest.raises(ConfigError, match=match):
        load_config(raw, env=env)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[tiers.host\nsize=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_hugepages_without_reserved_pages_is_a_config_error(tmp_path: Path) -> None:
    import tierd

    try:
        reserved = int(Path("/proc/sys/vm/nr_hugepages").read_text())
    except OSError:
        reserved = -1
    if reserved != 0:
        pytest.skip("this machine has huge pages reserved (or does not say)")
    cfg = {"tiers": {"host": {"size": "64MiB", "hugepages": True}, "nvme": {"path": str(tmp_path), "size": "64MiB"}}}
    with pytest.raises(ConfigError, match="tiers.host.hugepages: .* reserve huge pages"):
        tierd.open(cfg)


def test_tierd_variables_that_are_not_config_keys_are_left_alone() -> None:
    # Each TIERD_* name the code reads for itself (not a config override) must not be parsed as a key:
    # TIERD_BENCH_DIR once made `tierd bench` fail three suites with "names no config key".
    import re

    from tierd.config import _ENV_NOT_CONFIG

    root = Path(__file__).resolve().parent.parent
    used = set()
    for path in [*(root / "tierd").rglob("*.py"), *(root / "bench").rglob("*.py")]:
        used |= set(re.findall(r"\"(TIERD_[A-Z0-9_]+)\"", path.read_text()))
    assert used, "the scan found no TIERD_ variables at all"
    for var in sorted(used):
        try:
            load_config(env={var: "1"})
        except ConfigError as exc:
            assert var not in _ENV_NOT_CONFIG and "names no config key" not in str(exc), (var, str(exc))
    load_config(env={"TIERD_BENCH_DIR": "/tmp/bench", "TIERD_CHECKPOINT_BARRIER_S": "3"})
