"""tierd: a memory-tier manager for machine-learning state.

    import tierd
    with tierd.open() as store:
        store.put("acts/layer3", tensor)
        t = store.get("acts/layer3")
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from tierd.clients import checkpoint
from tierd.clients.activations import offload_activations
from tierd.clients.base import Staging, Store
from tierd.clients.embedded import EmbeddedStore, open_store
from tierd.clients.gpu import with_gpu_tier
from tierd.clients.kv import KVKeyspace, PrefixKVStore
from tierd.clients.optimizer import OffloadedOptimizer, offload_optimizer
from tierd.clients.remote import RemoteStore
from tierd.config import Config, load_config
from tierd.errors import (
    Busy,
    ConfigError,
    CorruptObject,
    DaemonUnavailable,
    InternalError,
    InvalidArgument,
    MediaError,
    NotFound,
    OutOfSpace,
    ProtocolError,
    QuotaExceeded,
    StoreClosed,
    TierdError,
)
from tierd.types import ObjectInfo, Stats, TierStats

__version__ = "0.1.0"

__all__ = [
    "open", "connect", "checkpoint", "PrefixKVStore", "KVKeyspace", "offload_activations", "offload_optimizer", "OffloadedOptimizer", "Store", "Staging", "EmbeddedStore", "RemoteStore", "Config", "load_config", "ObjectInfo", "Stats", "TierStats",
    "TierdError", "NotFound", "OutOfSpace", "QuotaExceeded", "CorruptObject", "ProtocolError",
    "DaemonUnavailable", "ConfigError", "StoreClosed", "InvalidArgument", "MediaError",
    "Busy", "InternalError",
]


def open(config: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None) -> Store:  # noqa: A001
    """Open the embedded store: the engine runs inside this process, no daemon needed.

    Args:
        config: a TOML path, a dict shaped like the TOML, a Config, or None for
            the defaults (host tier 25 % of RAM up to 8 GiB; nvme under
            ``$XDG_CACHE_HOME/tierd``). ``TIERD_*`` variables override it.

    Raises:
        ConfigError: the configuration is invalid.
        TierdError: the nvme directory is owned by another open store.
    """
    store = open_store(config)
    gpu = store.config.tiers.gpu
    return with_gpu_tier(store, gpu.budget, gpu.fraction)


def connect(socket: str | os.PathLike[str] | None = None, *, timeout_s: float = 120.0) -> Store:
    """Connect to a running ``tierd serve`` daemon; the same interface as :func:`open`.

    Args:
        socket: the daemon's socket; default ``$TIERD_SOCKET``, else
            ``$XDG_RUNTIME_DIR/tierd.sock``, else ``/run/tierd/tierd.sock`` as
            root, else ``/tmp/tierd-UID/tierd.sock``.
        timeout_s: the longest a call may wait on a daemon that stays silent (hung, stopped):
            then it raises DaemonUnavailable and the next call reconnects.

    Raises:
        DaemonUnavailable: no daemon answers there.
        ProtocolError: the daemon speaks another protocol version.
    """
    store = RemoteStore(socket, timeout_s=timeout_s)
    return with_gpu_tier(store, store.gpu_budget, store.gpu_fraction)
