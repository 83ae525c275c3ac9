"""The Store interface that ``tierd.open()`` and ``tierd.connect()`` both return."""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Self

import torch

from tierd.clients.batch import BatchLease, Completions, Results, per_key
from tierd.clients.values import Value
from tierd.engine.keys import validate_chain
from tierd.errors import InvalidArgument, NotFound, TierdError
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

    def declare_prefix(self, keys: Sequence[str], *, done: bool = False) -> None:
        """Tell that ``keys`` form one prefix chain, head first: each key's parent is the key
        before it (KV-cache blocks of one request; ``PrefixKVStore`` calls this).

        Namespaces whose policy or admission is ``prefix`` keep a block's
        parent and depth: a block whose children are cached is not evicted
        before them, and new blocks are admitted to host by how often blocks
        of their kind are read again. Other namespaces ignore it.

        ``done``: the chain is over (a conversation closed, an agent's task
        finished). The blocks at its end that no other declared chain shares
        are not expected back: they go first when the tier needs room. They
        stay stored, and a read of one makes it an ordinary block again.

        Bad chains raise :class:`tierd.InvalidArgument` here. Through the
        daemon the call does not wait for the daemon's answer: what only the
        daemon could refuse is logged, not raised.
        """
        validate_chain(keys)  # a store that keeps no hints still refuses what no store could take

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

    # -- batches -----------------------------------------------------------------
    #
    # Defaults here loop over the single calls, so every Store has them; the
    # embedded and daemon stores answer each batch in one engine pass (and,
    # through the daemon, one frame each way).

    def put_many(self, items: Mapping[str, Value] | Iterable[tuple[str, Value]], *, tier: str | None = None,
                 durable: bool | None = None, codec: str | None = None, pin: bool = False,
                 ttl: float | None = None) -> Results:
        """Store every ``key -> value``; options as :meth:`put`, for all.

        Returns:
            True per item stored, False per item refused (``errors`` says why); one
            failure never stops the others.
        """
        pairs = pairs_of(items)
        errors: dict[str, TierdError] = {}
        for key, value in pairs:
            try:
                self.put(key, value, tier=tier, durable=durable, codec=codec, pin=pin, ttl=ttl)
            except TierdError as exc:
                errors[key] = exc
        return Results([key not in errors for key, _ in pairs], errors)

    def get_many(self, keys: Sequence[str], *, outs: Sequence[torch.Tensor | None] | None = None,
                 device: str | torch.device | None = None) -> Results:
        """The values of ``keys``, None for each missing one.

        Args:
            outs: one tensor (or None) per key, filled in place like ``get(out=)``:
                one copy from the host arena into the caller's memory (its pinned
                pool, its KV buffer).

        Returns:
            Values (``outs[i]`` itself where given), None where a key is missing, expired,
            or failed (a corrupt block: ``errors`` says which; never bad data).
        """
        keys = list(keys)
        check_outs(keys, outs)
        values: list[Any] = []
        errors: dict[str, TierdError] = {}
        for i, key in enumerate(keys):
            try:
                values.append(self.get(key, device=device, out=outs[i] if outs is not None else None))
            except NotFound:
                values.append(None)
            except TierdError as exc:
                errors[key] = exc
                values.append(None)
        return Results(values, errors)

    @per_key(False)
    def exists_many(self, keys: Sequence[str], *, lease: bool = False) -> Results:
        """Whether each key is stored; ``lease=True`` also pins what was found (``results.lease``,
        a :class:`BatchLease` to read them from and release)."""
        keys = list(keys)
        if not lease:
            return Results([self.exists(key) for key in keys])
        # Without an engine underneath, pinning means holding the found values themselves.
        held = self.get_many(keys)
        found = [value is not None for value in held]

        def read(outs: Sequence[torch.Tensor | None] | None, device: Any) -> Results:
            values: list[Any] = []
            for i, value in enumerate(held):
                out = outs[i] if outs is not None else None
                if value is None or not isinstance(value, torch.Tensor):
                    values.append(value)
                elif out is not None:
                    values.append(out.copy_(value))
                else:
                    values.append(value.to(device, copy=True) if device is not None else value.clone())
            return Results(values, held.errors)

        results = Results(found)
        results.lease = BatchLease(keys, found, read=read, release=lambda: None)
        return results

    @per_key(int)
    def prefix_length(self, keys: Sequence[str]) -> int:
        """How many of ``keys``, from the first, are stored (a prefix cache's hit length, in keys)."""
        n = 0
        for key in keys:
            if not self.exists(key):
                break
            n += 1
        return n

    @per_key(False)
    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        """Remove each key; True for each that existed."""
        return [self.delete(key) for key in keys]

    def put_many_async(self, items: Any, **kwargs: Any) -> Future[Results]:
        """:meth:`put_many` on the store's threads; do not modify the values until done."""
        return self._async.submit(self.put_many, pairs_of(items), **kwargs)

    def get_many_async(self, keys: Sequence[str], **kwargs: Any) -> Future[Results]:
        return self._async.submit(self.get_many, list(keys), **kwargs)

    def exists_many_async(self, keys: Sequence[str], **kwargs: Any) -> Future[Results]:
        return self._async.submit(self.exists_many, list(keys), **kwargs)

    def delete_many_async(self, keys: Sequence[str]) -> Future[list[bool]]:
        return self._async.submit(self.delete_many, list(keys))

    def completions(self) -> Completions:
        """A queue that runs batched calls on this store's threads and signals an eventfd when done
        (see :class:`tierd.Completions`): for event loops."""
        return Completions(self)

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

    def healthy(self) -> bool:
        """Whether calls can be served now; never raises (an engine's or a serving
        engine's health check). Subclasses answer for what they talk to."""
        return True

    def close(self) -> None:
        """Finish pending async work and release resources; idempotent."""
        self._async.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prefetch_keys(keys: Iterable[str] | str) -> list[str]:
    return [keys] if isinstance(keys, str) else list(keys)


def pairs_of(items: Mapping[str, Value] | Iterable[tuple[str, Value]]) -> list[tuple[str, Value]]:
    return list(items.items()) if isinstance(items, Mapping) else list(items)


def check_outs(keys: Sequence[str], outs: Sequence[Any] | None) -> None:
    if outs is not None and len(outs) != len(keys):
        raise InvalidArgument(f"outs= has {len(outs)} entries for {len(keys)} keys")
