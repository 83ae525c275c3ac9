"""The remote tier against a real redis-server and a real Redis Cluster (3 primaries, 3 replicas)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tierd.codecs import get_codec
from tierd.errors import CorruptObject, InvalidArgument, MediaError
from tierd.testing import TierTests, payload
from tierd.testing.redis import RedisServer
from tierd.tiers.remote import FailureLog, RemoteLocation, RemoteTier


class TestRemoteTier(TierTests):
    """Every test twice: on one server and on a cluster. The backdoor is the tier's own redis-py
    client (it routes by slot on a cluster), used without the tier's logic."""

    @pytest.fixture
    def tier(self, redis_any: Any) -> Iterator[RemoteTier]:
        t = RemoteTier(redis_any.url, 16 << 20, chunk_size=256 << 10, cluster=redis_any.cluster)
        yield t
        t.close()

    def backdoor_read(self, tier: Any, location: RemoteLocation) -> bytes:
        return b"".join(tier._redis.get(tier._key(location.oid, i)) for i in range(len(location.chunks)))

    def test_codecs_and_checksums(self, tier: RemoteTier) -> None:
        w = (torch.randn(1 << 20) * 0.02).to(torch.bfloat16).view(torch.uint8)
        loc = tier.write(w, codec=get_codec("bytegroup"), itemsize=2, durable=False)
        assert tier.stored_nbytes(loc) < w.numel()
        out = torch.empty_like(w)
        tier.read_into(loc, out, itemsize=2)
        assert torch.equal(out, w)
        assert tier.slow_reads == 0  # received straight into `out` (compressed chunks via scratch)
        tier._redis.setrange(tier._key(loc.oid, 1), 10, b"\xff")
        with pytest.raises(CorruptObject, match="chunk 1 .* fails its checksum"):
            tier.read_into(loc, out, itemsize=2)
        assert tier.slow_reads == 1  # the direct read saw the bad chunk; redis-py's read said what it is

    def test_vanished_chunk_is_reported(self, tier: RemoteTier) -> None:
        loc = tier.write(payload(600_000), codec=get_codec("none"), itemsize=1, durable=False)
        tier._redis.delete(tier._key(loc.oid, 2))
        with pytest.raises(MediaError, match="chunk 2 .* is gone"):
            tier.read_into(loc, torch.empty(600_000, dtype=torch.uint8), itemsize=1)

    def test_free_deletes_the_keys(self, tier: RemoteTier) -> None:
        loc = tier.write(payload(700_000), codec=get_codec("none"), itemsize=1, durable=False)
        keys = [tier._key(loc.oid, i) for i in range(len(loc.chunks))]
        assert len(keys) == 3 and tier._redis.exists(*keys) == 3
        tier.free(loc)
        tier.drain()  # frees go to the server from a worker
        assert tier._redis.exists(*keys) == 0

    def test_the_index_is_shared(self, tier: RemoteTier, redis_any: Any) -> None:
        other = RemoteTier(redis_any.url, 16 << 20, cluster=redis_any.cluster)
        try:
            entries = {f"kv/{i}": f"entry {i}".encode() * 10 for i in range(40)}
            for key, entry in entries.items():
                tier.index_put(key, entry)
            assert {k: other.index_get(k) for k in entries} == entries  # any key, whichever shard holds it
            other.index_delete("kv/3")
            assert tier.index_get("kv/3") is None and tier.index_get("kv/never") is None
        finally:
            other.close()


def test_an_object_lives_in_one_slot_and_objects_spread_over_the_shards(redis_cluster: Any) -> None:
    t = RemoteTier(redis_cluster.url, 64 << 20, chunk_size=64 << 10, cluster=True)
    try:
        primaries: set[int] = set()
        slots: set[int] = set()
        for i in range(24):
            loc = t.write(payload(300_000), codec=get_codec("none"), itemsize=1, durable=False, key=f"kv/{i}")
            keys = [t._key(loc.oid, i) for i in range(len(loc.chunks))]
            assert len(keys) == 5
            object_slots = {t._redis.keyslot(k) for k in keys}
            assert len(object_slots) == 1  # one pipelined put or get talks to one node
            slots |= object_slots
            primaries.add(redis_cluster.primary_of(keys[0]))
        assert len(slots) == 24 and primaries == set(redis_cluster.primaries())
    finally:
        t.close()


