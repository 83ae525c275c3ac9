"""Per-namespace policies: which object leaves a tier, which comes up early, which may enter.

Each namespace (the part of a key before the first ``/``) has its own
eviction, prefetch and admission policies, built from ``[namespaces.NAME]``
and sharing one schedule tracker. The engine tells this class what happens
to objects and asks it in which order to consider victims; it never moves
bytes. All methods are called under the engine lock.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tierd.config import Config, NamespaceConfig
from tierd.engine.index import ObjectRecord
from tierd.policies import (
    AdmissionPolicy,
    CostModel,
    EvictionPolicy,
    PrefetchPolicy,
    PrefixHints,
    PrefixPolicy,
    Schedule,
    make_admission_policy,
    make_eviction_policy,
    make_prefetch_policy,
)

__all__ = ["Namespace", "NamespacePolicies"]

log = logging.getLogger("tierd.engine.namespaces")



def _monotonic_deadline(expires_at: float | None) -> float | None:
    """A wall-clock expiry as a deadline on the monotonic clock the policies are given."""
    return None if expires_at is None else time.monotonic() + (expires_at - time.time())


@dataclass(slots=True, eq=False)
class Namespace:
    """The policies of one namespace, sharing one schedule tracker."""

    config: NamespaceConfig
    eviction: EvictionPolicy
    prefetch: PrefetchPolicy
    admission: AdmissionPolicy
    schedule: Schedule
    hints: PrefixHints | None = None  # a prefix cache's blocks: parents, depths, reads (prefix policies)
    used: defaultdict[str, int] = field(default_factory=lambda: defaultdict(int))  # tier -> bytes held there
    evicted: int = 0  # objects dropped to make room (cache namespaces only)

    @property
    def follows_schedule(self) -> bool:
        return self.config.eviction_policy == "schedule" or self.config.prefetch_policy == "schedule"

    def track(self, rec: ObjectRecord, tier: str) -> None:
        """``rec`` now has a copy on ``tier``."""
        self.used[tier] += rec.nbytes
        self.eviction.on_insert(rec.key, tier, rec.nbytes, time.monotonic(), pinned=rec.pinned,
                                expires_at=_monotonic_deadline(rec.expires_at))


class NamespacePolicies:
    """The namespaces' policies, created on first use from the current config."""

    def __init__(self, config: Callable[[], Config], cost: CostModel) -> None:
        self._config = config
        self._cost = cost
        # room(tier, nbytes): whether that fits without demoting anything (set by the engine).
        self.room: Callable[[str, int], bool] | None = None
        self._namespaces: dict[str, Namespace] = {}

    def get(self, name: str) -> Namespace:
        ns = self._namespaces.get(name)
        if ns is None:
            ns = self._namespaces[name] = self._build(self._config().namespace(name))
        return ns

    def _build(self, cfg: NamespaceConfig, hints: PrefixHints | None = None) -> Namespace:
        """``hints``: what an earlier build of this namespace learned of its blocks (kept across a swap)."""
        schedule = Schedule()
        if "prefix" not in (cfg.eviction_policy, cfg.admission_policy):
            hints = None
        elif hints is None:
            hints = PrefixHints()
        eviction = make_eviction_policy(cfg.eviction_policy, schedule, hints=hints)
        eviction.cost = self._cost  # GDSF's fetch cost: measured by the engine
        prefetch = make_prefetch_policy(cfg.prefetch_policy, schedule, depth=cfg.prefetch_depth)
        admission = make_admission_policy(cfg.admission_policy, hints=hints, max_bytes=cfg.admit_max,
                                          eviction=eviction,
                                          room=lambda tier, n: self.room is not None and self.room(tier, n))
        return Namespace(cfg, eviction, prefetch, admission, schedule, hints)

    # -- what happens to objects -------------------------------------------------

    def on_insert(self, rec: ObjectRecord, tier: str) -> None:
        self.get(rec.namespace).track(rec, tier)

    def on_remove(self, rec: ObjectRecord, tier: str) -> None:
        ns = self.get(rec.namespace)
        ns.used[tier] -= rec.nbytes
        ns.eviction.on_remove(rec.key, tier)

    def on_access(self, rec: ObjectRecord) -> None:
        """``rec`` is read."""
        ns = self.get(rec.namespace)
        if ns.hints is not None:
            ns.hints.read(rec.key)  # before the eviction policy: it classifies by the read
        ns.eviction.on_access(rec.key, rec.tier, time.monotonic())

    def on_delete(self, rec: ObjectRecord) -> None:
        """``rec`` was deleted (after its copies were removed)."""
        ns = self.get(rec.namespace)
        if ns.hints is not None:
            ns.hints.forget(rec.key)

    def describe(self) -> dict[str, dict[str, Any]]:
        """Per namespace in use: its policies and what they learned (``tierd status``)."""
        out: dict[str, dict[str, Any]] = {}
        for name, ns in self._namespaces.items():
            cfg = ns.config
            row: dict[str, Any] = {"policy": cfg.eviction_policy, "admission": cfg.admission_policy,
                                   "prefetch": cfg.prefetch_policy, "admission_table": ns.admission.table()}
            if self._config().is_cache(name):
                row["evicted"] = ns.evicted
            if ns.hints is not None:
                row["hinted_blocks"] = len(ns.hints)
            if isinstance(ns.eviction, PrefixPolicy):
                row["experts"] = ns.eviction.experts("host")
            out[name] = row
        return out

    def declare_prefix(self, namespace: str, keys: list[str], *, done: bool = False) -> bool:
        """``keys`` (all of ``namespace``) are one prefix chain, head first (``done``: and it is
        over); ignored (and no namespace made) unless the namespace's policies are prefix ones:
        whether they were kept."""
        ns = self._namespaces.get(namespace)
        if ns is None:
            cfg = self._config().namespace(namespace)
            if "prefix" not in (cfg.eviction_policy, cfg.admission_policy):
                return False
            ns = self.get(namespace)
        if ns.hints is None:
            return False
        ns.hints.declare(keys)
        if done:
            ns.hints.finish(keys[-1])
        return True

    def parent_of(self, namespace: str, key: str) -> str:
        """``key``'s declared parent ("" if none or not a prefix namespace): what traces record."""
        hints = self.get(namespace).hints
        block = hints.get(key) if hints is not None else None
        return block.parent or "" if block is not None else ""

    def observe(self, namespace: str, key: str) -> list[str]:
        """Feed the namespace's schedule with an access; the keys its prefetch policy wants up now."""
        ns = self.get(namespace)
        if ns.follows_schedule:
            ns.schedule.observe(key)
        return ns.prefetch.on_access(key, time.monotonic())

    def admit(self, namespace: str, key: str, tier: str, nbytes: int) -> bool:
        """Whether a put of ``key`` may land in ``tier`` (asked once per put that would)."""
        ns = self.get(namespace)
        if ns.hints is not None:
            ns.hints.put(key)
        return ns.admission.admit(key, tier, nbytes, time.monotonic())

    # -- choices ---------------------------------------------------------------

    def victims(self, tier: str, need_bytes: int) -> Iterator[str]:
        """Candidate keys of ``tier``, each namespace in its own policy's order.

        On host, the namespace holding the most host bytes gives up its victims first.
        """
        now = time.monotonic()
        for ns in sorted(self._namespaces.values(), key=lambda n: -n.used["host"]):
            if tier == "host" and ns.used["host"] <= 0:
                break
            yield from ns.eviction.victims(tier, need_bytes, now)

    # -- caches ----------------------------------------------------------------

    def is_cache(self, name: str) -> bool:
        return self._config().is_cache(name)

    def drop_order(self, tier: str, capacity: int) -> Iterator[str]:
        """Keys of ``tier`` a cache may lose, the namespace furthest over its share first, each in its
        eviction policy's order. A namespace's share is its ``share`` of the tier, else an equal part of
        what the configured shares leave, among the namespaces holding bytes there (non-cache ones
        count: they have a part too)."""
        users = [(name, ns) for name, ns in self._namespaces.items() if ns.used[tier] > 0]
        if not users:
            return
        configured = [ns.config.share for _, ns in users if ns.config.share is not None]
        unconfigured = len(users) - len(configured)
        equal = capacity * max(0.0, 1.0 - sum(configured)) / unconfigured if unconfigured else 0.0

        def over(ns: Namespace) -> float:
            share = ns.config.share * capacity if ns.config.share is not None else equal
            return ns.used[tier] - share

        now = time.monotonic()
        for _, ns in sorted(((n, ns) for n, ns in users if self.is_cache(n)), key=lambda item: -over(item[1])):
            yield from ns.eviction.victims(tier, 0, now)

    def evicted(self, rec: ObjectRecord) -> None:
        """``rec`` was dropped to make room (after its copies were removed)."""
        self.get(rec.namespace).evicted += 1
        self.on_delete(rec)

    def holders(self, tier: str) -> list[tuple[str, int, bool]]:
        """Who holds ``tier``: (namespace, bytes, is a cache), most bytes first (an OutOfSpace message)."""
        rows = [(name, ns.used[tier], self.is_cache(name)) for name, ns in self._namespaces.items()
                if ns.used[tier] > 0]
        return sorted(rows, key=lambda row: -row[1])

    def declare_schedule(self, keys_by_namespace: dict[str, list[str]], *, cyclic: bool) -> None:
        for name, keys in keys_by_namespace.items():
            ns = self.get(name)
            ns.eviction.declare_schedule(keys, cyclic=cyclic)
            ns.prefetch.declare_schedule(keys, cyclic=cyclic)

    def swap(self, records: Iterable[ObjectRecord]) -> None:
        """Rebuild the namespaces whose policies changed in the config, re-telling them every object."""
        changed = {}
        for name, ns in self._namespaces.items():
            new = self._config().namespace(name)
            old = ns.config
            if (new.eviction_policy, new.prefetch_policy, new.prefetch_depth, new.admission_policy, new.admit_max) == (
                old.eviction_policy, old.prefetch_policy, old.prefetch_depth, old.admission_policy, old.admit_max
            ):
                ns.config = new
            else:
                changed[name] = self._build(new, ns.hints)
                changed[name].evicted = ns.evicted
        if not changed:
            return
        for rec in records:
            fresh = changed.get(rec.namespace)
            if fresh is not None:
                for tier in rec.tiers:
                    fresh.track(rec, tier)
        for name, fresh in changed.items():
            self._namespaces[name] = fresh
            log.info("namespace %r now uses eviction %s, prefetch %s, admission %s", name,
                     fresh.config.eviction_policy, fresh.config.prefetch_policy, fresh.config.admission_policy)
