"""What batched Store calls return, and completion by file descriptor for event loops.

:class:`Results` is a list aligned with the keys of the call (a value or
None for ``get_many``, a bool for ``exists_many``, ...) whose ``errors``
says why a key failed when it was not simply absent (a corrupt block, a full
tier): the key's result is then a miss, never bad data.

:class:`BatchLease` pins what ``exists_many(..., lease=True)`` found: those
versions stay readable (``get_many`` on the lease reads them, whatever
happened to the keys since) until ``release()``, which never fails, or the
store closes.

:class:`Completions` serves event loops (LMCache's and SGLang's connectors
poll a file descriptor): ``submit_*`` run batched calls on the store's own
threads and return a ticket at once; the eventfd ``fd`` becomes readable
when results are ready; ``drain()`` returns ``(ticket, result)`` pairs (a
result is the call's return value, or the exception it raised).
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from tierd.errors import InvalidArgument, StoreClosed, TierdError

if TYPE_CHECKING:
    from tierd.clients.base import Store

__all__ = ["Results", "BatchLease", "Completions", "per_key"]

_Method = TypeVar("_Method", bound=Callable[..., Any])


class Results(list):  # type: ignore[type-arg]
    """Per-key results of a batched call, in the order of its keys; see the module's docstring.

    Attributes:
        errors: key -> the error that made its result a miss or a failure
            (absence is not an error: it is not listed).
        lease: for ``exists_many(..., lease=True)``, the :class:`BatchLease` on what was found.
    """

    def __init__(self, values: Sequence[Any] = (), errors: dict[str, TierdError] | None = None) -> None:
        super().__init__(values)
        self.errors: dict[str, TierdError] = errors or {}
        self.lease: BatchLease | None = None


class BatchLease:
    """Found versions of a batch of keys, pinned until :meth:`release`; a context manager.

    ``found[i]`` says whether ``keys[i]`` was found (and is pinned).
    """

    def __init__(self, keys: Sequence[str], found: Sequence[bool], *,
                 read: Callable[[Sequence[torch.Tensor | None] | None, Any], Results],
                 release: Callable[[], None]) -> None:
        self.keys = list(keys)
        self.found = list(found)
        self._read = read
        self._release: Callable[[], None] | None = release
        self._lock = threading.Lock()

    def get_many(self, *, outs: Sequence[torch.Tensor | None] | None = None, device: Any = None) -> Results:
        """The pinned values, aligned with :attr:`keys` (None where not found); ``outs`` as in
        :meth:`Store.get_many`."""
        if self._release is None:
            raise StoreClosed("the batch lease was released")
        if outs is not None and len(outs) != len(self.keys):
            raise InvalidArgument(f"outs= has {len(outs)} entries for {len(self.keys)} keys")
        return self._read(outs, device)

    def release(self) -> None:
        """Unpin; later calls do nothing, and it never raises."""
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            try:
                release()
            except (TierdError, OSError):
                pass  # the store or its connection is gone: its leases went with it

    def __enter__(self) -> BatchLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def per_key(miss: Any) -> Callable[[_Method], _Method]:
    """A batched call (``self, keys, ...``) in which an invalid key fails only its own item.

    The call runs on the valid keys alone (and their ``outs=``); each invalid key gets ``miss``
    (None, False) and its :class:`InvalidArgument` in ``errors``. ``prefix_length`` (an int) counts
    up to the first invalid key, which is never stored."""

    def wrap(method: _Method) -> _Method:
        @functools.wraps(method)
        def call(self: Any, keys: Sequence[str], *args: Any, **kwargs: Any) -> Any:
            from tierd.engine.keys import validate_key

            keys = list(keys)
            bad: dict[str, TierdError] = {}
            positions = []
            for i, key in enumerate(keys):
                try:
                    validate_key(key)
                    positions.append(i)
                except InvalidArgument as exc:
                    bad[key if isinstance(key, str) else repr(key)] = exc
            if not bad:
                return method(self, keys, *args, **kwargs)
            if miss is int:  # prefix_length
                valid = set(positions)
                return method(self, keys[:min(i for i in range(len(keys)) if i not in valid)], *args, **kwargs)
            outs = kwargs.get("outs")
            if outs is not None:
                if len(outs) != len(keys):
                    raise InvalidArgument(f"outs= has {len(outs)} entries for {len(keys)} keys")
                kwargs["outs"] = [outs[i] for i in positions]
            sub = method(self, [keys[i] for i in positions], *args, **kwargs)
            return _widen(keys, positions, sub, miss, bad)

        return call  # type: ignore[return-value]

    return wrap


def _widen(keys: list[str], positions: list[int], sub: Sequence[Any], miss: Any, bad: dict[str, TierdError]) -> Results:
    """``sub`` (the results of ``keys`` at ``positions``) spread back over every key, ``miss`` elsewhere."""
    values = [miss] * len(keys)
    for i, value in zip(positions, sub, strict=True):
        values[i] = value
    out = Results(values, {**bad, **getattr(sub, "errors", {})})
    held = getattr(sub, "lease", None)
    if held is not None:
        def read(outs: Sequence[torch.Tensor | None] | None, device: Any) -> Results:
            got = held.get_many(outs=[outs[i] for i in positions] if outs is not None else None, device=device)
            return _widen(keys, positions, got, None, bad)

        out.lease = BatchLease(keys, [bool(v) for v in values], read=read, release=held.release)
    return out


class Completions:
    """Batched calls completed on a store's threads, signalled on an eventfd; see the module's docstring."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ready: collections.deque[tuple[int, Any]] = collections.deque()
        self._tickets = itertools.count(1)
        self._lock = threading.Lock()
        self._closed = False

    def _submit(self, future: Future[Any]) -> int:
        ticket = next(self._tickets)

        def done(f: Future[Any]) -> None:
            exc = f.exception()
            self._ready.append((ticket, exc if exc is not None else f.result()))
            with self._lock:
                if not self._closed:
                    os.eventfd_write(self.fd, 1)

        future.add_done_callback(done)
        return ticket

    def submit_get_many(self, keys: Sequence[str], **kwargs: Any) -> int:
        return self._submit(self._store.get_many_async(keys, **kwargs))

    def submit_put_many(self, items: Any, **kwargs: Any) -> int:
        return self._submit(self._store.put_many_async(items, **kwargs))

    def submit_exists_many(self, keys: Sequence[str], **kwargs: Any) -> int:
        return self._submit(self._store.exists_many_async(keys, **kwargs))

    def submit_delete_many(self, keys: Sequence[str]) -> int:
        return self._submit(self._store.delete_many_async(keys))

    def drain(self) -> list[tuple[int, Any]]:
        """Every completion so far, oldest first (and the fd read back to not readable)."""
        with self._lock:
            if not self._closed:
                try:
                    os.eventfd_read(self.fd)
                except BlockingIOError:
                    pass
        out = []
        while self._ready:
            out.append(self._ready.popleft())
        return out

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> Completions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
