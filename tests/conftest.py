from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tierd.testing.redis import RedisCluster, RedisServer


def small_config(path: Path, *, host: str = "64MiB", nvme: str = "256MiB", **extra: Any) -> dict[str, Any]:
    """A config with small tiers under ``path``; ``extra`` merges into the top level."""
    cfg: dict[str, Any] = {
        "tiers": {
            "host": {"size": host},
            "nvme": {"path": str(path), "size": nvme, "slab_size": "64MiB", "chunk_size": "1MiB"},
        }
    }
    for key, value in extra.items():
        cfg[key] = value
    return cfg


def flip_byte(path: Path, offset: int, mask: int = 0x40) -> None:
    """Corrupt one byte of a file in place (what a bad sector or a stray write does)."""
    with open(path, "r+b") as fh:
        fh.seek(offset)
        b = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([b[0] ^ mask]))


@pytest.fixture
def nvme_dir(tmp_path: Path) -> Path:
    d = tmp_path / "nvme"
    d.mkdir()
    return d


@pytest.fixture
def daemon(nvme_dir: Path) -> Iterator[Any]:
    """A real ``tierd serve`` (32 MiB host tier, nvme under ``nvme_dir``), killed after the test."""
    from daemon import Daemon

    d = Daemon(nvme_dir).start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture(autouse=True)
def _no_user_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # A developer's TIERD_* variables must not change what the tests see.
    import os

    for var in list(os.environ):
        if var.startswith("TIERD_"):
            monkeypatch.delenv(var)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server of the test's own."""
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def _session_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture
def redis_cluster(_session_cluster: RedisCluster) -> RedisCluster:
    """A real 3-primary, 3-replica Redis Cluster, shared by the session and emptied for each test.
    A test that kills nodes starts a :class:`RedisCluster` of its own."""
    _session_cluster.wait_ok()
    _session_cluster.flush()
    return _session_cluster


@pytest.fixture(params=["server", "cluster"])
def redis_any(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer | RedisCluster]:
    """Each remote-tier test twice: on one redis-server, then on a Redis Cluster (``.cluster`` says which)."""
    if request.param == "cluster":
        yield request.getfixturevalue("redis_cluster")
        return
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
