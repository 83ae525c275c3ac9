from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import small_config
from store_suite import StoreTests

import tierd


class TestEmbeddedStore(StoreTests):
    @pytest.fixture
    def store(self, nvme_dir: Path) -> Iterator[tierd.Store]:
        with tierd.open(small_config(nvme_dir, host="32MiB", nvme="256MiB")) as s:
            yield s
