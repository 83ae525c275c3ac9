"""Eviction (and, later, prefetch) policies; see :mod:`tierd.policies.base`."""

from tierd.errors import ConfigError
from tierd.policies.base import EvictionPolicy
from tierd.policies.lru import LRUPolicy

__all__ = ["EvictionPolicy", "LRUPolicy", "make_eviction_policy"]

_EVICTION = {"lru": LRUPolicy}


def make_eviction_policy(name: str) -> EvictionPolicy:
    cls = _EVICTION.get(name)
    if cls is None:
        raise ConfigError(f"unknown eviction policy {name!r}; choose one of {sorted(_EVICTION)}")
    return cls()
