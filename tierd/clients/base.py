"""The Store interface that ``tierd.open()`` and ``tierd.connect()`` both return."""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import torch

from tierd.clients.values import Value
from tierd.types import ObjectInfo, Stats

__all__ = ["Staging", "Store"]


class Staging:
    """Host memory reserved in a store's arena for the caller: see :meth:`Store.stage`.

    ``buffer`` is a flat uint8 tensor, page-aligned, that no object uses;
    :meth:`release` (or leaving the ``with`` block) gives the space back, once.
    """

    __slots__ = ("buffer", "_release")

    def __init__(self, buffer: torch.Tensor, release: Callable[[], None]) -> None:
        self.buffer = buffer
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> torch.Tensor:
        return self.buffer

    def __exit__(self, *exc: object) -> None:
        self.release()


_staging_ids = itertools.count()


def staging_key() -> str:
    """The key a staging reservation is prepared under: never committed, so never visible."""
    return f"staging/{os.getpid()}-{next(_staging_ids)}"


class Store(ABC):
    """A tensor store over tiers. Thread-safe; use as a context manager or call :meth:`close`.

    Keys are strings ``namespace/name``; the namespace picks defaults from
    the config's ``[namespaces.NAME]``. Values are tensors (any dtype, shape
    and strides; returned contiguous, same shape) or raw bytes (returned as
    ``bytes``).

    Note for implementers: subclasses implement the abstract methods;
    ``put_async``, ``get_async`` and the context manager come from here.
    """

    def __init__(self) -> None:
        self._async = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tierd-async")

    @abstractmethod
    def put(
        self, key: str, value: Value, *, tier: str | None = None, durable: bool | None = None,
        codec: str | None = None, pin: bool = False, ttl: float | None = None,
    ) -> None:
        """Store ``value`` under ``key``, replacing any earlier value.

        Args:
            tier: highest tier it may land in (default: the namespace's, else host).
            durable: fsync to nvme and keep across restarts (default: the namespace's).
            codec: ``"none"``, ``"zstd"`` or ``"bytegroup"``, used on nvme.
            pin: never evict it from the tier it lands in.
            ttl: seconds until it is deleted.

        Raises:
            InvalidArgument, QuotaExceeded, OutOfSpace (nothing stored before is lost).
        """

    def put_async(self, key: str, value: Value, **kwargs: Any) -> Future[None]:
        """:meth:`put` in the background; do not modify ``value`` until the future is done."""
        return self._async.submit(self.put, key, value, **kwargs)

    @abstractmethod
    def get(self, key: str, *, device: str | torch.device | None = None, out: torch.Tensor | None = None) -> Any:
        """The value stored under ``key``: a new tensor, ``out`` filled in place, or bytes.

        Raises:
            NotFound: no such key. CorruptObject: stored bytes fail their checksum.
            InvalidArgument: ``out`` does not match the object.
        """

    def get_async(self, key: str, **kwargs: Any) -> Future[Any]:
        """:meth:`get` in the background."""
        return self._async.submit(self.get, key, **kwargs)

    @abstractmethod
    def prefetch(self, keys: Iterable[str] | str, *, tier: str = "host") -> None:
        """Start bringing ``keys`` up to ``tier``; returns at once (a hint: missing keys are ignored)."""

    @abstractmethod
    def declare_schedule(self, keys: Sequence[str], *, cyclic: bool = True) -> None:
        """Promise the coming access order of ``keys`` (repeating if ``cyclic``).

        Namespaces whose policy or prefetch is ``schedule`` (or ``sequential``)
        plan with it: evict what is needed last, bring up what comes next. A
        wrong promise costs hits, nothing else: the schedule is re-learned from
        the accesses when they stop matching it.
        """

    @abstractmethod
    def move(self, key: str, tier: str) -> None:
        """Promote or demote ``key`` to ``tier`` now. Raises NotFound, OutOfSpace."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; True if it existed. Readers already copying finish undisturbed."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether ``key`` is stored (and not expired)."""

    @abstractmethod
    def info(self, key: str) -> ObjectInfo:
        """Where and how ``key`` is stored. Raises NotFound."""

    @abstractmethod
    def keys(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix``, sorted."""

    @abstractmethod
    def stats(self) -> Stats:
        """Per-tier counters (see :class:`tierd.TierStats`)."""

    def stage(self, nbytes: int) -> Staging | None:
        """Reserve ``nbytes`` of the store's host arena for the caller, or None.

        For writers that fill a large buffer and then drain it elsewhere
        (``checkpoint.async_save`` snapshots into one): the bytes sit in the
        arena the daemon already holds pinned and shared, instead of a second
        copy in the caller's memory. None when there is no arena to use (no
        room now, or a daemon that does not share its arena with this uid);
        the caller then stages in its own memory. Counts against the host tier
        (and may push objects down) until released.
        """
        return None

    def close(self) -> None:
        """Finish pending async work and release resources; idempotent."""
        self._async.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetch_keys(keys: Iterable[str] | str) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys)