# Keys as the engine holds them: plain, with braces (not a hash tag of theirs), long, UTF-8, scoped to a uid.
_KEYS = ["kv/a", "kv/{a}", "kv/x}{y", "m/" + "z" * 1000, "ns/é✓", "kv/a\x001000"]


@pytest.mark.parametrize("key", _KEYS)
def test_a_keys_index_entry_and_chunks_share_a_hash_slot(redis_server: Any, key: str) -> None:
    """Redis Cluster's slot (CRC16 of the hash tag) of the index entry is that of every chunk of
    every version of the key: a lookup by key and the read of what it names need one shard."""
    from redis.crc import key_slot

    t = RemoteTier(redis_server.url, 16 << 20, chunk_size=64 << 10)
    try:
        slot = key_slot(t._index_key(key).encode())
        locs = [t.write(payload(200_000), codec=get_codec("none"), itemsize=1, durable=False, key=key)
                for _ in range(2)]
        assert locs[0].oid != locs[1].oid  # every version has an id of its own
        for loc in locs:
            assert len(loc.chunks) == 4
            assert {key_slot(t._key(loc.oid, i).encode()) for i in range(len(loc.chunks))} == {slot}
        t.index_put(key, b"entry")  # found from the key alone
        assert t.index_get(key) == b"entry"
    finally:
        t.close()


def test_keys_spread_over_the_slots_and_objects_without_a_key_keep_their_own() -> None:
    from redis.crc import key_slot

    t = RemoteTier("redis://127.0.0.1:1", 1 << 20, client=object())  # key names only: no server needed
    slots = {key_slot(t._index_key(f"kv/{i}").encode()) for i in range(1000)}
    assert len(slots) > 900  # 1000 keys in 16384 slots: a few share one
    assert t._tag("kv/a") == t._tag("kv/a") != t._tag("kv/b")
    with pytest.raises(InvalidArgument, match="prefix 'a{b}' contains a brace"):
        RemoteTier("redis://127.0.0.1:1", 1 << 20, prefix="a{b}", client=object())


def test_an_entry_written_before_the_key_tag_is_a_miss(redis_server: Any) -> None:
    """The index layout of earlier versions (``<prefix>:idx:<key>``) is not read: those entries are
    misses (the remote tier is a cache); objects written with the old ids (``{<uuid>}``) still read."""
    t = RemoteTier(redis_server.url, 16 << 20, chunk_size=64 << 10)
    try:
        old = t.write(payload(100_000), codec=get_codec("none"), itemsize=1, durable=False)  # no key: {<uuid>}
        assert old.oid.startswith("{") and old.oid.endswith("}")
        t._redis.set("tierd:idx:kv/a", b"an old entry")
        assert t.index_get("kv/a") is None
        out = torch.empty(100_000, dtype=torch.uint8)
        t.read_into(old, out, itemsize=1)
        assert torch.equal(out, payload(100_000))
    finally:
        t.close()


def test_failures_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    now = [100.0]
    failures = FailureLog("redis://x", interval_s=10, clock=lambda: now[0])
    logger = logging.getLogger("tierd.test")
    with caplog.at_level(logging.WARNING):
        for i in range(50):  # a failover: every key fails
            failures.warning(logger, "lookup of %r failed: %s", f"kv/{i}", "refused")
            now[0] += 0.1
        failures.ok()  # a call succeeds, but failures were seen less than an interval ago
        assert [r.getMessage() for r in caplog.records] == ["lookup of 'kv/0' failed: refused"]
        now[0] += 5.1
        failures.warning(logger, "lookup of %r failed: %s", "kv/50", "refused")  # 10 s after the first line
        assert caplog.records[-1].getMessage() == (
            "lookup of 'kv/50' failed: refused (49 more failures of the remote tier were not logged)")
        failures.warning(logger, "lookup of %r failed: %s", "kv/51", "refused")
        failures.ok()
        now[0] += 10
        failures.ok()  # an interval without failures: the count held back is said once
        failures.ok()
        assert len(caplog.records) == 3
        assert caplog.records[-1].getMessage() == ("remote tier at redis://x answers again; 1 failures after the last "
                                                   "line about it were not logged")


