"""Contract test suites for tiers and stores, for tierd's own tests and for third parties.

A new tier (a ``tierd.tiers.base.Tier``) or anything offering the Store
interface (a wrapper, an integration's backend) runs the same contract as
tierd's own::

    from tierd.testing import StoreTests, TierTests

    class TestMyTier(TierTests):
        @pytest.fixture
        def tier(self, tmp_path): ...
        def backdoor_read(self, tier, location) -> bytes: ...   # read the medium without the tier

    class TestMyStore(StoreTests):
        @pytest.fixture
        def store(self, tmp_path): ...

The contract suites need pytest (``pip install 'tierd[test]'``), imported
when one of them is first named; ``import tierd`` never imports it, and
``tierd.testing.redis`` (real Redis servers and clusters, also for the
benchmarks and examples) works without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["StoreTests", "TierTests", "payload", "sample", "same_bits", "wait_until"]

_FROM = {"StoreTests": "store", "same_bits": "store", "sample": "store", "wait_until": "store",
         "TierTests": "tiers", "payload": "tiers"}


def __getattr__(name: str) -> Any:
    """The suites and helpers, imported on first use (PEP 562): only they need pytest."""
    where = _FROM.get(name)
    if where is None:
        raise AttributeError(f"module 'tierd.testing' has no attribute {name!r}")
    import importlib

    from tierd._optional import require

    require("pytest", needed_by="tierd.testing")
    value = getattr(importlib.import_module(f"tierd.testing.{where}"), name)
    globals()[name] = value
    return value
