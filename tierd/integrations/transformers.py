"""``TierdCache``: a Hugging Face ``generate()`` cache that keeps layers' KV in tierd and reuses stored prefixes.

    with TierdCache(store, model, prompt=input_ids) as cache:
        out = model.generate(input_ids, cache=cache, max_new_tokens=64)  # past_key_values= before 5.25
        cache.reused_tokens  # prompt tokens loaded from the store instead of computed

* Offload (``offload=True``), as transformers' ``DynamicCache(offloading=True)``: after layer
  ``i``'s update its KV is put into the store and the layer drops it; layer ``i + 1``'s is
  fetched ahead as layer ``i`` is updated (after the last layer, the first one's, for the next
  step). Objects ``{namespace}/cache-{uuid}/{layer}/k`` and ``/v`` (one uuid per cache) are
  deleted by ``reset()``, ``close()`` or garbage collection.
* Prefix reuse (``prompt=``), through :class:`tierd.PrefixKVStore`: the prompt's longest stored
  prefix is loaded at construction, so ``generate()`` computes only the rest; after the prefill
  the prompt's whole blocks are stored.

Only full-attention layers are offloaded; others (sliding window, chunked, linear attention,
shared KV) stay ordinary in-memory layers, and a model that has any refuses ``prompt=`` and
``save()``: their KV is not one block layout per token prefix.

Note [offload without streams]
    transformers' offloaded cache copies on a CUDA side stream, which CPU tensors lack. Here
    one worker thread per cache runs its layers' puts, fetches and deletes in submission
    order: a layer's fetch is always queued after its put, so it reads what was put, and
    close()'s delete runs after both. The worker copies on the default stream, which orders
    its copies with the model's kernels without a stream wait (kernels reading fetched KV
    are launched after ``Future.result()``); what overlaps compute is the store's side (tier
    reads, host copies). A put's task holds the tensors it stores until the put returns, so
    nothing is freed under a copy.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import torch
import xxhash
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs

from tierd.clients.base import Store
from tierd.clients.kv import PrefixKVStore
from tierd.errors import InvalidArgument, NotFound, StoreClosed, TierdError

__all__ = ["TierdCache", "model_fingerprint"]

log = logging.getLogger("tierd.integrations.transformers")

_KV = tuple[torch.Tensor, torch.Tensor]


def model_fingerprint(model: PreTrainedModel, *, sample_bytes: int = 64 << 10) -> str:
    """A model's identity for KV sharing: 32 hex digits of xxh3-128.

    Hashes the config's full JSON (``to_json_string(use_diff=False)``, so the
    transformers version too), ``name_or_path``, and for every named parameter
    its name, shape, dtype and its first ``sample_bytes`` bytes (read on CPU). Two
    models with the same config but other weights (another seed, a fine-tune)
    differ. Limit: weights that differ only beyond each parameter's sampled
    bytes collide; pass ``model_id=`` to :class:`TierdCache` to name such models.

    Raises:
        InvalidArgument: not a model, or its weights are not loaded (meta device).
    """
    config = getattr(model, "config", None)
    if not isinstance(config, PreTrainedConfig) or not hasattr(model, "named_parameters"):
        raise InvalidArgument(f"model_fingerprint needs a PreTrainedModel, got {type(model).__name__}")
    h = xxhash.xxh3_128()
    h.update(b"tierd-model/v1\0" + config.to_json_string(use_diff=False).encode())
    h.update(b"\0" + str(getattr(model, "name_or_path", "")).encode())
    for name, param in model.named_parameters():
        if param.device.type == "meta":
            raise InvalidArgument(f"parameter {name} is on the meta device (weights not loaded): pass model_id=")
        h.update(f"\0{name}\0{tuple(param.shape)}\0{param.dtype}\0".encode())
        sample = param.detach().reshape(-1)[: max(1, sample_bytes // param.element_size())]
        h.update(sample.cpu().contiguous().view(torch.uint8).numpy().tobytes())  # uint8: bf16 has no numpy dtype
    return h.hexdigest()


def _token_ids(tokens: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    t = torch.as_tensor(tokens)
    if t.dim() == 2:
        if t.shape[0] != 1:
            raise InvalidArgument(f"{what} takes one sequence (batch size 1), got a batch of {t.shape[0]}")
        t = t[0]
    if t.dim() != 1 or t.numel() == 0 or t.is_floating_point():
        raise InvalidArgument(f"{what} must be non-empty integer token ids, [n] or [1, n], got {tuple(t.shape)} "
                              f"{t.dtype}")
    return t.to("cpu", torch.int64)


class _Resident:
    """``keys`` or ``values`` of a :class:`_StoredLayer`: reading or setting it first brings the layer back."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = f"_{name}"

    def __get__(self, layer: _StoredLayer, owner: type | None = None) -> torch.Tensor | None:
        layer.materialize()
        return getattr(layer, self.slot)

    def __set__(self, layer: _StoredLayer, t: torch.Tensor | None) -> None:
        layer.materialize()
        setattr(layer, self.slot, t)


