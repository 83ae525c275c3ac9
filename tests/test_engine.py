"""Engine invariants that the Store API cannot steer precisely: leases against retirement."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import small_config

import tierd
from tierd._buffers import tensor_bytes


@pytest.mark.parametrize("then", ["overwrite", "delete", "demote"])
def test_a_lease_taken_before_retirement_still_reads_its_version(nvme_dir: Path, then: str) -> None:
    with tierd.open(small_config(nvme_dir)) as s:
        old = torch.full((1 << 20,), 7, dtype=torch.uint8)
        s.put("e/x", old)
        engine = s.engine
        lease = engine.acquire("e/x")  # leased, not read yet
        try:
            if then == "overwrite":
                s.put("e/x", torch.full((1 << 20,), 9, dtype=torch.uint8))
            elif then == "delete":
                s.delete("e/x")
            else:
                s.move("e/x", "nvme")
            # Its copies wait in the record's graveyard until the lease ends: same bytes, still readable.
            out = torch.empty(1 << 20, dtype=torch.uint8)
            lease.read_into(tensor_bytes(out))
            assert torch.equal(out, old)
        finally:
            lease.release()
        assert s.stats()["host"].used_bytes <= (1 << 20 if then == "overwrite" else 0) + 4096
