"""Eviction and prefetch policies (see :mod:`tierd.policies.base`) and the trace simulator."""

from __future__ import annotations

from collections.abc import Callable

from tierd.errors import ConfigError
from tierd.policies.base import AdmissionPolicy, AdmitAll, CostModel, EvictionPolicy, PrefetchPolicy, SizeAdmission
from tierd.policies.gdsf import GDSFPolicy
from tierd.policies.lru import LRUPolicy
from tierd.policies.prefetch import NoPrefetch, SequentialPrefetch
from tierd.policies.prefix import PrefixAdmission, PrefixHints, PrefixPolicy
from tierd.policies.s3fifo import S3FIFOPolicy
from tierd.policies.schedule import Schedule, ScheduleEviction, SchedulePrefetch

__all__ = [
    "EvictionPolicy", "PrefetchPolicy", "AdmissionPolicy", "AdmitAll", "SizeAdmission", "CostModel", "Schedule", "LRUPolicy", "S3FIFOPolicy",
    "GDSFPolicy", "ScheduleEviction", "NoPrefetch", "SequentialPrefetch", "SchedulePrefetch",
    "PrefixHints", "PrefixPolicy", "PrefixAdmission",
    "make_eviction_policy", "make_prefetch_policy", "make_admission_policy",
    "EVICTION_POLICIES", "PREFETCH_POLICIES", "ADMISSION_POLICIES",
]

EVICTION_POLICIES = ("lru", "s3fifo", "gdsf", "schedule", "prefix")
PREFETCH_POLICIES = ("none", "sequential", "schedule")
ADMISSION_POLICIES = ("all", "prefix")


def make_eviction_policy(name: str, schedule: Schedule | None = None, *, hints: PrefixHints | None = None) -> EvictionPolicy:
    """A new eviction policy called ``name``; ``schedule`` is shared with a schedule prefetcher,
    ``hints`` with a prefix admission policy."""
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy()
    if name == "gdsf":
        return GDSFPolicy()
    if name == "schedule":
        return ScheduleEviction(schedule)
    if name == "prefix":
        return PrefixPolicy(hints)
    raise ConfigError(f"unknown eviction policy {name!r}; choose one of {list(EVICTION_POLICIES)}")


def make_prefetch_policy(name: str, schedule: Schedule | None = None, *, depth: int = 2) -> PrefetchPolicy:
    if name == "none":
        return NoPrefetch()
    if name == "sequential":
        return SequentialPrefetch(depth=depth)
    if name == "schedule":
        return SchedulePrefetch(schedule, depth=depth)
    raise ConfigError(f"unknown prefetch policy {name!r}; choose one of {list(PREFETCH_POLICIES)}")


def make_admission_policy(name: str, *, hints: PrefixHints | None = None, max_bytes: int | None = None,
                          eviction: EvictionPolicy | None = None,
                          room: Callable[[str, int], bool] | None = None) -> AdmissionPolicy:
    """A new admission policy for the host tier; ``max_bytes`` keeps larger objects out whatever ``name`` says.

    ``prefix`` with the ``prefix`` eviction policy admits a new block if it is worth more than
    what it would displace (``PrefixPolicy.worth_admitting``); with any other, if blocks of its
    kind are read again often enough. ``room(tier, nbytes)``: whether that fits without evicting
    (``prefix`` admits everything then).
    """
    if name == "all":
        inner: AdmissionPolicy = AdmitAll()
    elif name == "prefix":
        judge = eviction.worth_admitting if isinstance(eviction, PrefixPolicy) else None
        inner = PrefixAdmission(hints, judge=judge, room=room)
    else:
        raise ConfigError(f"unknown admission policy {name!r}; choose one of {list(ADMISSION_POLICIES)}")
    return inner if max_bytes is None else SizeAdmission(max_bytes, inner)
