"""``TierTests``: the contract every tier must keep (see tierd/tiers/base.py).

A subclass provides the ``tier`` fixture and ``backdoor_read(tier, location)``,
which reads the stored bytes from the medium without the class under test.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from tierd.codecs import get_codec
from tierd.errors import OutOfSpace
from tierd.tiers.base import Tier


def payload(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)


class TierTests:
    def backdoor_read(self, tier: Tier, location: Any) -> bytes:
        raise NotImplementedError

    @pytest.mark.parametrize("n", [1, 4095, 4096, 4097, 1 << 20, (3 << 20) + 17])
    def test_round_trip(self, tier: Tier, n: int) -> None:
        src = payload(n, seed=n)
        loc = tier.write(src, codec=get_codec("none"), itemsize=1, durable=False)
        dest = torch.empty(n, dtype=torch.uint8)
        tier.read_into(loc, dest, itemsize=1)
        assert torch.equal(src, dest)
        assert self.backdoor_read(tier, loc) == src.numpy().tobytes()
        tier.free(loc)

    def test_unaligned_source_and_destination(self, tier: Tier) -> None:
        base = payload(3 * 4096 + 100, seed=1)
        src = base[37 : 37 + 2 * 4096 + 11]  # neither start nor length aligned
        loc = tier.write(src, codec=get_codec("none"), itemsize=1, durable=False)
        big = torch.zeros(src.numel() + 64, dtype=torch.uint8)
        tier.read_into(loc, big[5 : 5 + src.numel()], itemsize=1)
        assert torch.equal(big[5 : 5 + src.numel()], src)
        assert int(big[:5].sum()) == 0 and int(big[5 + src.numel() :].sum()) == 0  # no overrun
        tier.free(loc)

    def test_used_bytes_track_writes_and_frees(self, tier: Tier) -> None:
        before = tier.usage().used_bytes
        locs = [tier.write(payload(10_000, s), codec=get_codec("none"), itemsize=1, durable=False) for s in range(5)]
        assert tier.usage().used_bytes >= before + 5 * 10_000
        for loc in locs:
            tier.free(loc)
        usage = tier.usage()
        assert usage.used_bytes == before
        assert usage.fragmentation == 0.0

    def test_full_tier_raises_out_of_space_and_keeps_data(self, tier: Tier) -> None:
        n = tier.capacity_bytes // 4
        stored = []
        with pytest.raises(OutOfSpace):
            for s in range(10):
                src = payload(n, seed=s)
                stored.append((src, tier.write(src, codec=get_codec("none"), itemsize=1, durable=False)))
        assert len(stored) >= 3
        for src, loc in stored:
            dest = torch.empty_like(src)
            tier.read_into(loc, dest, itemsize=1)
            assert torch.equal(src, dest)
            tier.free(loc)

    def test_concurrent_writers(self, tier: Tier) -> None:
        results: dict[int, Any] = {}

        def work(i: int) -> None:
            src = payload(200_000 + i, seed=100 + i)
            results[i] = (src, tier.write(src, codec=get_codec("none"), itemsize=1, durable=False))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for src, loc in results.values():
            dest = torch.empty_like(src)
            tier.read_into(loc, dest, itemsize=1)
            assert torch.equal(src, dest)
            tier.free(loc)