class _StoredLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in the store between uses.

    Touching ``keys`` or ``values`` while offloaded brings them back (waits for the
    prefetch, or fetches now), so every DynamicLayer method (crop, reorder_cache,
    batch_select_indices, ...) and ``DynamicCache.__iter__`` works unchanged;
    ``get_seq_length`` needs no fetch. Called from the cache's thread only; its
    worker runs ``_put_kv`` and ``_get_kv``.
    """

    keys = _Resident()  # type: ignore[assignment]
    values = _Resident()  # type: ignore[assignment]

    def __init__(self, io: ThreadPoolExecutor, store: Store, key: str) -> None:
        self._io, self._store = io, store
        self.store_keys = [f"{key}/k", f"{key}/v"]
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._length = 0  # while offloaded
        self._put: Future[_KV | None] | None = None  # set while offloaded; its result: KV it failed to store
        self._fetch: Future[_KV] | None = None
        super().__init__()

    @property
    def offloaded(self) -> bool:
        """Whether the KV is in the store (or on its way there), not held by this layer."""
        return self._put is not None and self._keys is None

    @property
    def prefetched(self) -> bool:
        """Whether the offloaded KV's fetch has started (the next read waits for it instead of fetching)."""
        return self._fetch is not None

    def get_seq_length(self) -> int:
        if self._put is not None:
            return self._length
        k = self._keys
        return k.shape[-2] if self.is_initialized and k is not None and k.dim() >= 2 else 0

    def offload(self) -> None:
        if self._put is None and self._values is not None and self.get_seq_length() > 0:
            self._length = self.get_seq_length()
            kv, self._keys, self._values, self._fetch = (self._keys, self._values), None, None, None
            self._put = self._io.submit(self._put_kv, kv)

    def prefetch(self) -> None:
        if self._put is not None and self._fetch is None:
            self._fetch = self._io.submit(self._get_kv, self._put)

    def materialize(self) -> None:
        if self._put is not None:
            self.prefetch()
            (self._keys, self._values), self._put, self._fetch = self._fetch.result(), None, None  # type: ignore

    def _put_kv(self, kv: _KV) -> _KV | None:
        try:
            done = self._store.put_many(dict(zip(self.store_keys, kv, strict=True)))
            error: Exception | None = next(iter(done.errors.values()), None)
        except TierdError as exc:
            error = exc
        if error is None:
            return None
        # No room (or no store): the layer keeps its KV in memory rather than losing it.
        log.warning("offloading %s failed, keeping it in memory: %s", self.store_keys[0], error)
        return kv

    def _get_kv(self, put: Future[_KV | None]) -> _KV:
        kept = put.result()  # already done: queued before us (Note [offload without streams])
        if kept is not None:
            return kept
        got = self._store.get_many(self.store_keys, device=self.device if self.device.type != "cpu" else None)
        if got[0] is None or got[1] is None:
            raise NotFound(f"offloaded KV {self.store_keys[0]} is gone from the store (deleted by someone else?)")
        return got[0], got[1]

    def drop(self) -> None:
        """Forget the KV without touching the store (close() deletes it)."""
        self._keys = self._values = self._put = self._fetch = None
        self.is_initialized = False

    def reset(self) -> None:
        self.drop()
        super().reset()
        self._io.submit(_delete, self._store, self.store_keys)


