"""Object keys: what a user may send, and how the daemon scopes them to a uid.

A user key is ``namespace/name`` (UTF-8, 1 to 1024 bytes, no NUL, not a
path that climbs out of a directory). The daemon keeps keys of namespaces
not marked ``shared`` apart per uid by appending ``"\\0" + uid``: user keys
never hold NUL, so a scoped key cannot collide with a user key, and
:func:`user_key` recovers what the user wrote. Every message and listing
that reaches a user shows :func:`user_key`, never the scoped form.
"""

from __future__ import annotations

from tierd.errors import InvalidArgument

__all__ = ["MAX_KEY_BYTES", "MAX_CHAIN", "validate_key", "validate_chain", "namespace_of", "scope", "user_key",
           "owner_of"]

MAX_CHAIN = 1 << 16  # blocks in one declared prefix chain (a 16 M-token context at 256 tokens a block)

MAX_KEY_BYTES = 1024
DEFAULT_NAMESPACE = "default"
_SCOPE = "\x00"


def validate_key(key: object) -> str:
    """Return ``key`` if it is a valid object key; raise InvalidArgument otherwise."""
    if not isinstance(key, str):
        raise InvalidArgument(f"keys are strings 'namespace/name', got {type(key).__name__}")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise InvalidArgument(f"key {key!r} is not valid UTF-8") from None
    if not 0 < size <= MAX_KEY_BYTES:
        raise InvalidArgument(f"keys must be 1 to {MAX_KEY_BYTES} bytes of UTF-8, got {size}")
    if _SCOPE in key:
        raise InvalidArgument(f"keys must not contain NUL, got {key!r}")
    # Keys never name files today, but a key that reads as a path (a tier on
    # files, a trace, a tool) must not climb out of its directory.
    if key.startswith("/") or ("." in key and any(part in (".", "..") for part in key.split("/"))):
        raise InvalidArgument(f"keys must not be absolute or hold '.' or '..' parts, got {key!r}")
    return key


def namespace_of(key: str) -> str:
    """``"kv/abc" -> "kv"``; a key without ``/`` is in namespace ``default``."""
    ns, sep, _ = key.partition("/")
    return ns if sep and ns else DEFAULT_NAMESPACE


def scope(key: str, uid: int | None) -> str:
    """The engine's key for ``uid``'s ``key`` in a namespace that is not shared."""
    return f"{key}{_SCOPE}{uid}"


def user_key(engine_key: str) -> str:
    """The key as its user wrote it: ``engine_key`` without its uid scope."""
    return engine_key.partition(_SCOPE)[0]


def owner_of(engine_key: str) -> str | None:
    """The uid (as text) an engine key is scoped to, or None for a shared key."""
    _, sep, uid = engine_key.partition(_SCOPE)
    return uid if sep else None


def validate_chain(keys: object, *, each: bool = True) -> list[str]:
    """``keys`` as one prefix chain (``Store.declare_prefix``): valid keys, one namespace, none twice.

    ``each=False``: the keys were validated already (the engine's, scoped per uid by the daemon).
    """
    if isinstance(keys, (str, bytes)):
        raise InvalidArgument("declare_prefix takes a sequence of keys (one chain, head first), not one key")
    chain = [validate_key(k) for k in keys] if each else list(keys)  # type: ignore[call-overload]
    if len(chain) > MAX_CHAIN:
        raise InvalidArgument(f"a prefix chain holds at most {MAX_CHAIN} keys, got {len(chain)}; declare each "
                              "request's chain")
    if len(set(chain)) != len(chain):
        raise InvalidArgument("a key appears twice in this prefix chain: a block cannot be its own ancestor")
    if len({namespace_of(k) for k in chain}) > 1:
        raise InvalidArgument("a prefix chain's keys are all in one namespace, got "
                              f"{sorted({namespace_of(k) for k in chain})}")
    return chain
