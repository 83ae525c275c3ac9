"""Trace replay: how each policy would have done, beside Belady's offline optimum.

A trace is JSON lines ``{"t": s, "op": "put"|"get"|"delete", "key": ..., "size": bytes, "tier": ...}``,
as the engine records with ``[trace] path``. The model has two tiers: the
host tier (the cache under study, ``host_bytes``) and nvme below it
(``nvme_bytes``; what falls out of it is gone, and a later get of it is a
cold miss). For every get:

* hit: the object is on host (promoted by a prefetch counts too);
* miss: it is on nvme; it is promoted (bytes moved up) and the caller
  stalls for ``CostModel.fetch_s(size)``; making room demotes victims
  (bytes moved down).

A prefetch moves bytes in the background: prefetches queue on one nvme
channel (``CostModel``), and a get that arrives (by the trace's ``t``)
before its prefetched copy has landed waits for the rest, at most what a
demand read would have cost.

``opt`` is Belady's rule with the whole future known and no prefetching:
evict the object whose next access is farthest away, distance weighted by
size (Belady-size). For equal sizes that is exactly Belady's optimum. For
mixed sizes no tractable optimum exists; size weighting makes the offline
reference much stronger than plain farthest-next-use, which keeps large
objects and loses many small hits. A prefetching
policy can pass its hit ratio (it moves the misses off the critical path);
compare prefetchers by modelled stall instead.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import msgspec

from tierd.policies import make_admission_policy, make_eviction_policy, make_prefetch_policy
from tierd.policies.base import AdmissionPolicy, CostModel, EvictionPolicy
from tierd.policies.farthest import FarthestFirst
from tierd.policies.prefix import PrefixHints
from tierd.policies.schedule import Schedule

__all__ = ["TraceEvent", "SimResult", "read_trace", "simulate", "OPT"]

OPT = "opt"


class TraceEvent(msgspec.Struct, frozen=True):
    t: float
    op: str  # put, get, delete, or done (a prefix chain ending at key is over: Store.declare_prefix(done=True))
    key: str
    size: int = 0
    tier: str = ""
    parent: str = ""  # the block before this one in its prefix ("": none, or not a prefix cache)


@dataclass(frozen=True, slots=True)
class SimResult:
    policy: str
    prefetch: str
    gets: int
    hits: int
    bytes_promoted: int
    bytes_demoted: int
    stall_s: float
    admission: str = "all"
    # Prefix-cache traces: each get weighted by the recomputation a miss costs, ``1 + depth`` (a block
    # at depth d attends over the d blocks before it); the hit share of that is the prefill saved.
    depth_weighted_gets: float = 0.0
    depth_weighted_hits: float = 0.0

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.gets if self.gets else 0.0

    @property
    def prefill_saved(self) -> float:
        """Of the prefill a miss would recompute (``1 + depth`` a block), the share hits saved; 0 without parents."""
        return self.depth_weighted_hits / self.depth_weighted_gets if self.depth_weighted_gets else 0.0


def read_trace(path: str | os.PathLike[str]) -> list[TraceEvent]:
    decoder = msgspec.json.Decoder(TraceEvent)
    with open(path, "rb") as fh:
        return [decoder.decode(line) for line in fh if line.strip()]


class _Belady(EvictionPolicy):
    """Farthest next access first (times size), from the future the simulator tells it.

    ``next_use`` is set by the simulator before each event; a key's entry is
    refreshed when it is inserted or read (the only times its next use changes
    while it is in the tier). Ties go to the earliest inserted key.
    """

    name = OPT

    def __init__(self) -> None:
        super().__init__()
        self.next_use: dict[str, float] = {}
        self._tiers: dict[str, FarthestFirst] = {}
        self._seq = 0

    def _ff(self, tier: str) -> FarthestFirst:
        ff = self._tiers.get(tier)
        if ff is None:
            ff = self._tiers[tier] = FarthestFirst()
        return ff

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        self._seq += 1
        self._ff(tier).set(key, nbytes, self.next_use.get(key, math.inf), self._seq)

    def _on_access(self, key: str, tier: str, now: float) -> None:
        ff = self._ff(tier)
        live = ff.get(key)
        if live is not None:
            ff.set(key, live[2], self.next_use.get(key, math.inf), live[1])

    def _on_remove(self, key: str, tier: str) -> None:
        self._ff(tier).discard(key)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Iterator[str]:
        yield from self._ff(tier).farthest(now)


def _next_uses(events: Sequence[TraceEvent]) -> list[float]:
    """For each event, the index of the next event on the same key (inf if none)."""
    out = [math.inf] * len(events)
    last: dict[str, int] = {}
    for i in range(len(events) - 1, -1, -1):
        if events[i].op == "done":
            continue  # a hint, not a use
        key = events[i].key
        out[i] = last.get(key, math.inf)
        if events[i].op == "delete":
            last.pop(key, None)
        else:
            last[key] = i
    return out


class _Model:
    def __init__(self, policy: EvictionPolicy, host_bytes: int, nvme_bytes: int, cost: CostModel,
                 admission: AdmissionPolicy) -> None:
        self.policy = policy
        self.admission = admission
        self.host_cap, self.nvme_cap = host_bytes, nvme_bytes
        self.host: dict[str, int] = {}
        self.nvme: OrderedDict[str, int] = OrderedDict()  # LRU below host
        self.host_used = self.nvme_used = 0
        self.cost = cost
        self.promoted = self.demoted = 0

    def _to_nvme(self, key: str, size: int) -> None:
        if size > self.nvme_cap:
            return
        while self.nvme_used + size > self.nvme_cap and self.nvme:
            _, old = self.nvme.popitem(last=False)
            self.nvme_used -= old
        self.nvme[key] = size
        self.nvme_used += size

    def make_room(self, size: int, now: float, keep: str | None = None) -> bool:
        while self.host_used + size > self.host_cap:
            victim = next((k for k in self.policy.victims("host", size, now) if k != keep), None)
            if victim is None:
                return False
            vsize = self.host.pop(victim)
            self.host_used -= vsize
            self.policy.on_remove(victim, "host")
            self.demoted += vsize
            self._to_nvme(victim, vsize)
        return True

    def place(self, key: str, size: int, now: float, *, put: bool = False) -> bool:
        """Put ``key`` on host if it can be made to fit (a put: if admitted, as the engine asks); else on nvme."""
        if (size <= self.host_cap and (not put or self.admission.admit(key, "host", size, now))
                and self.make_room(size, now, keep=key)):
            self.host[key] = size
            self.host_used += size
            self.policy.on_insert(key, "host", size, now)
            return True
        self._to_nvme(key, size)
        return False

    def remove(self, key: str) -> None:
        if key in self.host:
            self.host_used -= self.host.pop(key)
            self.policy.on_remove(key, "host")
        if key in self.nvme:
            self.nvme_used -= self.nvme.pop(key)

    def promote(self, key: str, now: float) -> bool:
        size = self.nvme.get(key)
        if size is None or key in self.host:
            return False
        self.nvme_used -= self.nvme.pop(key)
        self.promoted += size
        self.place(key, size, now)
        return True


def simulate(
    events: Iterable[TraceEvent], policy: str, *, host_bytes: int, nvme_bytes: int,
    prefetch: str = "none", prefetch_depth: int = 2, cost: CostModel | None = None,
    declared: Sequence[str] | None = None, admission: str = "all",
    make_policy: Callable[[PrefixHints], EvictionPolicy] | None = None,
) -> SimResult:
    """Replay ``events`` with eviction ``policy`` (or ``"opt"``), prefetch ``prefetch`` and
    ``admission`` (``"all"`` or ``"prefix"``: see :mod:`tierd.policies.prefix`).

    Events' ``parent`` fields are told to the prefix policies as ``PrefixKVStore`` tells the engine's.

    ``declared``: an access order the caller declares up front (``store.declare_schedule``),
    instead of leaving the schedule to be learned from the stream.

    ``make_policy``: a study's own eviction policy, built on the run's prefix hints (``policy``
    names it in the result).
    """
    events = list(events)
    cost = cost or CostModel()
    schedule = Schedule()
    hints = PrefixHints(max_entries=1 << 62)  # the whole trace: the simulator is not short of memory
    evict: EvictionPolicy = (_Belady() if policy == OPT else make_policy(hints) if make_policy is not None
                             else make_eviction_policy(policy, schedule, hints=hints))
    model: _Model | None = None
    admit = make_admission_policy(admission, hints=hints, eviction=evict,
                                  room=lambda tier, n: model is not None and model.host_used + n <= model.host_cap)
    linked = policy == "prefix" or admission == "prefix" or make_policy is not None
    evict.cost = cost
    pre = make_prefetch_policy(prefetch, schedule, depth=prefetch_depth)
    if declared is not None:
        evict.declare_schedule(declared)
        pre.declare_schedule(declared)
    future = _next_uses(events) if policy == OPT else None
    model = _Model(evict, host_bytes, nvme_bytes, cost, admit)
    gets = hits = 0
    stall = 0.0
    sizes: dict[str, int] = {}
    depth: dict[str, int] = {}  # from the events' parents
    prefixed = any(e.parent for e in events)
    wgets = whits = 0.0
    ready_at: dict[str, float] = {}  # prefetched objects: when their copy lands on host
    channel_free = 0.0  # prefetches queue on one nvme channel
    for i, ev in enumerate(events):
        now = float(i)
        if ev.op == "done":
            if linked:
                hints.finish(ev.key)
            continue
        if future is not None:
            assert isinstance(evict, _Belady)
            evict.next_use[ev.key] = future[i]
        if ev.op == "delete":
            model.remove(ev.key)
            sizes.pop(ev.key, None)
            if linked:
                hints.forget(ev.key)
            continue
        schedule.observe(ev.key)
        if ev.parent:
            depth[ev.key] = depth.get(ev.parent, 0) + 1
            if linked:
                hints.link(ev.key, ev.parent)
        if ev.op == "put":
            model.remove(ev.key)
            sizes[ev.key] = ev.size
            if linked:
                hints.put(ev.key)
            model.place(ev.key, ev.size, now, put=True)
        elif ev.op == "get":
            gets += 1
            if linked:
                hints.read(ev.key)
            weight = 1 + depth.get(ev.key, 0) if prefixed else 0  # a chain's head (no parent) weighs 1
            wgets += weight
            if ev.key in model.host:
                hits += 1
                whits += weight
                evict.on_access(ev.key, "host", now)
                landed = ready_at.pop(ev.key, None)
                if landed is not None and landed > ev.t:
                    # Issued too late to hide it all; never worse than reading it on demand.
                    stall += min(landed - ev.t, cost.fetch_s(model.host[ev.key]))
            else:
                size = sizes.get(ev.key, ev.size)
                stall += cost.fetch_s(size)
                if not model.promote(ev.key, now):  # cold: gone from every tier, or never put
                    sizes[ev.key] = size
                    model.place(ev.key, size, now)
        for key in pre.on_access(ev.key, now):
            if key != ev.key and model.promote(key, now):
                channel_free = max(channel_free, ev.t) + cost.fetch_s(model.host.get(key, 0))
                ready_at[key] = channel_free
    return SimResult(policy, prefetch, gets, hits, model.promoted, model.demoted, stall, admission, wgets, whits)


def plot_results(results: Sequence[SimResult], path: str | os.PathLike[str], *, title: str = "") -> None:
    """Hit ratio and modelled stall per policy, as a PNG (needs matplotlib: ``pip install 'tierd[bench]'``)."""
    from tierd._optional import require
    from tierd.errors import InvalidArgument

    require("matplotlib", needed_by="--png", error=InvalidArgument).use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [(r.policy if r.admission == "all" else f"{r.policy}+{r.admission} adm")
             + ("" if r.prefetch == "none" else f"+{r.prefetch}") for r in results]
    colors = ["k" if r.policy == OPT else "C0" for r in results]
    ax1.bar(names, [r.hit_ratio for r in results], color=colors)
    ax1.set(ylabel="hit ratio", ylim=(0, 1), title=f"hit ratio {title}")
    ax2.bar(names, [r.stall_s for r in results], color=colors)
    ax2.set(ylabel="modelled stall (s)", title="time waiting for nvme")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