def _delete(store: Store, keys: list[str]) -> None:
    try:
        store.delete_many(keys)
    except TierdError as exc:  # a store closed first (interpreter exit): its objects are not ours to keep
        log.debug("could not delete %s...: %s", keys[:1], exc)


def _release(io: ThreadPoolExecutor, store: Store, keys: list[str]) -> None:
    """Delete a cache's offloaded objects after every put still queued, and stop its worker."""
    try:
        io.submit(_delete, store, keys)
    except RuntimeError:  # interpreter exit stopped the worker, after it ran every queued put
        _delete(store, keys)
        return
    try:
        io.shutdown(wait=True)
    except RuntimeError:  # collected on the worker itself (cyclic GC there): the delete still runs, later
        pass


class TierdCache(DynamicCache):
    """A ``DynamicCache`` that offloads full-attention layers to tierd and reuses stored prompt prefixes.

    Args:
        store: ``tierd.open()`` or ``tierd.connect()``; not closed by :meth:`close`.
        model: the ``PreTrainedModel`` this cache serves, or its config (then ``model_id=`` is required).
        prompt: the prompt's token ids (``[n]`` or ``[1, n]``), to reuse its longest stored prefix
            (at most ``n - 1`` tokens, whole blocks, so the model computes at least one token) and to
            store its whole blocks after the prefill. Batch size 1 only.
        block_tokens: tokens per stored prefix block.
        offload: keep each full-attention layer's KV in the store between uses.
        salt, tp_rank, tp_size, namespace: as :class:`tierd.PrefixKVStore` (part of every prefix key);
            ``namespace`` also holds the offloaded layers.
        model_id: the keyspace's model id (default :func:`model_fingerprint` of ``model``, hashed
            per cache: for many requests, compute it once and pass it here).
        dtype, device: the KV's dtype, and where a reused prefix is loaded (default the model's;
            ``float32`` and CPU for a config). A model split over devices cannot take ``prompt=``.

    Invariant the caller keeps: the ``input_ids`` given to ``generate()`` start with ``prompt``,
    and no ``attention_mask`` hides any of its tokens: the cache sees KV, not tokens, and would
    store other KV under the prompt's keys.

    Attributes:
        reused_tokens: prompt tokens loaded from the store at construction.
        prefix: the :class:`tierd.PrefixKVStore` used for reuse and :meth:`save`.
        key_prefix: the prefix of this cache's offloaded objects (``{namespace}/cache-{uuid}``).

    Raises:
        InvalidArgument: a bad prompt (empty, a batch) or namespace, a config without ``model_id=``,
            an encoder-decoder model, or ``prompt=`` on a model with non-full-attention layers.
    """

    def __init__(self, store: Store, model: PreTrainedModel | PreTrainedConfig, *,
                 prompt: Sequence[int] | torch.Tensor | None = None, block_tokens: int = 16, offload: bool = True,
                 salt: str = "", tp_rank: int = 0, tp_size: int = 1, namespace: str = "kv",
                 model_id: str | None = None, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None) -> None:
        if isinstance(model, PreTrainedConfig):
            config, dtype, device = model, dtype or torch.float32, device or "cpu"
            if model_id is None:
                raise InvalidArgument("TierdCache given a config needs model_id= (a name for these weights)")
        elif isinstance(model, PreTrainedModel):
            config, dtype, device = model.config, dtype or model.dtype, device or model.device
        else:
            raise InvalidArgument(f"model must be a PreTrainedModel or its config, got {type(model).__name__}")
        if config.is_encoder_decoder:
            raise InvalidArgument("TierdCache serves decoder-only models; this one is encoder-decoder")
        if not namespace or "/" in namespace:
            raise InvalidArgument(f"namespace must be a non-empty name without '/', got {namespace!r}")
        text = config.get_text_config(decoder=True)
        super().__init__(config=text)
        self.layer_types = get_layer_types_and_kwargs(text)[0]
        self.store = store
        self.reused_tokens = 0
        self.key_prefix = f"{namespace}/cache-{uuid.uuid4().hex}"
        self.prefix = PrefixKVStore(store, model=model_id or model_fingerprint(model), block_tokens=block_tokens,
                                    namespace=namespace, dtype=dtype, tp_rank=tp_rank, tp_size=tp_size, salt=salt)
        self._closed = False
        self._io: ThreadPoolExecutor | None = None
        self._stored: list[int] = []  # indices of the offloaded layers
        if offload:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tierd-cache")
            self._stored = [i for i, t in enumerate(self.layer_types) if t == "full_attention"]
            for i in self._stored:
                self.layers[i] = _StoredLayer(self._io, store, f"{self.key_prefix}/{i}")
            keys = [k for i in self._stored for k in self.layers[i].store_keys]
            # Holds the worker and the store, never self: collecting the cache runs it.
            self._finalizer = weakref.finalize(self, _release, self._io, store, keys)
        self._prompt: torch.Tensor | None = None
        self._loaded: torch.Tensor | None = None  # the reused prefix, [layers, 2, reused, heads, dim], until saved
        self._save_kv: torch.Tensor | None = None  # the prompt's whole blocks, filled layer by layer in prefill
        self._captured: set[int] = set()  # the layers already copied into it
        self._checked = False
        if prompt is not None:
            self._check_reusable()
            self._prompt = _token_ids(prompt, "prompt=")
            self._load(torch.device(device))

    # -- prefix reuse ----------------------------------------------------------

    def _check_reusable(self) -> None:
        other = sorted({t for t in self.layer_types if t != "full_attention"})
        if other:
            raise InvalidArgument(f"prefix reuse needs every layer to be full attention; this model also has "
                                  f"{', '.join(other)} layers: use prompt=None (offload still works)")

    def _load(self, device: torch.device) -> None:
        prompt, b = self._prompt, self.prefix.block_tokens
        limit = (len(prompt) - 1) // b * b if prompt is not None else 0
        if limit == 0:
            return
        try:
            kv = self.prefix.get(prompt[:limit])  # type: ignore[index]
        except NotFound:  # a block deleted between lookup and fetch: a miss
            return
        if kv.shape[2] == 0:
            return
        if kv.shape[0] != len(self.layers):
            raise InvalidArgument(f"the stored prefix has {kv.shape[0]} layers, this model {len(self.layers)}: "
                                  "is model_id= right?")
        for i, layer in enumerate(self.layers):
            # [tokens, heads, dim] -> [1, heads, tokens, dim]: a view; the prefill's torch.cat makes it contiguous.
            k, v = (kv[i, j].transpose(0, 1).unsqueeze(0).to(device) for j in (0, 1))
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        self.reused_tokens = kv.shape[2]
        self._loaded = kv

    def _capture(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Copy layer ``layer_idx``'s new whole prompt blocks once it holds the prompt; store them after the last."""
        prompt, r, b = self._prompt, self.reused_tokens, self.prefix.block_tokens
        if prompt is None or layer_idx in self._captured or keys.shape[-2] < len(prompt):
            return
        n = len(prompt) // b * b
        if n <= r:  # no new whole block: all of the prompt's are stored already
            self._prompt = self._loaded = None
            return
        if self._save_kv is None:  # [layers, 2, n, heads, dim], the reused part already in place
            self._save_kv = torch.empty(len(self.layers), 2, n, keys.shape[1], keys.shape[3], dtype=keys.dtype)
            if self._loaded is not None:
                self._save_kv[:, :, :r] = self._loaded
        self._save_kv[layer_idx, 0, r:] = keys[0, :, r:n].transpose(0, 1)
        self._save_kv[layer_idx, 1, r:] = values[0, :, r:n].transpose(0, 1)
        self._captured.add(layer_idx)
        if len(self._captured) < len(self.layers):
            return
        kv, self._prompt, self._loaded, self._save_kv = self._save_kv, None, None, None
        try:  # a full store must not fail the generation: the next request just reuses less
            self.prefix.put(prompt[:n], kv)
        except TierdError as exc:
            log.warning("could not store the prompt's KV blocks: %s", exc)

    def save(self, tokens: Sequence[int] | torch.Tensor) -> int:
        """Store the KV of ``tokens``' whole blocks: the tokens this cache holds, from position 0.

        Only the blocks within the cache's sequence length are stored (after ``generate``,
        the last generated token has no KV yet); blocks already stored are not written again.

        Returns:
            tokens whose blocks are now stored (a multiple of ``block_tokens``).

        Raises:
            InvalidArgument: the cache holds a batch, or the model has non-full-attention layers.
        """
        self._check_reusable()
        t = _token_ids(tokens, "tokens")
        n = min(len(t), self.get_seq_length()) // self.prefix.block_tokens * self.prefix.block_tokens
        if n == 0:
            return 0
        if self.layers[0].keys.shape[0] != 1:
            raise InvalidArgument(f"save() takes a cache of batch size 1, this one holds {self.layers[0].keys.shape[0]}")
        kv = torch.stack([torch.stack([layer.keys[0, :, :n].transpose(0, 1), layer.values[0, :, :n].transpose(0, 1)])
                          for layer in self.layers]).cpu()
        for i in self._stored:  # reading them brought them back: put them away again
            self.layers[i].offload()
        return self.prefix.put(t[:n], kv)

    # -- the Cache interface -----------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's KV to layer ``layer_idx`` and return the layer's whole KV (as DynamicCache).

        With offload, starts fetching the next offloaded layer first, and puts this one away after.
        """
        if self._closed:
            raise StoreClosed("this TierdCache was closed; make a new one")
        if not self._checked:  # the first update: what construction could not see
            if self._prompt is not None and key_states.shape[0] != 1:
                raise InvalidArgument(f"prompt= takes batch size 1, generate() ran a batch of {key_states.shape[0]}")
            if self._prompt is not None and key_states.dtype != self.prefix.dtype:
                raise InvalidArgument(f"the model's KV is {key_states.dtype}, this cache keys {self.prefix.dtype}: "
                                      f"pass dtype={key_states.dtype}")
            self._checked = True
        if self._stored:
            self.prefetch(layer_idx + 1)
        keys, values = self.layers[layer_idx].update(key_states, value_states, *args, **kwargs)
        if self._prompt is not None:
            self._capture(layer_idx, keys, values)
        if self._stored:
            self.offload(layer_idx)
        return keys, values

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Start fetching the first offloaded layer from ``layer_idx`` on, wrapping to the first."""
        if self._stored:
            nxt = next((i for i in self._stored if i >= layer_idx), self._stored[0])
            self.layers[nxt].prefetch()

    def offload(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """Put layer ``layer_idx``'s KV into the store and drop it from memory (offloaded layers only)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, _StoredLayer):
            layer.offload()

    def flush(self) -> None:
        """Wait until every offload queued so far has landed in the store (and every delete is done)."""
        if self._io is not None and not self._closed:
            self._io.submit(lambda: None).result()  # one worker, in order: all before it are done

    def reset(self) -> None:
        """Empty the cache and delete its offloaded objects; the prompt is forgotten (nothing more is saved)."""
        if self._closed:
            return
        super().reset()
        self._prompt = self._loaded = self._save_kv = None
        self._captured = set()
        self.reused_tokens = 0

    def close(self) -> None:
        """Delete this cache's offloaded objects and stop its worker; idempotent.

        The cache is empty afterwards (as after :meth:`reset`) and refuses further updates.
        """
        if self._closed:
            return
        self._closed = True
        for layer in self.layers:
            if isinstance(layer, _StoredLayer):
                layer.drop()
            else:
                layer.reset()
        if self._io is not None:
            self._finalizer()  # waits: every queued put has landed and been deleted
        self.prefix.close()
        self._prompt = self._loaded = self._save_kv = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
