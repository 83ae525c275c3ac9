"""Run tierd's Store contract against a store you configured (or wrote): ``tierd.testing``.

    python examples/contract_tests.py        # needs pytest: pip install -e ".[test]"

``StoreTests`` is the suite tierd runs on ``tierd.open()``, ``tierd.connect()``
and its gpu-tier wrapper; ``TierTests`` does the same for a tier. A subclass
gives the fixture and pytest runs every contract test on it. Here the store
is an embedded one whose default namespace compresses everything with zstd
on nvme: the contract (bitwise round trips of every dtype, ``out=``,
eviction without loss, staging, ...) must hold for it too.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator

import pytest

import tierd
from tierd.testing import StoreTests


class TestZstdStore(StoreTests):
    @pytest.fixture
    def store(self) -> Iterator[tierd.Store]:
        with tempfile.TemporaryDirectory() as nvme_dir:
            config = {"tiers": {"host": {"size": "32MiB"}, "nvme": {"path": nvme_dir, "size": "256MiB"}},
                      "namespaces": {"default": {"codec": "zstd"}}}
            with tierd.open(config) as s:
                yield s


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", "-p", "no:cacheprovider"]))
