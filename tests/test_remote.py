"""The remote tier against a real redis-server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch

from tierd.codecs import get_codec
from tierd.errors import CorruptObject, MediaError
from tierd.testing import TierTests, payload
from tierd.tiers.remote import RemoteLocation, RemoteTier


class TestRemoteTier(TierTests):
    @pytest.fixture
    def tier(self, redis_server: Any) -> Iterator[RemoteTier]:
        t = RemoteTier(redis_server.url, 16 << 20, chunk_size=256 << 10)
        yield t
        t.close()

    def backdoor_read(self, tier: Any, location: RemoteLocation) -> bytes:
        r = redis.Redis.from_url(tier.url)
        return b"".join(r.get(f"{tier.prefix}:{location.oid}:{i}") for i in range(len(location.chunks)))

    def test_codecs_and_checksums(self, tier: RemoteTier) -> None:
        w = (torch.randn(1 << 20) * 0.02).to(torch.bfloat16).view(torch.uint8)
        loc = tier.write(w, codec=get_codec("bytegroup"), itemsize=2, durable=False)
        assert tier.stored_nbytes(loc) < w.numel()
        out = torch.empty_like(w)
        tier.read_into(loc, out, itemsize=2)
        assert torch.equal(out, w)
        redis.Redis.from_url(tier.url).setrange(f"{tier.prefix}:{loc.oid}:1", 10, b"\xff")
        with pytest.raises(CorruptObject, match="chunk 1 .* fails its checksum"):
            tier.read_into(loc, out, itemsize=2)

    def test_vanished_chunk_is_reported(self, tier: RemoteTier) -> None:
        loc = tier.write(payload(600_000), codec=get_codec("none"), itemsize=1, durable=False)
        redis.Redis.from_url(tier.url).delete(f"{tier.prefix}:{loc.oid}:2")
        with pytest.raises(MediaError, match="chunk 2 .* is gone"):
            tier.read_into(loc, torch.empty(600_000, dtype=torch.uint8), itemsize=1)

    def test_free_deletes_the_keys(self, tier: RemoteTier) -> None:
        loc = tier.write(payload(700_000), codec=get_codec("none"), itemsize=1, durable=False)
        r = redis.Redis.from_url(tier.url)
        assert r.exists(f"{tier.prefix}:{loc.oid}:0")
        tier.free(loc)
        tier.drain()  # frees go to the server from a worker
        assert not r.keys(f"{tier.prefix}:{loc.oid}:*")


def test_ttl_lets_redis_expire_objects(redis_server: Any) -> None:
    t = RemoteTier(redis_server.url, 1 << 20, ttl_s=30)
    loc = t.write(payload(1000), codec=get_codec("none"), itemsize=1, durable=False)
    ttl_ms = redis.Redis.from_url(redis_server.url).pttl(f"tierd:{loc.oid}:0")
    assert 0 < ttl_ms <= 30_000
    t.close()


def test_dead_server_gives_a_clear_error_then_reconnects(redis_server: Any, tmp_path: Any) -> None:
    from conftest import RedisServer

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
    revived = RedisServer(tmp_path, port=redis_server.port)
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
