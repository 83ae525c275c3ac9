"""``tierd.PrefixKVStore``: KV-cache blocks keyed by the token prefix that produced them.

A prompt's tokens are cut into blocks of ``block_tokens``; block ``i`` is
stored under a chain hash of every token up to the end of block ``i``, so
two requests that share a prefix share its blocks, and a key says nothing
about the suffix after it. The hash is xxh3-128 over the previous block's
hash and this block's token ids (int64, little-endian), seeded with the
digest of a :class:`KVKeyspace`: everything that must match for two
writers' KV bytes to be interchangeable (model, dtype, layout, block size,
tensor-parallel shard, tenant salt). The same in every process and on
every machine, whatever PYTHONHASHSEED says.

Note [prefix eviction order]
    A prefix is only useful from its head: a tail without its head can never
    be hit. Blocks are therefore touched tail first, head last, on every put
    and get, so under a recency policy the head is the most recent and goes
    last. ``lookup`` stops at the first missing block, so a prefix that did
    lose a block in the middle is reported only up to the hole. ``put``
    also declares each request's chain (``Store.declare_prefix``): a
    namespace with ``access = "prefix"`` then never evicts a block before
    its cached children, and keeps one-shot blocks out of host.

``kv`` tensors are shaped ``[layers, 2, tokens, kv_heads, head_dim]``; one
object per block holds all layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import msgspec
import torch
import xxhash

from tierd.clients.base import Store
from tierd.errors import InvalidArgument, NotFound

__all__ = ["KVKeyspace", "PrefixKVStore"]

_LAYOUT = "layers,2,tokens,kv_heads,head_dim"


class KVKeyspace(msgspec.Struct, frozen=True, kw_only=True):
    """The identity of one shared KV keyspace: writers whose fields all match may share blocks.

    Attributes:
        model: the model's id or fingerprint (``tierd.integrations.transformers.model_fingerprint``
            hashes a model's config and weights): two models never share.
        dtype: the KV dtype as stored (``"bfloat16"``).
        layout: the order of a block's dimensions (``"layers,2,tokens,kv_heads,head_dim"``).
        page_tokens: tokens per block (a block's boundaries are part of its identity).
        tp_rank, tp_size: the tensor-parallel shard a writer holds (its heads); replicated KV
            (MLA) is written with ``tp_size=1``.
        shard: any further part of the model a writer holds (a pipeline stage's layers, a
            context-parallel slice: ``"pp1/4"``); empty for the whole model.
        salt: a tenant's secret (LMCache's ``cache_salt``): different salts never share a block,
            and without the salt no one can compute another tenant's keys.
    """

    model: str
    dtype: str
    layout: str
    page_tokens: int
    tp_rank: int = 0
    tp_size: int = 1
    shard: str = ""
    salt: str = ""

    def __post_init__(self) -> None:
        if self.page_tokens < 1:
            raise InvalidArgument(f"page_tokens must be >= 1, got {self.page_tokens}")
        if not 0 <= self.tp_rank < self.tp_size:
            raise InvalidArgument(f"tp_rank must be in [0, tp_size), got {self.tp_rank} of {self.tp_size}")

    def digest(self) -> bytes:
        """16 bytes naming this keyspace: xxh3-128 of its fields, versioned (any field change changes it)."""
        return xxhash.xxh3_128_digest(b"tierd-kv/v2|" + msgspec.msgpack.encode(self))


def _token_bytes(tokens: Sequence[int] | torch.Tensor) -> bytes:
    t = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if t.device.type != "cpu":
        t = t.cpu()
    return t.numpy().astype("<i8", copy=False).tobytes()


class PrefixKVStore:
    """Stores and finds KV-cache blocks by token prefix.

    Args:
        store: ``tierd.open()`` or ``tierd.connect()``; with ``connect()``, all
            processes on the machine share blocks; with a remote tier and
            ``write_through`` on the namespace, all machines do.
        model: model id (part of every key: two models never share blocks).
        block_tokens: tokens per block; a partial tail block is not stored.
        namespace: key namespace (default ``"kv"``).
        dtype: the KV dtype (part of every key).
        tp_rank, tp_size: the tensor-parallel shard this writer's KV holds (part of every key).
        salt: the tenant's salt (part of every key: tenants with different salts never share).

    ``keyspace`` is the resulting :class:`KVKeyspace`.
    """

    def __init__(self, store: Store, *, model: str, block_tokens: int = 256, namespace: str | None = None,
                 dtype: torch.dtype = torch.bfloat16, tp_rank: int = 0, tp_size: int = 1, salt: str = "") -> None:
        if block_tokens < 1:
            raise InvalidArgument(f"block_tokens must be >= 1, got {block_tokens}")
        self.store = store
        self.model = model
        self.block_tokens = block_tokens
        self.namespace = namespace or "kv"
        self.dtype = dtype
        self.keyspace = KVKeyspace(model=model, dtype=str(dtype).removeprefix("torch."), layout=_LAYOUT,
                                   page_tokens=block_tokens, tp_rank=tp_rank, tp_size=tp_size, salt=salt)
        self._seed = self.keyspace.digest()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tierd-kv")

    # -- keys ------------------------------------------------------------------

    def block_keys(self, tokens: Sequence[int] | torch.Tensor) -> list[str]:
        """Keys of the whole blocks of ``tokens``, head first."""
        raw = _token_bytes(tokens)
        step = self.block_tokens * 8
        keys = []
        prev = self._seed
        for start in range(0, len(raw) - step + 1, step):
            prev = xxhash.xxh3_128_digest(prev + raw[start : start + step])
            keys.append(f"{self.namespace}/{prev.hex()}")
        return keys

    # -- single request ----------------------------------------------------------

    def put(self, tokens: Sequence[int] | torch.Tensor, kv: torch.Tensor) -> int:
        """Store the whole blocks of ``kv`` (``[layers, 2, tokens, heads, head_dim]``); returns tokens stored.

        Blocks already stored (a shared prefix) are not written again.
        """
        keys = self.block_keys(tokens)
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise InvalidArgument(f"kv must be [layers, 2, tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
        if kv.shape[2] < len(keys) * self.block_tokens:
            raise InvalidArgument(f"kv holds {kv.shape[2]} tokens, fewer than the {len(keys) * self.block_tokens} "
                                  "of the whole blocks of tokens")
        if kv.dtype != self.dtype:
            raise InvalidArgument(f"kv is {kv.dtype}, this store keys {self.dtype}")
        # Each block's parent is the one before it: the namespace's prefix policies use it (Note
        # [prefix eviction order]; ``access = "prefix"``). Declared even when every block is stored:
        # the chain is live again (if it was finished), and links lost with a daemon restart return.
        # Through the daemon it is not waited for.
        self.store.declare_prefix(keys)
        # One batch asks which blocks are there, one stores the rest, tail first and head
        # last (Note [prefix eviction order]).
        present = self.store.exists_many(keys)
        b = self.block_tokens
        missing = {keys[i]: kv[:, :, i * b : (i + 1) * b] for i in reversed(range(len(keys))) if not present[i]}
        if missing:
            stored = self.store.put_many(missing)
            if stored.errors:
                raise next(iter(stored.errors.values()))
        return len(keys) * self.block_tokens

    def finish(self, tokens: Sequence[int] | torch.Tensor) -> None:
        """The conversation (or agent task) whose history is ``tokens`` is over.

        In a namespace with ``access = "prefix"``, the blocks at the end of
        its chain that no other stored request shares (its own history, not
        a shared system prompt) go first when host needs room. Nothing is
        deleted: a later read finds them, wherever they went, and makes them
        ordinary blocks again. Other namespaces ignore it.
        """
        self.store.declare_prefix(self.block_keys(tokens), done=True)

    def lookup(self, tokens: Sequence[int] | torch.Tensor) -> int:
        """Tokens of the longest stored prefix of ``tokens`` (a multiple of ``block_tokens``)."""
        # A hole ends the prefix (Note [prefix eviction order]): one batched question.
        return self.store.prefix_length(self.block_keys(tokens)) * self.block_tokens

    def _fetch(self, keys: Sequence[str], out: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The blocks of ``keys``; with ``out`` (``[layers, 2, n, ...]``) each lands in its slice of it."""
        b = self.block_tokens
        # One batch, tail first, head last: the head ends up the most recently used.
        order = list(reversed(range(len(keys))))
        outs = [out[:, :, i * b : (i + 1) * b] for i in order] if out is not None else None
        got = self.store.get_many([keys[i] for i in order], outs=outs)
        for i, value in zip(order, got, strict=True):
            if value is None:
                why = got.errors.get(keys[i])
                raise NotFound(f"block {i} of this prefix was evicted since lookup()"
                               + (f" ({why})" if why is not None else ""))
        return list(got)[::-1]

    def get(self, tokens: Sequence[int] | torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
        """KV of the longest stored prefix of ``tokens``: ``[layers, 2, n, heads, head_dim]`` (n may be 0).

        Args:
            out: a preallocated KV buffer ``[layers, 2, >= n, heads, head_dim]`` (a serving
                engine's own KV memory); the prefix is copied into its first ``n`` tokens,
                block by block, and that slice is returned.

        Raises:
            NotFound: a block vanished between lookup and fetch (evicted meanwhile).
        """
        n = self.lookup(tokens) // self.block_tokens
        keys = self.block_keys(tokens)[:n]
        if not keys:
            return torch.empty(0, 2, 0, 0, 0, dtype=self.dtype) if out is None else out[:, :, :0]
        tokens_n = n * self.block_tokens
        if out is None:
            # The first block gives the shape; the others are copied straight into their slices.
            first = self.store.get(keys[0])
            out = torch.empty(first.shape[0], 2, tokens_n, *first.shape[3:], dtype=first.dtype)
            out[:, :, : self.block_tokens] = first
            self._fetch(keys[1:], out[:, :, self.block_tokens :])
            return out
        if out.shape[2] < tokens_n:
            raise InvalidArgument(f"out= holds {out.shape[2]} tokens, the stored prefix has {tokens_n}")
        self._fetch(keys, out[:, :, :tokens_n])
        return out[:, :, :tokens_n]

    def get_layers(self, tokens: Sequence[int] | torch.Tensor, *, device: Any = None) -> Iterator[torch.Tensor]:
        """The stored prefix's KV layer by layer (``[2, n, heads, head_dim]``).

        All blocks are fetched at once; then layer ``i + 1`` is assembled (and
        moved to ``device``) on a worker while the caller uses layer ``i``.
        """
        n = self.lookup(tokens) // self.block_tokens
        keys = self.block_keys(tokens)[:n]
        if not keys:
            return
        blocks = self._fetch(keys)
        layers = blocks[0].shape[0]

        def assemble(i: int) -> torch.Tensor:
            layer = torch.cat([b[i] for b in blocks], dim=1)
            return layer.to(device, non_blocking=True) if device is not None else layer

        nxt: Future[torch.Tensor] = self._pool.submit(assemble, 0)
        for i in range(layers):
            current = nxt.result()
            if i + 1 < layers:
                nxt = self._pool.submit(assemble, i + 1)
            yield current

    # -- many requests -----------------------------------------------------------

    def put_many(self, requests: Sequence[tuple[Sequence[int] | torch.Tensor, torch.Tensor]]) -> list[int]:
        """``put`` for several requests, in parallel."""
        return list(self._pool.map(lambda r: self.put(*r), requests))

    def lookup_many(self, token_lists: Sequence[Sequence[int] | torch.Tensor]) -> list[int]:
        return list(self._pool.map(self.lookup, token_lists))

    def get_many(self, token_lists: Sequence[Sequence[int] | torch.Tensor]) -> list[torch.Tensor]:
        return list(self._pool.map(self.get, token_lists))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

