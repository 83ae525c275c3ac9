from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tierd.tiers.alloc import ExtentAllocator

BLOCK = 4096

# An operation: ("alloc", nbytes) or ("free", index into the live list).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("alloc"), st.integers(1, 300_000)),
        st.tuples(st.just("free"), st.integers(0, 1000)),
    ),
    max_size=300,
)


def _check_invariants(a: ExtentAllocator, live: dict[int, int]) -> None:
    spans = sorted([(o, a.extent_bytes(o), "used") for o in live] + [(o, n, "free") for o, n in a.free_extents()])
    pos = 0
    for offset, length, _ in spans:
        assert offset == pos, "extents overlap or leave a hole"
        assert offset % BLOCK == 0 and length % BLOCK == 0
        pos += length
    assert pos == a.capacity_bytes, "space leaked"
    frees = a.free_extents()
    for (o1, n1), (o2, _) in zip(frees, frees[1:], strict=False):
        assert o1 + n1 < o2, "adjacent free extents were not coalesced"
    assert a.used_bytes == sum(a.extent_bytes(o) for o in live)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_no_overlap_no_leak_and_full_coalescing(operations: list[tuple[str, int]]) -> None:
    a = ExtentAllocator(8 << 20, block=BLOCK)
    live: dict[int, int] = {}
    for op, arg in operations:
        if op == "alloc":
            off = a.alloc(arg)
            if off is None:
                assert a.largest_free_bytes() < -(-arg // BLOCK) * BLOCK, "refused although a free extent fits"
            else:
                assert off not in live
                live[off] = arg
                assert a.extent_bytes(off) >= arg
        elif live:
            off = list(live)[arg % len(live)]
            del live[off]
            a.free(off)
        _check_invariants(a, live)
    for off in list(live):
        a.free(off)
    assert a.free_extents() == [(0, a.capacity_bytes)]
    assert a.stats().fragmentation == 0.0


def test_mixed_sizes_stay_unfragmented() -> None:
    """A long random mix of sizes keeps most free space in large extents."""
    rng = random.Random(0)
    a = ExtentAllocator(256 << 20)
    live: list[int] = []
    sizes = [4096, 64 << 10, 1 << 20, 4 << 20, 300_000]
    for _ in range(20_000):
        if live and (rng.random() < 0.5 or a.free_bytes < (8 << 20)):
            a.free(live.pop(rng.randrange(len(live))))
        else:
            off = a.alloc(rng.choice(sizes))
            if off is not None:
                live.append(off)
    st_ = a.stats()
    assert st_.free_bytes > 0
    # Not a speed claim: a bound on how scattered the free space became.
    assert st_.largest_free_bytes >= 4 << 20


def test_reserve_and_errors() -> None:
    a = ExtentAllocator(1 << 20)
    a.reserve(8192, 5000)
    assert a.extent_bytes(8192) == 8192
    with pytest.raises(ValueError, match="not free"):
        a.reserve(12288, 10)
    with pytest.raises(ValueError, match="no allocated extent"):
        a.free(4096)
    a.free(8192)
    assert a.free_extents() == [(0, 1 << 20)]


def test_fragmentation_is_reported() -> None:
    a = ExtentAllocator(64 * BLOCK)
    offs = [a.alloc(BLOCK) for _ in range(64)]
    for off in offs[::2]:
        a.free(off)  # 32 single-block holes
    s = a.stats()
    assert s.free_extents == 32
    assert s.largest_free_bytes == BLOCK
    assert s.fragmentation == pytest.approx(1 - 1 / 32)