def test_a_dead_server_logs_one_line_for_many_lookups(tmp_path: Any, redis_server: Any,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Each local miss asks the shared index; with the server dead each of those fails (a miss),
    and the log says so once, not once per key."""
    import logging

    import tierd
    from conftest import small_config

    cfg = small_config(tmp_path / "a")
    cfg["tiers"]["remote"] = {"url": redis_server.url, "timeout_s": 1.0}
    with tierd.open(cfg) as s:
        s.put("r/0", payload(1000), tier="remote")
        redis_server.stop()
        with caplog.at_level(logging.WARNING):
            for i in range(40):
                assert not s.exists(f"kv/{i}")  # misses: the index cannot be asked
                with pytest.raises(tierd.NotFound):
                    s.get(f"kv/{i}")
        lines = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
        assert len(lines) == 1 and "remote lookup of 'kv/0' skipped" in lines[0]
        assert s.engine.remote.failures.held == 79


def test_a_replica_serves_what_its_primary_is_suspected_of_not_serving(redis_cluster: Any) -> None:
    """Without a failover: the replica's answers themselves (found through CLUSTER NODES when the
    client's topology lists no replica), and the reads that go to a replica first for a while
    after the primary failed one. A tier with replica reads off never asks a replica."""
    t = RemoteTier(redis_cluster.url, 16 << 20, chunk_size=64 << 10, cluster=True)
    off = RemoteTier(redis_cluster.url, 16 << 20, chunk_size=64 << 10, cluster=True, replica_reads=False)
    try:
        src = payload(200_000)
        loc = t.write(src, codec=get_codec("none"), itemsize=1, durable=False, key="kv/r")
        t.index_put("kv/r", b"entry")
        ikey = t._index_key("kv/r")
        primary = redis_cluster.primary_of(ikey)
        redis_cluster.wait_replicated(primary)
        slots = t._redis.nodes_manager.slots_cache
        slot = t._redis.keyslot(ikey)
        slots[slot] = slots[slot][:1]  # a topology without replicas (CLUSTER SLOTS may say so)
        assert t._on_replica(ikey, [("GET", ikey)]) == [b"entry"] and t.replica_hits == 1
        replicas = t._replica_nodes[f"127.0.0.1:{primary}"][1]
        assert len(replicas) == 1 and replicas[0].port != primary
        t._suspects[f"127.0.0.1:{primary}"] = time.monotonic()  # as after a failed read
        t.index_put("kv/r", b"newer")  # on the primary: a lagging replica could still say "entry"
        assert t.index_get("kv/r") == b"newer"  # an index entry changes in place: never replica-first
        out = torch.empty_like(src)
        t.read_into(loc, out, itemsize=1)
        assert torch.equal(out, src) and t.present(loc)
        assert t.replica_hits == 3 and t.slow_reads == 0  # the chunks (immutable) from the replica
        assert off._on_replica(ikey, [("GET", ikey)]) is None
    finally:
        t.close()
        off.close()


def test_several_seeds_need_cluster_mode(redis_cluster: Any) -> None:
    with pytest.raises(InvalidArgument, match="several seeds need cluster = true"):
        RemoteTier(redis_cluster.seeds, 1 << 20)
    with pytest.raises(InvalidArgument, match="names no host"):
        RemoteTier("redis://:6379", 1 << 20, cluster=True)
    with pytest.raises(InvalidArgument, match="Port could not be cast"):
        RemoteTier("redis://127.0.0.1:abc", 1 << 20, cluster=True)
    with pytest.raises(InvalidArgument, match="database 2; a cluster has only 0"):
        RemoteTier(redis_cluster.url + "/2", 1 << 20, cluster=True)
    with pytest.raises(InvalidArgument, match="other credentials or options than the first"):
        RemoteTier(f"{redis_cluster.url},redis://user:secret@127.0.0.1:1", 1 << 20, cluster=True)
    # The first seed is dead; the second answers with the topology.
    t = RemoteTier("redis://127.0.0.1:1," + redis_cluster.seeds, 1 << 20, cluster=True, timeout_s=1.0)
    try:
        loc = t.write(payload(1000), codec=get_codec("none"), itemsize=1, durable=False)
        out = torch.empty(1000, dtype=torch.uint8)
        t.read_into(loc, out, itemsize=1)
        assert torch.equal(out, payload(1000))
    finally:
        t.close()


def test_ttl_lets_redis_expire_objects(redis_any: Any) -> None:
    t = RemoteTier(redis_any.url, 1 << 20, ttl_s=30, cluster=redis_any.cluster)
    loc = t.write(payload(1000), codec=get_codec("none"), itemsize=1, durable=False)
    t.index_put("kv/a", b"entry")
    client = redis_any.client()
    try:
        assert 0 < client.pttl(t._key(loc.oid, 0)) <= 30_000
        assert 0 < client.pttl(t._index_key("kv/a")) <= 30_000  # an index entry does not outlive its object
    finally:
        client.close()
        t.close()


def test_dead_server_gives_a_clear_error_then_reconnects(redis_server: Any, tmp_path: Any) -> None:
    t = RemoteTier(redis_server.url, 16 << 20, timeout_s=1.0)
    src = payload(300_000)
    loc = t.write(src, codec=get_codec("none"), itemsize=1, durable=False)
    redis_server.stop()  # killed mid-run
    with pytest.raises(MediaError, match="unreachable while reading.*local tiers keep working"):
        t.read_into(loc, torch.empty_like(src), itemsize=1)
    with pytest.raises(MediaError, match="unreachable while writing"):
        t.write(src, codec=get_codec("none"), itemsize=1, durable=False)
    assert t.usage().used_bytes == 300_000  # the failed write took nothing
    # A new server on the same port: the same tier's pooled client reconnects by itself.
    revived = RedisServer(tmp_path / "revived", port=redis_server.port)
    try:
        loc2 = t.write(src, codec=get_codec("none"), itemsize=1, durable=False)
        out = torch.empty_like(src)
        t.read_into(loc2, out, itemsize=1)
        assert torch.equal(out, src)
        with pytest.raises(MediaError, match="is gone"):  # what the dead server held is lost, and said so
            t.read_into(loc, out, itemsize=1)
    finally:
        revived.stop()
        t.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_direct_reads_speak_resp2_and_resp3(redis_server: Any, protocol: int) -> None:
    t = RemoteTier(redis_server.url, 16 << 20, chunk_size=256 << 10, protocol=protocol)
    try:
        src = payload(600_000)
        loc = t.write(src, codec=get_codec("none"), itemsize=1, durable=False)
        out = torch.empty_like(src)
        t.read_into(loc, out, itemsize=1)
        assert torch.equal(out, src) and t.slow_reads == 0
        t._redis.delete(t._key(loc.oid, 1))  # a null reply: $-1 in RESP2, _ in RESP3
        with pytest.raises(MediaError, match="chunk 1 .* is gone"):
            t.read_into(loc, out, itemsize=1)
        assert t.slow_reads == 1 and t._direct
    finally:
        t.close()


class _ShortReads:
    """A socket that hands out a byte stream in random short pieces."""

    def __init__(self, data: bytes, seed: int) -> None:
        self.data, self.pos, self.rng = data, 0, random.Random(seed)

    def recv_into(self, view: memoryview, nbytes: int = 0) -> int:
        n = min(len(view), nbytes or len(view), self.rng.choice([1, 2, 3, 7, 100, 5000, 70000]),
                len(self.data) - self.pos)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


@pytest.mark.parametrize("seed", range(20))
def test_the_direct_reader_survives_short_reads(seed: int) -> None:
    from tierd.tiers import _resp

    rng = random.Random(seed)
    values = [None if rng.random() < 0.2 else bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 5, 70000])))
              for _ in range(6)]
    stream = b"".join(b"$-1\r\n" if v is None and i % 2 else b"_\r\n" if v is None else b"$%d\r\n%s\r\n" % (len(v), v)
                      for i, v in enumerate(values))
    reader = _resp._Reader(_ShortReads(stream, seed))
    for v in values:
        header = reader.line()
        if v is None:
            assert header in (b"$-1", b"_")
            continue
        out = bytearray(int(header[1:]))
        reader.read_into(memoryview(out))
        reader.expect_crlf()
        assert bytes(out) == v
    assert reader.start == reader.end
