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

Needs pytest (``pip install 'tierd[test]'``); ``import tierd`` never imports it.
"""

from tierd._optional import require

require("pytest", needed_by="tierd.testing")

from tierd.testing.store import StoreTests, same_bits, sample, wait_until  # noqa: E402
from tierd.testing.tiers import TierTests, payload  # noqa: E402

__all__ = ["StoreTests", "TierTests", "payload", "sample", "same_bits", "wait_until"]
