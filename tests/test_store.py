from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


class _SingleCallsOnly(tierd.Store):
    """A third-party store: the single calls only (over an embedded one); batches come from Store's defaults."""

    def __init__(self, inner: tierd.Store) -> None:
        super().__init__()
        self.inner = inner

    def put(self, key: str, value: Any, **kw: Any) -> None:
        self.inner.put(key, value, **kw)

    def get(self, key: str, **kw: Any) -> Any:
        return self.inner.get(key, **kw)

    def prefetch(self, keys: Any, **kw: Any) -> None:
        self.inner.prefetch(keys, **kw)

    def declare_schedule(self, keys: Any, **kw: Any) -> None:
        self.inner.declare_schedule(keys, **kw)

    def move(self, key: str, tier: str) -> None:
        self.inner.move(key, tier)

    def delete(self, key: str) -> bool:
        return self.inner.delete(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def info(self, key: str) -> Any:
        return self.inner.info(key)

    def keys(self, prefix: str = "") -> list[str]:
        return self.inner.keys(prefix)

    def stats(self) -> Any:
        return self.inner.stats()

    def close(self) -> None:
        super().close()
        self.inner.close()


class TestStoreDefaults(StoreTests):
    """The whole contract on a store that implements only the abstract calls: the defaults hold it."""

    @pytest.fixture
    def store(self, nvme_dir: Path) -> Iterator[tierd.Store]:
        with _SingleCallsOnly(tierd.open(small_config(nvme_dir, host="32MiB", nvme="256MiB"))) as s:
            yield s

    def test_stage_reserves_arena_space_until_released(self, store: tierd.Store) -> None:
        assert store.stage(1 << 20) is None  # no arena of its own: the caller stages in its memory


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
