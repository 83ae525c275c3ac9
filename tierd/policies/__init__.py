"""Eviction and prefetch policies (see :mod:`tierd.policies.base`) and the trace simulator."""

from __future__ import annotations

from tierd.errors import ConfigError
from tierd.policies.base import AdmissionPolicy, AdmitAll, CostModel, EvictionPolicy, PrefetchPolicy, SizeAdmission
from tierd.policies.gdsf import GDSFPolicy
from tierd.policies.lru import LRUPolicy
from tierd.policies.prefetch import NoPrefetch, SequentialPrefetch
from tierd.policies.s3fifo import S3FIFOPolicy
from tierd.policies.schedule import Schedule, ScheduleEviction, SchedulePrefetch

__all__ = [
    "EvictionPolicy", "PrefetchPolicy", "AdmissionPolicy", "AdmitAll", "SizeAdmission", "CostModel", "Schedule", "LRUPolicy", "S3FIFOPolicy",
    "GDSFPolicy", "ScheduleEviction", "NoPrefetch", "SequentialPrefetch", "SchedulePrefetch",
    "make_eviction_policy", "make_prefetch_policy", "EVICTION_POLICIES", "PREFETCH_POLICIES",
]

EVICTION_POLICIES = ("lru", "s3fifo", "gdsf", "schedule")
PREFETCH_POLICIES = ("none", "sequential", "schedule")


def make_eviction_policy(name: str, schedule: Schedule | None = None) -> EvictionPolicy:
    """A new eviction policy called ``name``; ``schedule`` is shared with a schedule prefetcher."""
    if name == "lru":
        return LRUPolicy()
    if name == "s3fifo":
        return S3FIFOPolicy()
    if name == "gdsf":
        return GDSFPolicy()
    if name == "schedule":
        return ScheduleEviction(schedule)
    raise ConfigError(f"unknown eviction policy {name!r}; choose one of {list(EVICTION_POLICIES)}")


def make_prefetch_policy(name: str, schedule: Schedule | None = None, *, depth: int = 2) -> PrefetchPolicy:
    if name == "none":
        return NoPrefetch()
    if name == "sequential":
        return SequentialPrefetch(depth=depth)
    if name == "schedule":
        return SchedulePrefetch(schedule, depth=depth)
    raise ConfigError(f"unknown prefetch policy {name!r}; choose one of {list(PREFETCH_POLICIES)}")
