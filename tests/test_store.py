from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import small_config
from daemon import Daemon

import tierd
from tierd.clients.gpu import GpuTierStore
from tierd.testing import StoreTests
from tierd.tiers.gpu import GpuTier


class TestEmbeddedStore(StoreTests):
    @pytest.fixture
    def store(self, nvme_dir: Path) -> Iterator[tierd.Store]:
        with tierd.open(small_config(nvme_dir, host="32MiB", nvme="256MiB")) as s:
            yield s


class TestGpuTierStore(StoreTests):
    """The gpu-tier wrapper (what tierd.open() returns with a gpu budget), its tier on the CPU."""

    @pytest.fixture
    def store(self, nvme_dir: Path) -> Iterator[tierd.Store]:
        with GpuTierStore(tierd.open(small_config(nvme_dir, host="32MiB", nvme="256MiB")),
                          GpuTier("cpu", 4 << 20)) as s:
            yield s

    def test_passes_through_what_the_store_below_has(self, store: tierd.Store) -> None:
        assert isinstance(store, GpuTierStore)
        assert store.config is store.below.config and store.engine is store.below.engine
        assert not hasattr(store, "daemon_pid")  # an embedded store has none, so neither does its wrapper
        with pytest.raises(AttributeError, match="EmbeddedStore below the gpu tier has no 'uid'"):
            _ = store.uid


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    daemon = Daemon(tmp_path_factory.mktemp("nvme"), host="32MiB", nvme="256MiB").start()
    try:
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.log.read_text()
        daemon.close()


class TestDaemonStore(StoreTests):
    """The same contract through a real daemon process and its socket."""

    @pytest.fixture
    def store(self, shared_daemon: Daemon) -> Iterator[tierd.Store]:
        with shared_daemon.connect() as s:
            yield s
        with shared_daemon.connect() as cleanup:  # the next test starts from an empty daemon
            for key in cleanup.keys():
                cleanup.delete(key)
