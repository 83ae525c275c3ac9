"""What every integration needs: the store it was pointed at, and keys that stay one path part."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import tierd
from tierd.errors import InvalidArgument

__all__ = ["open_for", "key_part", "check_namespace"]


def open_for(who: str, *, socket: str | None = None, embedded: bool = False,
             config: str | Mapping[str, Any] | None = None, store: tierd.Store | None = None) -> tuple[tierd.Store, bool]:
    """The store an integration's parameters name, and whether the integration owns (closes) it.

    ``store`` (an open store, from Python) wins; then an embedded engine (``embedded`` or a
    ``config``); else the node's daemon at ``socket`` (default: ``$TIERD_SOCKET``, then
    :func:`tierd.connect`'s default), so every worker on the machine shares one cache.
    """
    if store is not None:
        return store, False
    if embedded or config is not None:
        return tierd.open(config), True
    try:
        return tierd.connect(socket or os.environ.get("TIERD_SOCKET")), True
    except tierd.DaemonUnavailable as exc:
        raise tierd.DaemonUnavailable(f"{who}: {exc} (start `tierd serve`, pass socket=, or embedded=true)") from None


def key_part(text: str) -> str:
    """``text`` as one part of a key: '/' would split it into path parts ('%' escapes it)."""
    return text.replace("%", "%25").replace("/", "%2F")


def check_namespace(namespace: str) -> str:
    if not namespace or "/" in namespace:
        raise InvalidArgument(f"namespace must be a non-empty name without '/', got {namespace!r}")
    return namespace
