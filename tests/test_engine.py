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


def test_a_reservation_gives_its_room_back_unless_committed(nvme_dir: Path) -> None:
    from tierd.engine import ObjectMeta
    from tierd.errors import InvalidArgument, NotFound

    with tierd.open(small_config(nvme_dir)) as s:
        engine = s.engine
        meta = ObjectMeta("bytes", "uint8", (1 << 20,), 1)
        with engine.reserve("e/r", 1 << 20, meta) as res:
            assert res.view is not None and res.offset is not None and res.offset % 4096 == 0
            assert s.stats()["host"].used_bytes >= 1 << 20
        # Left without commit: the room is back and nothing was stored.
        assert s.stats()["host"].used_bytes == 0
        with pytest.raises(NotFound):
            s.get("e/r")
        res = engine.reserve("e/r", 1 << 20, meta)
        view = res.view
        assert view is not None
        view.fill_(5)
        res.commit()
        with pytest.raises(InvalidArgument, match="committed or aborted"):
            res.commit()
        res.abort()  # after commit: nothing to give back, and the object stays
        assert s.get("e/r") == bytes([5]) * (1 << 20)


def test_a_lease_is_released_once(nvme_dir: Path) -> None:
    with tierd.open(small_config(nvme_dir)) as s:
        s.put("e/l", b"x" * 10000)
        lease = s.engine.acquire("e/l")
        assert lease.meta.shape == (10000,) and lease.on("host") and lease.host_offset() is not None
        lease.release()
        lease.release()  # a second release must not end someone else's lease
        with s.engine.lease("e/l") as other:
            s.delete("e/l")
            out = bytearray(10000)
            other.read_into(memoryview(out))  # deleted, but this lease still reads its version
            assert bytes(out) == b"x" * 10000
        assert s.stats()["host"].used_bytes == 0  # freed when the last lease ended
