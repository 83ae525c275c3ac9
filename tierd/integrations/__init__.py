"""Serving engines and frameworks that use tierd through their own plug-in points.

Each submodule imports its framework, so nothing here is imported by
``import tierd``; import the one you need:

- :mod:`tierd.integrations.lmcache`: ``TierdConnector``, a ``native_plugin`` L2 connector for
  LMCache's multiprocess mode (vLLM and SGLang through LMCache).
- :mod:`tierd.integrations.sglang`: ``TierdHiCacheStorage``, an SGLang HiCache storage backend
  (``--hicache-storage-backend dynamic``).
- :mod:`tierd.integrations.transformers`: ``TierdCache``, a ``generate()`` cache that keeps
  layers' KV in tierd and reuses stored prefixes.

Every one keys KV by a :class:`tierd.KVKeyspace` (model, dtype, layout, page size,
tensor-parallel shard, tenant salt), so blocks are shared exactly where they are interchangeable.
"""
