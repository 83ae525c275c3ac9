"""Errors raised by tierd.

Every error is a :class:`TierdError`; where a builtin exception has the same
meaning the error inherits it too, so ``except KeyError`` still catches
:class:`NotFound` and ``except OSError`` still catches :class:`OutOfSpace`.
Messages are lowercase, state the rule and the offending value, and say what
to change.
"""

from __future__ import annotations

__all__ = [
    "TierdError",
    "NotFound",
    "OutOfSpace",
    "QuotaExceeded",
    "CorruptObject",
    "ProtocolError",
    "DaemonUnavailable",
    "ConfigError",
    "StoreClosed",
    "InvalidArgument",
    "MediaError",
    "Busy",
    "InternalError",
]


class TierdError(Exception):
    """Base class of every error tierd raises on purpose."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want plain text
        return str(self.args[0]) if self.args else self.__class__.__name__


class NotFound(TierdError, KeyError):
    """The key is not stored (never put, deleted, or expired)."""


class OutOfSpace(TierdError, OSError):
    """No tier below the requested one has room; nothing stored was dropped."""


class QuotaExceeded(TierdError):
    """A namespace or uid quota would be exceeded by this put."""


class CorruptObject(TierdError, ValueError):
    """Stored bytes do not match their checksum."""


class ProtocolError(TierdError):
    """A malformed, oversized or unexpected frame on the wire."""


class DaemonUnavailable(TierdError, ConnectionError):
    """The daemon cannot be reached, or went away."""


class ConfigError(TierdError, ValueError):
    """A configuration value is invalid; the message names the key."""


class StoreClosed(TierdError, RuntimeError):
    """The store was closed by its owner and cannot be used any more."""


class InvalidArgument(TierdError, ValueError):
    """A key, value or option the store cannot accept; the message says why."""


class MediaError(TierdError, OSError):
    """A tier's medium failed (I/O error, missing or read-only directory)."""


class Busy(TierdError, RuntimeError):
    """Someone else holds what this call needs (an object being moved, a socket, an nvme directory); the
    message says who, and whether trying again later helps."""


class InternalError(TierdError, RuntimeError):
    """tierd broke one of its own invariants: a bug to report, with the message and the daemon's log."""


def error_class(name: str) -> type[TierdError]:
    """The error class named ``name`` (as the daemon's replies spell it); TierdError for an unknown name."""
    cls = globals().get(name)
    return cls if isinstance(cls, type) and issubclass(cls, TierdError) else TierdError
