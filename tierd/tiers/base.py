"""The contract every tier implements.

A tier stores opaque byte strings and hands back a *location*: a small,
immutable, msgpack-able record the engine keeps in its index (and, for
durable objects, in LMDB). Tiers know nothing of keys, tensors or policies;
the engine decides what goes where.

Note for implementers:

* ``write`` and ``read_into`` are called from many threads at once and must
  not hold the tier's lock while moving bytes;
* ``free`` of a location must be safe to call while nothing reads it (the
  engine defers frees until every reader has finished);
* ``stats`` is cheap and may be called often.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from tierd.codecs import Codec

__all__ = ["Tier", "TierUsage"]


@dataclass(frozen=True, slots=True)
class TierUsage:
    """Space accounting of one tier at one moment."""

    capacity_bytes: int
    used_bytes: int
    largest_free_bytes: int
    fragmentation: float


class Tier(ABC):
    """A medium that stores byte strings at locations."""

    name: ClassVar[str]
    #: True when stored bytes survive the process (and are fsync'ed for durable writes).
    persistent: ClassVar[bool] = False

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Bytes this tier may hold."""

    @abstractmethod
    def usage(self) -> TierUsage:
        """Current space accounting."""

    @abstractmethod
    def write(self, src: torch.Tensor, *, codec: Codec, itemsize: int, durable: bool) -> Any:
        """Store the bytes of the flat uint8 CPU tensor ``src``; return their location.

        Raises:
            OutOfSpace: the tier has no room for them (nothing else changes).
        """

    @abstractmethod
    def read_into(self, location: Any, dest: torch.Tensor, *, itemsize: int) -> None:
        """Fill the flat uint8 CPU tensor ``dest`` (the object's raw bytes).

        Raises:
            CorruptObject: the stored bytes fail their checksum.
        """

    @abstractmethod
    def free(self, location: Any) -> None:
        """Give the location's space back."""

    @abstractmethod
    def stored_nbytes(self, location: Any) -> int:
        """Bytes the location takes on the medium (after the codec)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files and mappings; the tier is unusable afterwards."""
