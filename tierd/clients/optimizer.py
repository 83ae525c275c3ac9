"""``tierd.offload_optimizer``: optimizer state lives in the store between steps.

Between steps the optimizer's state tensors (Adam's ``exp_avg`` and
``exp_avg_sq``, SGD's ``momentum_buffer``, ...) are not in memory: they are
in the store. ``step()`` brings them back, runs the wrapped optimizer
unchanged, and puts them back. The math is the wrapped optimizer's, on the
same bytes, so parameters come out bitwise identical.

Fetches start early: a post-accumulate-grad hook on every parameter starts
fetching that parameter's state as soon as its gradient is ready, while
backward is still running for the layers below, so ``step()`` rarely waits.
"""

from __future__ import annotations

import logging
import uuid
import weakref
from concurrent.futures import Future
from typing import Any

import torch

from tierd.clients.base import Store
from tierd.errors import TierdError

__all__ = ["OffloadedOptimizer", "offload_optimizer"]

log = logging.getLogger("tierd.clients.optimizer")


class OffloadedOptimizer:
    """An optimizer whose state tensors live in a tierd store between steps.

    Everything not listed here (``param_groups``, ``zero_grad``, ``defaults``,
    ...) is the wrapped optimizer's. ``state_dict()`` returns a snapshot (its
    tensors do not change as training goes on); ``load_state_dict()`` loads
    and then offloads.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, store: Store, *, tier: str = "host",
                 min_bytes: int = 4096) -> None:
        self.optimizer = optimizer
        self.store = store
        self.tier = tier
        self.min_bytes = min_bytes
        self._session = uuid.uuid4().hex[:12]
        # Where each offloaded state tensor went: param -> {name: (key, device)}.
        self._offloaded: dict[torch.Tensor, dict[str, tuple[str, torch.device]]] = {}
        self._pending: dict[torch.Tensor, dict[str, Future[Any]]] = {}
        self._index: dict[torch.Tensor, int] = {}
        self._hooks: list[Any] = []
        self._watch_params()
        self._offload()
        # Keys are deleted with the wrapper, or at close().
        self._finalizer = weakref.finalize(self, _delete_keys, store, self._offloaded)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _watch_params(self) -> None:
        for p in self._params():
            if p in self._index:
                continue
            self._index[p] = len(self._index)
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._prefetch))

    def _prefetch(self, p: torch.Tensor) -> None:
        """The gradient of ``p`` is ready: start fetching its state for the coming step."""
        where = self._offloaded.get(p)
        if not where or p in self._pending:
            return
        # Straight to the state's device: on a GPU, one DMA on the store's copy stream.
        self._pending[p] = {name: self.store.get_async(key, device=device) for name, (key, device) in where.items()}

    def _fetch(self) -> None:
        state = self.optimizer.state
        for p, where in list(self._offloaded.items()):
            pending = self._pending.pop(p, {})
            for name, (key, device) in where.items():
                fut = pending.get(name)
                value = fut.result() if fut is not None else self.store.get(key, device=device)
                if value.device != device:
                    value = value.to(device)
                if value.is_cuda:  # fetched on another thread's stream: the allocator must know its user
                    value.record_stream(torch.cuda.current_stream(value.device))
                state[p][name] = value
            del self._offloaded[p]

    def _offload(self) -> None:
        state = self.optimizer.state
        for p, pstate in state.items():
            where = self._offloaded.setdefault(p, {})
            for name, value in list(pstate.items()):
                if not isinstance(value, torch.Tensor) or value.numel() * value.element_size() < self.min_bytes:
                    continue  # small scalars (Adam's step) stay: not worth a round trip
                key = f"optim/{self._session}/{self._index.get(p, id(p))}/{name}"
                self.store.put(key, value, tier=self.tier)
                where[name] = (key, value.device)
                del pstate[name]  # the tensor's memory goes with its last reference
            if not where:
                del self._offloaded[p]

    def step(self, closure: Any = None) -> Any:
        """Fetch the state, run the wrapped optimizer's step, put the state back."""
        self._fetch()
        try:
            return self.optimizer.step(closure)
        finally:
            self._offload()

    @property
    def state(self) -> Any:
        """The wrapped optimizer's state, fetched (it stays resident until the next step)."""
        self._fetch()
        return self.optimizer.state

    def state_dict(self) -> dict[str, Any]:
        self._fetch()
        try:
            sd = self.optimizer.state_dict()
            # torch shares the live per-parameter dicts with the state dict; the
            # offload below empties those, so the snapshot gets its own.
            sd["state"] = {idx: dict(st) for idx, st in sd["state"].items()}
            return sd
        finally:
            self._offload()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fetch()  # the old state goes away below; its keys are rewritten
        self.optimizer.load_state_dict(state_dict)
        self._offload()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)
        self._watch_params()

    def offloaded_bytes(self) -> int:
        """Bytes of optimizer state now in the store."""
        total = 0
        for where in self._offloaded.values():
            for key, _ in where.values():
                total += self.store.info(key).nbytes
        return total

    def close(self) -> None:
        """Delete the offloaded state from the store and remove the hooks."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._finalizer()

    def __repr__(self) -> str:
        return f"OffloadedOptimizer({self.optimizer!r}, tier={self.tier!r})"


def _delete_keys(store: Store, offloaded: dict[torch.Tensor, dict[str, tuple[str, torch.device]]]) -> None:
    for where in offloaded.values():
        for key, _ in where.values():
            try:
                store.delete(key)
            except TierdError as exc:
                log.debug("could not delete %s: %s", key, exc)
    offloaded.clear()


def offload_optimizer(optimizer: torch.optim.Optimizer, store: Store, *, tier: str = "host",
                      min_bytes: int = 4096) -> OffloadedOptimizer:
    """Keep ``optimizer``'s state tensors in ``store`` between steps.

        opt = tierd.offload_optimizer(torch.optim.AdamW(model.parameters()), store)
        loss.backward(); opt.step(); opt.zero_grad()

    Works with Adam, AdamW, SGD with momentum and any optimizer whose state
    is tensors; parameters come out bitwise identical to the plain optimizer's.
    State tensors smaller than ``min_bytes`` stay in place.
    """
    return OffloadedOptimizer(optimizer, store, tier=tier, min_bytes=min_bytes)
