"""``StoreTests``: the Store API contract, run against every way to get a store.

A subclass provides the ``store`` fixture: an empty store with a host tier
of 32 MiB and an nvme tier of 256 MiB or more, as tierd's tests build them
(``tests/conftest.py``: ``small_config(nvme_dir, host="32MiB", nvme="256MiB")``).
tierd runs it against ``tierd.open()``, ``tierd.connect()`` and the gpu-tier
wrapper.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

import tierd

ALL_DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8,
    torch.int16, torch.int32, torch.int64, torch.complex64, torch.complex128,
    *[d for d in (getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64")) if d],
]


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size(),),
                        dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return (raw[: torch.Size(shape).numel()] & 1).bool().reshape(shape)
    n = torch.Size(shape).numel()
    return raw.view(dtype)[:n].reshape(shape).clone()


def wait_until(cond: Callable[[], bool], *, timeout_s: float) -> bool:
    """Poll ``cond`` until it holds or ``timeout_s`` passes; for state with no event to wait on."""
    deadline = time.monotonic() + timeout_s
    tick = threading.Event()
    while not cond():
        if time.monotonic() > deadline:
            return False
        tick.wait(0.01)
    return True


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Bitwise: NaN payloads and -0.0 must survive too.
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


class StoreTests:
    def test_stage_reserves_arena_space_until_released(self, store: tierd.Store) -> None:
        before = store.stats()["host"].used_bytes
        staging = store.stage(3 << 20)
        assert staging is not None
        buf = staging.buffer
        assert buf.dtype == torch.uint8 and buf.numel() == 3 << 20 and buf.data_ptr() % 4096 == 0
        buf.fill_(7)
        store.put("t/after", torch.arange(1 << 18, dtype=torch.int32))  # lands beside it, not on it
        assert bool((buf == 7).all())
        assert store.stats()["host"].used_bytes >= before + (3 << 20)
        assert "staging" not in " ".join(store.keys())  # never committed, never listed
        staging.release()
        staging.release()  # once
        assert wait_until(lambda: store.stats()["host"].used_bytes < before + (3 << 20), timeout_s=10)
        assert store.stage(0) is None

    @pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
    def test_every_dtype_round_trips(self, store: tierd.Store, dtype: torch.dtype) -> None:
        t = sample(dtype, (33, 7), seed=3)
        store.put("t/x", t)
        assert same_bits(store.get("t/x"), t)

    @pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,), (5, 1, 1, 3)])
    def test_odd_shapes(self, store: tierd.Store, shape: tuple[int, ...]) -> None:
        t = sample(torch.float32, shape, seed=1)
        store.put("t/s", t)
        got = store.get("t/s")
        assert same_bits(got, t)
        info = store.info("t/s")
        assert info.shape == shape and info.dtype == "float32"

    def test_non_contiguous_input_comes_back_with_its_shape(self, store: tierd.Store) -> None:
        base = sample(torch.float32, (64, 48), seed=2)
        big = sample(torch.float32, (256, 3, 128), seed=9)[:, 1]  # large and strided: copied into the arena
        store.put("t/big-strided", big)
        assert same_bits(store.get("t/big-strided"), big.contiguous())
        for name, t in {"transposed": base.t(), "strided": base[::3, 1::2], "expanded": base[:1].expand(5, 48)}.items():
            store.put(f"t/{name}", t)
            got = store.get(f"t/{name}")
            assert got.is_contiguous() and same_bits(got, t.contiguous())

    def test_raw_bytes(self, store: tierd.Store) -> None:
        for i, value in enumerate([b"", b"x", bytes(range(256)) * 100, bytearray(b"abc"), memoryview(b"zz")]):
            store.put(f"b/{i}", value)
            assert store.get(f"b/{i}") == bytes(value)
        assert store.info("b/2").dtype == "bytes"

    def test_get_out_fills_in_place(self, store: tierd.Store) -> None:
        t = sample(torch.bfloat16, (128, 64), seed=4)
        store.put("t/o", t)
        out = torch.zeros_like(t)
        ptr = out.data_ptr()
        got = store.get("t/o", out=out)
        assert got is out and out.data_ptr() == ptr and same_bits(out, t)
        with pytest.raises(tierd.InvalidArgument, match="dtype"):
            store.get("t/o", out=torch.zeros(128, 64))
        # A strided out= (a slice of a larger tensor) is filled in place through its strides.
        big = torch.zeros(128, 3, 64, dtype=torch.bfloat16)
        store.get("t/o", out=big[:, 1, :])
        assert same_bits(big[:, 1, :].contiguous(), t) and int(big[:, 0].count_nonzero()) == 0
        with pytest.raises(tierd.InvalidArgument, match="non-contiguous out= must have the object's shape"):
            store.get("t/o", out=torch.zeros(64, 256, dtype=torch.bfloat16)[:, ::2])  # 64 x 128, not 128 x 64

    def test_get_out_from_nvme(self, store: tierd.Store) -> None:
        t = sample(torch.float32, (1000, 333), seed=5)
        store.put("t/on", t, tier="nvme")
        out = torch.empty_like(t)
        store.get("t/on", out=out)
        assert same_bits(out, t)

    def test_overwrite_replaces(self, store: tierd.Store) -> None:
        store.put("t/w", torch.zeros(10))
        store.put("t/w", torch.ones(3, dtype=torch.int64))
        assert torch.equal(store.get("t/w"), torch.ones(3, dtype=torch.int64))
        assert store.keys("t/") == ["t/w"]

    def test_missing_key(self, store: tierd.Store) -> None:
        with pytest.raises(tierd.NotFound, match="no object"):
            store.get("t/none")
        with pytest.raises(KeyError):  # NotFound is a KeyError too
            store.info("t/none")
        assert not store.exists("t/none")
        assert store.delete("t/none") is False

    def test_delete_exists_keys(self, store: tierd.Store) -> None:
        for i in range(5):
            store.put(f"k/{i}", torch.full((4,), i))
        store.put("other/x", torch.zeros(1))
        assert store.keys("k/") == [f"k/{i}" for i in range(5)]
        assert store.delete("k/2") is True
        assert not store.exists("k/2") and store.exists("k/3")
        assert "k/2" not in store.keys()

    @pytest.mark.parametrize("key", ["", "a\x00b", "x" * 1025, 42, "../etc/passwd", "/abs/x", "ns/../x", "ns/.", "é" * 513])
    def test_bad_keys(self, store: tierd.Store, key: object) -> None:
        with pytest.raises(tierd.InvalidArgument):
            store.put(key, torch.zeros(1))  # type: ignore[arg-type]

    def test_bad_values_and_options(self, store: tierd.Store) -> None:
        with pytest.raises(tierd.InvalidArgument, match="torch.Tensor or bytes"):
            store.put("t/bad", [1, 2, 3])  # type: ignore[arg-type]
        with pytest.raises(tierd.InvalidArgument, match="unknown tier"):
            store.put("t/bad", torch.zeros(1), tier="floppy")
        with pytest.raises(tierd.InvalidArgument, match="unknown codec"):
            store.put("t/bad", torch.zeros(1), codec="lzma")
        with pytest.raises(tierd.InvalidArgument, match="sparse|dense"):
            store.put("t/bad", torch.zeros(3, 3).to_sparse())
        assert not store.exists("t/bad")

    @pytest.mark.parametrize("codec", ["none", "zstd", "bytegroup"])
    def test_codecs_on_nvme(self, store: tierd.Store, codec: str) -> None:
        t = (torch.randn(512, 1024) * 0.02).to(torch.bfloat16)
        store.put("c/x", t, tier="nvme", codec=codec)
        info = store.info("c/x")
        assert info.tier == "nvme" and info.codec == codec
        if codec != "none":
            assert info.stored_nbytes < info.nbytes
        assert torch.equal(store.get("c/x"), t)

    def test_move_and_promotion_on_get(self, store: tierd.Store) -> None:
        t = sample(torch.float32, (256, 256), seed=6)
        store.put("m/x", t)
        assert store.info("m/x").tier == "host"
        store.move("m/x", "nvme")
        assert store.info("m/x").tier == "nvme"
        assert same_bits(store.get("m/x"), t)
        assert store.info("m/x").tier == "host"  # promoted by the get
        with pytest.raises(tierd.InvalidArgument):
            store.move("m/x", "tape")

    def test_prefetch_brings_objects_up(self, store: tierd.Store) -> None:
        tensors = {f"p/{i}": sample(torch.float32, (100, 100), seed=i) for i in range(4)}
        for k, t in tensors.items():
            store.put(k, t, tier="nvme")
        store.prefetch(list(tensors) + ["p/missing"])
        # A hint has no completion event across a socket: poll what it promises, with a deadline.
        assert wait_until(lambda: all(store.info(k).tier == "host" for k in tensors), timeout_s=30)
        assert all(same_bits(store.get(k), t) for k, t in tensors.items())

    def test_declare_schedule(self, store: tierd.Store) -> None:
        keys = [f"sch/{i}" for i in range(4)]
        for k in keys:
            store.put(k, torch.full((10,), 1.0))
        store.declare_schedule(keys)  # accepted for any namespace; lru simply ignores it
        store.declare_schedule(keys, cyclic=False)
        assert all(torch.equal(store.get(k), torch.full((10,), 1.0)) for k in keys)
        with pytest.raises(tierd.InvalidArgument):
            store.declare_schedule(["ok/key", ""])

    def test_declare_prefix(self, store: tierd.Store) -> None:
        chain = [f"pfx/{i}" for i in range(4)]
        store.declare_prefix(chain)  # a hint: accepted before the blocks exist, for any namespace
        for k in chain:
            store.put(k, torch.full((10,), 2.0))
        store.declare_prefix(chain)
        assert all(torch.equal(store.get(k), torch.full((10,), 2.0)) for k in chain)
        store.declare_prefix(chain, done=True)  # over: a hint, nothing is deleted
        assert all(torch.equal(store.get(k), torch.full((10,), 2.0)) for k in chain)
        for bad in (["ok/key", ""], "pfx/0", ["pfx/a", "pfx/b", "pfx/a"], ["pfx/a", "other/b"]):
            for done in (False, True):
                with pytest.raises(tierd.InvalidArgument):  # a bad key, one key, a cycle, two namespaces
                    store.declare_prefix(bad, done=done)

    def test_async_put_and_get(self, store: tierd.Store) -> None:
        ts = [sample(torch.float16, (300, 100), seed=i) for i in range(8)]
        futs = [store.put_async(f"a/{i}", t) for i, t in enumerate(ts)]
        for f in futs:
            f.result(timeout=60)
        gets = [store.get_async(f"a/{i}") for i in range(8)]
        assert all(same_bits(g.result(timeout=60), t) for g, t in zip(gets, ts, strict=True))
        with pytest.raises(tierd.NotFound):
            store.get_async("a/none").result(timeout=60)

    def test_pinned_objects_are_never_demoted(self, store: tierd.Store) -> None:
        cap = store.stats()["host"].capacity_bytes
        pinned = sample(torch.uint8, (cap // 4,), seed=8)
        store.put("pin/x", pinned, pin=True)
        for i in range(8):  # twice the host tier's size
            store.put(f"fill/{i}", sample(torch.uint8, (cap // 4,), seed=10 + i))
        info = store.info("pin/x")
        assert info.tier == "host" and info.pinned
        assert torch.equal(store.get("pin/x"), pinned)

    def test_host_overflow_demotes_lru_and_loses_nothing(self, store: tierd.Store) -> None:
        cap = store.stats()["host"].capacity_bytes
        chunk = cap // 8
        ts = [sample(torch.uint8, (chunk,), seed=20 + i) for i in range(24)]  # 3x the host tier
        for i, t in enumerate(ts):
            store.put(f"o/{i}", t)
        tiers = [store.info(f"o/{i}").tier for i in range(24)]
        assert tiers[0] == "nvme" and tiers[-1] == "host"  # the oldest left first
        stats = store.stats()
        assert stats["nvme"].demoted_bytes >= 16 * chunk
        assert all(same_bits(store.get(f"o/{i}"), t) for i, t in enumerate(ts))

    def test_object_larger_than_host_goes_to_nvme(self, store: tierd.Store) -> None:
        cap = store.stats()["host"].capacity_bytes
        t = sample(torch.uint8, (cap + 4096 * 3 + 5,), seed=30)
        store.put("big/x", t)
        assert store.info("big/x").tier == "nvme"
        assert torch.equal(store.get("big/x"), t)

    def test_ttl_expires(self, store: tierd.Store) -> None:
        store.put("ttl/x", torch.zeros(4), ttl=0.05)
        store.put("ttl/keep", torch.zeros(4))
        deadline = threading.Event()
        deadline.wait(0.2)  # wall-clock expiry is the behaviour under test
        assert not store.exists("ttl/x")
        with pytest.raises(tierd.NotFound, match="expired"):
            store.get("ttl/x")
        assert store.keys("ttl/") == ["ttl/keep"]
        with pytest.raises(tierd.InvalidArgument, match="ttl"):
            store.put("ttl/bad", torch.zeros(1), ttl=0)

    def test_expired_objects_are_swept_without_being_touched(self, store: tierd.Store) -> None:
        before = store.stats()["host"].used_bytes
        store.put("ttl/big", torch.zeros(1 << 20, dtype=torch.uint8), ttl=0.05)
        assert store.stats()["host"].used_bytes >= before + (1 << 20)
        # The background sweeper frees it (about once a second), with no get or exists to notice it.
        assert wait_until(lambda: store.stats()["host"].used_bytes < before + (1 << 20), timeout_s=10)

    def test_stats_count_hits_misses_and_bytes(self, store: tierd.Store) -> None:
        t = torch.arange(1000, dtype=torch.float32)
        store.put("s/h", t)
        store.put("s/n", t, tier="nvme")
        before = store.stats()
        store.get("s/h")
        store.get("s/n")
        after = store.stats()
        assert after["host"].hits == before["host"].hits + 1
        assert after["host"].misses == before["host"].misses + 1
        assert after["nvme"].hits == before["nvme"].hits + 1
        assert after["nvme"].bytes_out >= before["nvme"].bytes_out + 4000
        assert after.objects == 2
        assert 0.0 <= after["host"].fragmentation <= 1.0

    def test_readers_and_writers_race_safely(self, store: tierd.Store) -> None:
        cap = store.stats()["host"].capacity_bytes
        n = cap // 16
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            try:
                for i in range(12):
                    store.put(f"r/{w}-{i % 4}", torch.full((n,), (w * 31 + i) % 251, dtype=torch.uint8))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        def reader(w: int) -> None:
            try:
                for i in range(40):
                    try:
                        got = store.get(f"r/{w % 3}-{i % 4}")
                    except tierd.NotFound:
                        continue
                    # Whatever version we read, it is one whole version.
                    assert bool((got == got[0]).all())
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(w,)) for w in range(3)]
        threads += [threading.Thread(target=reader, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors

    # -- batches ------------------------------------------------------------------

    def test_put_many_and_get_many_round_trip(self, store: tierd.Store) -> None:
        values = {f"bt/{i}": (sample(torch.float16, (64, 32), seed=i) if i % 2 else bytes([i]) * (100 + i))
                  for i in range(40)}
        values["bt/big"] = sample(torch.float32, (1 << 18,), seed=99)  # 1 MiB: larger than any inline limit
        stored = store.put_many(values)
        assert list(stored) == [True] * len(values) and not stored.errors
        keys = ["bt/missing", *values, "bt/also-missing"]
        got = store.get_many(keys)
        assert len(got) == len(keys) and got[0] is None and got[-1] is None and not got.errors
        for key, value in zip(keys[1:-1], got[1:-1], strict=True):
            want = values[key]
            assert same_bits(value, want) if isinstance(want, torch.Tensor) else value == want

    def test_put_many_refuses_one_item_and_stores_the_others(self, store: tierd.Store) -> None:
        stored = store.put_many([("bt/a", b"a"), ("bt/bad", 12345), ("bt/c", b"c")])  # type: ignore[list-item]
        assert list(stored) == [True, False, True]
        assert isinstance(stored.errors["bt/bad"], tierd.InvalidArgument)
        assert store.get_many(["bt/a", "bt/bad", "bt/c"]) == [b"a", None, b"c"]

    BAD_KEYS = ["bk/nul\x00byte", "bk/" + "x" * 2000, "", "/abs", 7]

    def test_a_bad_key_fails_only_its_own_item_in_every_batch_call(self, store: tierd.Store) -> None:
        keys = ["bk/a", *self.BAD_KEYS, "bk/b"]
        stored = store.put_many([(k, k.encode() if isinstance(k, str) else b"?") for k in keys])
        assert list(stored) == [True] + [False] * len(self.BAD_KEYS) + [True]
        assert all(isinstance(stored.errors[k if isinstance(k, str) else repr(k)], tierd.InvalidArgument)
                   for k in self.BAD_KEYS if isinstance(k, str))
        got = store.get_many(keys)  # type: ignore[arg-type]
        assert got == [b"bk/a"] + [None] * len(self.BAD_KEYS) + [b"bk/b"]
        assert isinstance(got.errors["bk/nul\x00byte"], tierd.InvalidArgument)
        t = sample(torch.float32, (16,), seed=5)
        store.put("bk/t", t)
        outs: list[torch.Tensor | None] = [None] * len(keys)
        outs[-1] = torch.empty(16)
        got = store.get_many([*keys[:-1], "bk/t"], outs=outs)  # type: ignore[list-item]
        assert got[-1] is outs[-1] and same_bits(got[-1], t) and got[0] == b"bk/a"
        store.delete("bk/t")
        found = store.exists_many(keys)  # type: ignore[arg-type]
        assert list(found) == [True] + [False] * len(self.BAD_KEYS) + [True]
        with store.exists_many(keys, lease=True).lease as lease:  # type: ignore[arg-type, union-attr]
            assert lease.get_many() == [b"bk/a"] + [None] * len(self.BAD_KEYS) + [b"bk/b"]
        assert store.prefix_length(keys) == 1  # type: ignore[arg-type]
        assert list(store.delete_many(keys)) == [True] + [False] * len(self.BAD_KEYS) + [True]  # type: ignore[arg-type]
        assert store.keys("bk/") == []

    def test_get_many_fills_outs_in_place(self, store: tierd.Store) -> None:
        blocks = [sample(torch.bfloat16, (4, 256), seed=i) for i in range(8)]
        store.put_many({f"bo/{i}": b for i, b in enumerate(blocks)})
        pool = torch.zeros(8, 4, 256, dtype=torch.bfloat16)  # a caller's buffer, one slot per block
        outs = [pool[i] for i in range(8)]
        outs[3] = None  # type: ignore[call-overload]  # no buffer for this one: a new tensor
        got = store.get_many([f"bo/{i}" for i in range(8)], outs=outs)
        for i in range(8):
            if i == 3:
                assert same_bits(got[3], blocks[3]) and got[3].data_ptr() != pool[3].data_ptr()
                assert int(pool[3].count_nonzero()) == 0
            else:
                assert got[i] is outs[i] and same_bits(pool[i], blocks[i])
        with pytest.raises(tierd.InvalidArgument, match="outs="):
            store.get_many(["bo/0", "bo/1"], outs=[pool[0]])

    def test_exists_many_prefix_length_delete_many(self, store: tierd.Store) -> None:
        store.put_many({f"bp/{i}": bytes([i]) * 10 for i in range(6)})
        store.delete("bp/3")  # a hole
        keys = [f"bp/{i}" for i in range(6)]
        assert list(store.exists_many(keys)) == [True, True, True, False, True, True]
        assert store.prefix_length(keys) == 3 and store.prefix_length(keys[4:]) == 2
        assert store.prefix_length(["bp/none", *keys]) == 0 and store.prefix_length([]) == 0
        assert store.delete_many(["bp/0", "bp/3", "bp/5"]) == [True, False, True]
        assert store.keys("bp/") == ["bp/1", "bp/2", "bp/4"]

    def test_exists_many_lease_pins_the_found_versions(self, store: tierd.Store) -> None:
        first = sample(torch.float32, (1024,), seed=1)
        store.put_many({"bl/a": first, "bl/b": b"bee"})
        found = store.exists_many(["bl/a", "bl/none", "bl/b"], lease=True)
        assert list(found) == [True, False, True] and found.lease is not None
        with found.lease as lease:
            store.put("bl/a", sample(torch.float32, (1024,), seed=2))  # replaced and deleted meanwhile:
            store.delete("bl/b")  # the lease still reads the versions it found
            got = lease.get_many()
            assert same_bits(got[0], first) and got[1] is None and got[2] == b"bee"
            out = torch.empty(1024)
            assert lease.get_many(outs=[out, None, None])[0] is out and same_bits(out, first)
        found.lease.release()  # twice: never raises
        with pytest.raises(tierd.StoreClosed):
            found.lease.get_many()
        assert not store.exists("bl/b")

    def test_batches_complete_on_futures_and_an_eventfd(self, store: tierd.Store) -> None:
        import select

        assert store.put_many_async({"ba/x": b"x", "ba/y": b"y", "ba/z": b"z"}).result(timeout=30) == [True] * 3
        assert store.get_many_async(["ba/x", "ba/n"]).result(timeout=30) == [b"x", None]
        with store.completions() as done:
            assert select.select([done.fd], [], [], 0)[0] == []  # nothing ready yet
            t1 = done.submit_exists_many(["ba/x", "ba/n"])
            t2 = done.submit_get_many(["ba/y"])
            t3 = done.submit_delete_many(["ba/z"])  # not a key t1 reads: the three may complete in any order
            results: dict[int, object] = {}
            deadline = time.monotonic() + 30
            while len(results) < 3 and time.monotonic() < deadline:
                if select.select([done.fd], [], [], 1)[0]:
                    results.update(done.drain())
            assert results == {t1: [True, False], t2: [b"y"], t3: [True]}
            assert select.select([done.fd], [], [], 0)[0] == []  # drained: not readable again

    def test_closed_store_refuses(self, store: tierd.Store) -> None:
        store.close()
        with pytest.raises(tierd.StoreClosed):
            store.put("c/x", torch.zeros(1))
        with pytest.raises(tierd.StoreClosed):
            store.get("c/x")
