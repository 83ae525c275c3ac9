"""The ``remote`` tier: objects in Redis or Valkey, chunked, pipelined, checksummed.

An object is split into chunks (1 MiB by default), each encoded with the
object's codec and stored under ``<prefix>:<object id>:<i>``; its location
records every chunk's stored size, raw size, mode and xxh3 checksum, so a
read verifies what came back. Writes and reads are pipelined (one round
trip per batch of chunks); a TTL, when configured, lets Redis expire what
tierd forgets to delete.

Failures are the remote server's, never the local tiers': a dead or
unreachable server makes operations on remote objects raise
:class:`MediaError` naming the URL, and everything else keeps working. A
chunk that has vanished (expired, evicted by Redis's maxmemory policy,
flushed) is reported as such. Callers that log such failures do it through
:attr:`RemoteTier.failures`: one line per interval, not one per key.

The index: every object the engine puts on this tier is also described
under ``<prefix>:{<tag>}:idx:<key>`` (msgpack of its metadata and chunks), so
another store using the same server finds it on a local miss. That is how
two machines share KV-cache blocks.

Note [remote tier on a cluster]
    With ``cluster=True`` the tier speaks Redis Cluster; ``url`` may name
    several seed nodes, comma-separated, and any one that answers gives the
    topology. Everything of one key lies in one hash slot: the key's tag is
    ``xxh3(key)`` in hex, its index entry is ``<prefix>:{<tag>}:idx:<key>``
    and each version of its object gets the id ``{<tag>}:<uuid>`` (chunk
    ``i``: ``<prefix>:{<tag>}:<uuid>:<i>``). So a lookup by key and the read
    of the chunks it names talk to one node, a pipelined put or get of an
    object is one round trip to one node, keys spread over all slots, and a
    dead shard fails only the keys in its slots (before, the entry and the
    chunks lay in two independent slots: a third of the shards dead failed
    5/9 of the keys). The uuid makes every version's id new (an id is never
    reused), so a reader holding an old location meets a missing chunk,
    never another version's bytes. An object written without a key (tools,
    benchmarks) gets ``{<uuid>}``, the layout of earlier versions, which is
    still read.

    When a primary dies, commands for its slots fail until its replica is
    promoted; the client then refreshes the topology from any live node and
    carries on. Meanwhile reads (chunks, index entries, existence checks)
    that the primary does not answer are asked of its replicas (READONLY),
    and for a second after such a failure reads of that primary's slots go
    to a replica first (a dead host's connect timeout is paid once a
    second, not once a read). That is safe because ids are never reused and
    chunks are checksummed: a replica has the chunk as written, or not at
    all (a miss). Writes wait for the promotion. Replication is
    asynchronous: an object written just before a failover may be missing
    on the replica, which is a miss, never wrong bytes.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import torch

from tierd import checksums
from tierd._buffers import address_view
from tierd._optional import require
from tierd.codecs import Chunk, ChunkMode, Codec
from tierd.engine.keys import user_key
from tierd.errors import CorruptObject, InvalidArgument, MediaError, OutOfSpace
from tierd.tiers import _resp
from tierd.tiers.base import Tier, TierUsage

__all__ = ["FailureLog", "RemoteTier", "RemoteLocation", "redis_client"]

log = logging.getLogger("tierd.tiers.remote")

# Bytes per pipeline round trip (at least one chunk). A put's payloads are views of the source
# (no copy), and deep put pipelines keep the server busy. A get's replies queue in the server's
# output buffer for this one client: past a few MiB that costs Redis more than the round trips
# it saves (1 MiB chunks, loopback: 3 GB/s at 4 per pipeline, 1.3 GB/s at 32; bench/remote.py).
_WRITE_BATCH_BYTES = 32 << 20
_READ_BATCH_BYTES = 4 << 20
_RECONNECT_S = 1.0  # a cluster no seed answered is asked again after this long
_SUSPECT_S = 1.0  # after its primary failed, a slot's reads go to a replica first for this long
_LOG_EVERY_S = 10.0  # at most one line per interval about a failing remote tier


class FailureLog:
    """Warnings about one failing remote tier: the first at once, then at most one per ``interval_s``.

    During a failover every lookup of a key on the dead shard fails; one line
    per key would bury everything else in the log. A line held back is
    counted, and the next line says how many were; when calls succeed again
    and none has failed for an interval, one line says how many were not
    logged since the last one.
    """

    def __init__(self, url: str, interval_s: float = _LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.interval_s = interval_s
        self._clock = clock
        self.held = 0  # failures not logged since the last line
        self.logged = 0  # lines written (tests count them)
        self._last_line: float | None = None
        self._last_failure = 0.0
        self._lock = threading.Lock()

    def warning(self, logger: logging.Logger, msg: str, *args: Any) -> None:
        """``logger.warning(msg, *args)``, unless a line was written less than an interval ago."""
        now = self._clock()
        with self._lock:
            self._last_failure = now
            if self._last_line is not None and now - self._last_line < self.interval_s:
                self.held += 1
                return
            held, self.held, self._last_line = self.held, 0, now
            self.logged += 1
        more = f" ({held} more failures of the remote tier were not logged)" if held else ""
        logger.warning(msg + "%s", *args, more)

    def ok(self) -> None:
        """A call succeeded: after an interval without failures, say how many were not logged."""
        if not self.held:  # the common case: one attribute read
            return
        now = self._clock()
        with self._lock:
            if not self.held or now - self._last_failure < self.interval_s:
                return
            held, self.held, self._last_line = self.held, 0, now
            self.logged += 1
        log.warning("remote tier at %s answers again; %d failures after the last line about it were not logged",
                    self.url, held)


class RemoteLocation(msgspec.Struct, frozen=True, array_like=True):
    """An object on the server: chunk ``i`` is key ``<prefix>:<oid>:<i>`` (see :class:`~tierd.codecs.Chunk`).

    ``oid`` is ``{<key's tag>}:<uuid>``, or ``{<uuid>}`` for an object written
    without a key (Note [remote tier on a cluster]).
    """

    oid: str
    chunks: tuple[Chunk, ...]


class RemoteTier(Tier):
    """Objects of at most ``capacity_bytes`` (as tierd counts them) on a Redis server."""

    name = "remote"
    persistent = True

    def __init__(self, url: str, capacity_bytes: int, *, chunk_size: int = 1 << 20, ttl_s: float | None = None,
                 timeout_s: float = 5.0, prefix: str = "tierd", cluster: bool = False, client: Any = None,
                 replica_reads: bool = True, **redis_options: Any) -> None:
        """``replica_reads``: on a cluster, ask a replica for what a dead primary cannot serve
        (Note [remote tier on a cluster]); off, those reads fail until the promotion."""
        if "{" in prefix or "}" in prefix:
            raise InvalidArgument(f"tiers.remote.prefix {prefix!r} contains a brace; Redis Cluster reads braces as "
                                  "a hash tag: use a prefix without {{ or }}")
        self.url = url
        self.prefix = prefix
        self.chunk_size = chunk_size
        self.ttl_s = ttl_s
        self._capacity = capacity_bytes
        self._used = 0
        self._lock = threading.Lock()
        # redis-py is an extra (tierd[redis]): imported by the tier that uses it.
        redis = require("redis", needed_by="tiers.remote.url (the remote tier)")
        # RedisClusterException (no seed answers, a slot no node covers) is not a RedisError.
        self._errors: tuple[type[Exception], ...] = (redis.RedisError, redis.exceptions.RedisClusterException)
        self._redis_module = redis
        self.cluster = cluster
        self.replica_reads = replica_reads and cluster
        self.replica_hits = 0  # pipelines of reads a replica served because the primary did not answer
        self.failures = FailureLog(url)
        self._suspects: dict[str, float] = {}  # a primary that failed a read -> when (a cluster's node name)
        self._replica_nodes: dict[str, tuple[float, list[Any]]] = {}  # primary -> (when asked, its replicas)
        self._replica_lock = threading.Lock()
        self.slow_reads = 0  # batches read through redis-py's parser, not straight into the destination
        # A pooled client: redis-py reconnects on the next command after a failure. A cluster
        # client asks a seed for the topology when it is made; if none answers now, the tier
        # still starts (a cache that is down is a miss) and the next command tries again.
        self._client = client
        self._connect_lock = threading.Lock()
        self._connect = lambda: redis_client(url, cluster=cluster, timeout_s=timeout_s, **redis_options)
        self._connect_failed: tuple[float, Exception] | None = None  # when and why the last try failed
        self._direct = True  # replies received straight into the destination (tiers/_resp.py)
        if client is None:
            try:
                self._client = self._connect()
            except self._errors as exc:
                self._connect_failed = (time.monotonic(), exc)
                log.warning("remote tier at %s does not answer yet (%s); local tiers keep working", url, exc)
        self._freer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierd-remote-free")

    @property
    def _redis(self) -> Any:
        """The redis-py client, made now if the cluster did not answer before (raises redis's error)."""
        client = self._client
        if client is None:
            with self._connect_lock:
                if self._client is None:
                    # A dead cluster is asked again at most once a second: between tries, every caller
                    # fails at once instead of queueing on this lock for each seed's connect timeout.
                    failed = self._connect_failed
                    if failed is not None and time.monotonic() - failed[0] < _RECONNECT_S:
                        raise self._redis_module.ConnectionError(f"no seed answered: {failed[1]}")
                    try:
                        self._client = self._connect()
                    except self._errors as exc:
                        self._connect_failed = (time.monotonic(), exc)
                        raise
                client = self._client
        return client

    @staticmethod
    def _tag(key: str) -> str:
        """The hash tag of everything stored for ``key`` (Note [remote tier on a cluster])."""
        return checksums.xxh3_hex(key.encode())

    def _index_key(self, key: str) -> str:
        return f"{self.prefix}:{{{self._tag(key)}}}:idx:{key}"

    def _key(self, oid: str, i: int) -> str:
        return f"{self.prefix}:{oid}:{i}"

    def _fail(self, exc: Exception, what: str) -> MediaError:
        return MediaError(f"remote tier at {self.url} is unreachable while {what}: {exc}; "
                          "local tiers keep working")

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def usage(self) -> TierUsage:
        with self._lock:
            used = self._used
        return TierUsage(self._capacity, used, self._capacity - used, 0.0)

    def write(self, src: torch.Tensor, *, codec: Codec, itemsize: int, durable: bool,
              key: str | None = None) -> RemoteLocation:
        """Store ``src``'s bytes; ``key``, the object's key, puts them in its slot (beside its index entry)."""
        n = src.numel()
        with self._lock:
            if self._used + n > self._capacity:
                raise OutOfSpace(f"remote tier at {self.url} is full ({self._capacity} bytes counted)")
            self._used += n
        # A hash tag: every chunk in one slot, the key's (Note [remote tier on a cluster]).
        oid = "{" + uuid.uuid4().hex + "}" if key is None else "{" + self._tag(key) + "}:" + uuid.uuid4().hex
        chunks: list[Chunk] = []
        written = 0
        try:
            data = address_view(src.data_ptr(), n)
            step = max(1, _WRITE_BATCH_BYTES // self.chunk_size) * self.chunk_size
            for batch_start in range(0, n, step):
                pipe = self._redis.pipeline(transaction=False)
                for start in range(batch_start, min(n, batch_start + step), self.chunk_size):
                    raw = data[start : start + self.chunk_size]
                    mode, payload = codec.encode(raw, itemsize)
                    # A memoryview goes to the socket as it is (redis-py sends it as its own piece);
                    # bytes would be copied once more into the packed command.
                    payload = memoryview(payload)
                    chunks.append(Chunk(0, start, len(payload), len(raw), int(mode), checksums.xxh3(payload)))
                    pipe.set(self._key(oid, len(chunks) - 1), payload,
                             px=int(self.ttl_s * 1000) if self.ttl_s else None)
                pipe.execute()
                written = len(chunks)
        except self._errors as exc:
            self._delete_keys(oid, written)
            with self._lock:
                self._used -= n
            raise self._fail(exc, "writing") from exc
        self.failures.ok()
        return RemoteLocation(oid, tuple(chunks))

    def read_into(self, location: RemoteLocation, dest: torch.Tensor, *, itemsize: int) -> None:
        out = address_view(dest.data_ptr(), dest.numel())
        chunks = location.chunks
        per_batch = max(1, _READ_BATCH_BYTES // self.chunk_size)
        first = self._key(location.oid, 0)
        for batch_start in range(0, len(chunks), per_batch):
            batch = range(batch_start, min(len(chunks), batch_start + per_batch))
            if self._suspects and self._suspected(first) and self._read_replica(location, batch, out, itemsize):
                continue
            try:
                if not self._read_direct(location, batch, out, itemsize):
                    self._read_pipelined(location, batch, out, itemsize)
            except self._errors as exc:
                self._suspect(first)
                if not self._read_replica(location, batch, out, itemsize):
                    raise self._fail(exc, "reading") from exc
        self.failures.ok()

    def _read_replica(self, location: RemoteLocation, batch: range, out: memoryview, itemsize: int) -> bool:
        """Read ``batch`` from a replica of the object's slot; False when none has all of it intact."""
        keys = [self._key(location.oid, i) for i in batch]
        payloads = self._on_replica(keys[0], [("GET", k) for k in keys])
        if payloads is None:
            return False
        chunks = location.chunks
        for i, payload in zip(batch, payloads, strict=True):
            if payload is None or not chunks[i].intact(payload):
                return False  # not replicated yet: the caller reports the primary's failure
        for i, payload in zip(batch, payloads, strict=True):
            c = chunks[i]
            c.decode_into(memoryview(payload), out[c.offset : c.offset + c.raw], itemsize)
        return True

    # -- reads a dead primary cannot serve (Note [remote tier on a cluster]) ----

    def _on_replica(self, key: str, commands: list[tuple[Any, ...]]) -> list[Any] | None:
        """The replies to read-only ``commands`` (keys in ``key``'s slot) from a replica of that slot,
        in one pipeline; None when replica reads are off or no replica answers."""
        client = self._client
        if not self.replica_reads or client is None:
            return None
        for node in self._replicas(key):
            try:
                pipe = client.get_redis_connection(node).pipeline(transaction=False)
                pipe.execute_command("READONLY")  # a replica serves its primary's slots to this connection
                for args in commands:
                    pipe.execute_command(*args)
                replies = list(pipe.execute()[1:])
            except self._errors as exc:
                log.debug("remote tier at %s: replica %s does not answer: %s", self.url, node.name, exc)
                continue
            with self._lock:
                self.replica_hits += 1
            return replies
        return None

    def _replicas(self, key: str) -> list[Any]:
        """redis-py nodes of the replicas of ``key``'s slot: those the client's topology lists, else
        those a live node's CLUSTER NODES lists (CLUSTER SLOTS, where the client learns the topology,
        leaves out a replica whose replication offset the node has not heard of yet)."""
        client = self._client
        try:
            nodes = client.nodes_manager.slots_cache.get(client.keyslot(key)) or []
        except self._errors:
            return []
        if len(nodes) != 1:
            return list(nodes[1:])  # [primary, replicas...]
        with self._replica_lock:  # one thread asks; the others wait for its answer
            return self._replicas_of(nodes[0].name)

    def _replicas_of(self, primary: str) -> list[Any]:
        """The live replicas of node ``primary`` (host:port) from the first other node that answers
        CLUSTER NODES, asked at most once per ``_SUSPECT_S``; under ``_replica_lock``."""
        client = self._client
        now = time.monotonic()
        known = self._replica_nodes.get(primary)
        if known is not None and now - known[0] < _SUSPECT_S:
            return known[1]
        from redis.cluster import REPLICA, ClusterNode

        found: list[Any] = []
        for node in client.get_nodes():
            if node.name == primary:
                continue
            try:
                table = client.get_redis_connection(node).execute_command("CLUSTER NODES")
            except self._errors:
                continue
            ids = {name: e.get("node_id") for name, e in table.items()}
            for name, e in table.items():
                if e.get("master_id") == ids.get(primary) and "fail" not in e.get("flags", "") \
                        and e.get("connected", True):
                    host, _, port = name.partition("@")[0].rpartition(":")
                    old = next((n for n in (known[1] if known else []) if n.name == f"{host}:{port}"), None)
                    found.append(old or ClusterNode(host, int(port), server_type=REPLICA))
            break
        for old in known[1] if known else []:
            if old not in found and old.redis_connection is not None:
                old.redis_connection.close()
        self._replica_nodes[primary] = (now, found)
        return found

    def _primary_name(self, key: str) -> str | None:
        client = self._client
        try:
            nodes = client.nodes_manager.slots_cache.get(client.keyslot(key)) if client is not None else None
        except self._errors:
            return None
        return nodes[0].name if nodes else None

    def _suspect(self, key: str) -> None:
        """``key``'s primary failed a read: its slots' reads go to a replica first for a while."""
        if self.replica_reads and (name := self._primary_name(key)) is not None:
            self._suspects[name] = time.monotonic()

    def _suspected(self, key: str) -> bool:
        name = self._primary_name(key)
        since = self._suspects.get(name) if name is not None else None
        if since is None:
            return False
        if time.monotonic() - since < _SUSPECT_S:
            return True
        self._suspects.pop(name, None)  # ask the primary again (or the one the topology names now)
        return False

    def _read_direct(self, location: RemoteLocation, batch: range, out: memoryview, itemsize: int) -> bool:
        """Read ``batch`` with the replies received straight into ``out`` (tiers/_resp.py); False when
        that path cannot serve it: :meth:`_read_pipelined` then reads it again and says what is wrong."""
        if not self._direct:
            return False
        chunks = location.chunks
        keys = [self._key(location.oid, i) for i in batch]
        scratch: dict[int, bytearray] = {}

        def sink(j: int, n: int) -> memoryview | None:
            c = chunks[batch[j]]
            if n != c.stored:
                return None
            if c.mode == ChunkMode.RAW:
                return out[c.offset : c.offset + n]
            scratch[j] = bytearray(n)
            return memoryview(scratch[j])

        try:
            lengths = _resp.get_into(self._pool_for(keys[0]), keys, sink)
        except _resp.Unexpected as exc:
            if exc.kind == "connection" and not self.cluster:
                # One server that does not answer: that is the error (redis-py's read would only wait
                # as long again). On a cluster, redis-py's read is what makes it find the new primary.
                raise self._redis_module.ConnectionError(str(exc)) from exc
            if exc.kind == "unsupported":
                self._direct = False
                log.info("remote tier at %s: replies go through redis-py's parser (%s)", self.url, exc)
            return self._slow(exc)
        except self._errors as exc:  # no client yet, a slot no node covers: redis-py's read says so
            return self._slow(exc)
        for j, i in enumerate(batch):
            c = chunks[i]
            stored = memoryview(scratch[j]) if j in scratch else out[c.offset : c.offset + c.stored]
            if lengths[j] != c.stored or not c.intact(stored):
                return self._slow(f"chunk {i} is missing or fails its checksum")
            if j in scratch:
                c.decode_into(stored, out[c.offset : c.offset + c.raw], itemsize)
        return True

    def _slow(self, why: object) -> bool:
        with self._lock:
            self.slow_reads += 1
        log.debug("remote tier at %s: reading through redis-py (%s)", self.url, why)
        return False

    def _pool_for(self, key: str) -> Any:
        """redis-py's connection pool for the node serving ``key`` (one server: its only pool)."""
        client = self._redis
        if self.cluster:
            client = client.get_redis_connection(client.get_node_from_key(key))
        return client.connection_pool

    def _read_pipelined(self, location: RemoteLocation, batch: range, out: memoryview, itemsize: int) -> None:
        """Read ``batch`` through redis-py: it follows MOVED and ASK and refreshes a cluster's topology."""
        chunks = location.chunks
        pipe = self._redis.pipeline(transaction=False)
        for i in batch:
            pipe.get(self._key(location.oid, i))
        for i, payload in zip(batch, pipe.execute(), strict=True):
            c = chunks[i]
            if payload is None:
                raise MediaError(f"remote tier at {self.url}: chunk {i} of object {location.oid} is gone "
                                 "(expired by its TTL or evicted by the server's maxmemory policy)")
            if not c.intact(payload):
                raise CorruptObject(f"remote tier at {self.url}: chunk {i} of object {location.oid} fails "
                                    "its checksum")
            c.decode_into(memoryview(payload), out[c.offset : c.offset + c.raw], itemsize)

    def _delete_keys(self, oid: str, count: int) -> None:
        if not count:
            return
        try:
            self._redis.delete(*(self._key(oid, i) for i in range(count)))
        except self._errors as exc:
            self.failures.warning(log, "could not delete %d chunks of %s from %s: %s", count, oid, self.url, exc)

    def free(self, location: RemoteLocation) -> None:
        # The engine frees under its lock: the round trip to the server goes to a worker.
        with self._lock:
            self._used -= sum(c.raw for c in location.chunks)
        self._freer.submit(self._delete_keys, location.oid, len(location.chunks))

    def present(self, location: RemoteLocation) -> bool:
        """Whether the server still holds the object (its first and last chunks: one round trip).

        Raises:
            MediaError: the server cannot be reached.
        """
        if not location.chunks:
            return True
        keys = {self._key(location.oid, 0), self._key(location.oid, len(location.chunks) - 1)}
        first = self._key(location.oid, 0)
        if self._suspects and self._suspected(first) and (got := self._on_replica(first, [("EXISTS", *keys)])):
            return bool(got[0] == len(keys))
        try:
            found = self._redis.exists(*keys)
        except self._errors as exc:
            self._suspect(first)
            got = self._on_replica(first, [("EXISTS", *keys)])
            if got is None:
                raise self._fail(exc, "checking an object") from exc
            found = got[0]
        return bool(found == len(keys))

    def drain(self) -> None:
        """Wait until every free queued so far has reached the server (one worker: FIFO)."""
        self._freer.submit(lambda: None).result()

    def stored_nbytes(self, location: Any) -> int:
        return sum(c.stored for c in location.chunks)

    # -- the shared index ----------------------------------------------------

    def index_put(self, key: str, entry: bytes) -> None:
        try:
            self._redis.set(self._index_key(key), entry, px=int(self.ttl_s * 1000) if self.ttl_s else None)
        except self._errors as exc:
            raise self._fail(exc, "indexing") from exc

    def index_get(self, key: str) -> bytes | None:
        """``key``'s index entry, or None; a replica answers when the primary does not (a replica
        that has not seen the entry yet: a miss).

        Unlike chunks (a new id per version: immutable), an entry changes in place and reaches
        replicas late, so a replica is asked only after the primary failed this very read, never
        first: with a live primary, a lagging replica could name an older version."""
        ikey = self._index_key(key)
        try:
            value = self._redis.get(ikey)
        except self._errors as exc:
            self._suspect(ikey)
            got = self._on_replica(ikey, [("GET", ikey)])
            if got is None:
                raise self._fail(exc, "looking up") from exc
            value = got[0]
        self.failures.ok()
        return bytes(value) if value is not None else None

    def index_delete(self, key: str) -> None:
        try:
            self._redis.delete(self._index_key(key))
        except self._errors as exc:
            self.failures.warning(log, "could not drop %r from the remote index at %s: %s", user_key(key),
                                  self.url, exc)

    def adopt(self, location: RemoteLocation) -> None:
        """Count an object another store put here (found through the index)."""
        with self._lock:
            self._used += sum(c.raw for c in location.chunks)

    def close(self) -> None:
        self._freer.shutdown(wait=True)
        for _, replicas in self._replica_nodes.values():
            for node in replicas:
                if node.redis_connection is not None:
                    node.redis_connection.close()
        if self._client is not None:
            self._client.close()


def redis_client(url: str, *, cluster: bool, timeout_s: float, **options: Any) -> Any:
    """A redis-py client for ``url``: one server, or a cluster found from one or more seed URLs
    (comma-separated; any one that answers gives the topology; credentials and options such as
    ``?ssl_cert_reqs=none`` come from the first seed, and a later seed may repeat them but not differ).

    Raises:
        InvalidArgument: a URL redis-py cannot parse or that names no host, several servers
            without ``cluster``, or a cluster URL with a database other than 0 or a Unix socket.
    """
    redis = require("redis", needed_by="tiers.remote.url (the remote tier)")
    from redis.connection import parse_url

    seeds = [u.strip() for u in url.split(",") if u.strip()]
    if not seeds:
        raise InvalidArgument("tiers.remote.url is empty")
    seeds = [seed if "//" in seed else f"redis://{seed}" for seed in seeds]
    try:
        parsed = [parse_url(seed) for seed in seeds]
    except ValueError as exc:  # a scheme redis-py does not know, a port that is not a number ...
        raise InvalidArgument(f"tiers.remote.url: {exc}") from exc
    common = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s, **options}
    if not cluster:
        if len(seeds) != 1:
            raise InvalidArgument(f"tiers.remote.url names {len(seeds)} servers; several seeds need cluster = true")
        return redis.Redis.from_url(seeds[0], **common)
    from redis.cluster import ClusterNode

    for seed, opts in zip(seeds, parsed, strict=True):
        if "path" in opts:
            raise InvalidArgument(f"tiers.remote.url: {seed!r} is a Unix socket; a cluster is reached over TCP")
        if not opts.get("host"):
            raise InvalidArgument(f"tiers.remote.url: {seed!r} names no host")
        if opts.get("db", 0) != 0:
            raise InvalidArgument(f"tiers.remote.url: {seed!r} names database {opts['db']}; a cluster has only 0")
    first = {k: v for k, v in parsed[0].items() if k not in ("host", "port")}
    for seed, opts in zip(seeds[1:], parsed[1:], strict=True):
        rest = {k: v for k, v in opts.items() if k not in ("host", "port")}
        if rest and rest != first:
            raise InvalidArgument(f"tiers.remote.url: seed {seed!r} has other credentials or options than the "
                                  "first; give them once, on the first seed")
    # Partial coverage is the normal state during a failover: the healthy shards keep serving.
    # One immediate retry (after a topology refresh), not redis-py's default backoff of seconds:
    # a cache read that cannot be served now is a miss the caller recomputes, not a stall.
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    common.setdefault("retry", Retry(NoBackoff(), retries=1))
    others = [ClusterNode(opts["host"], opts.get("port", 6379)) for opts in parsed[1:]]
    return redis.RedisCluster(url=seeds[0], startup_nodes=others, require_full_coverage=False, **common)
