"""Tiers: one module a medium (see :mod:`tierd.tiers.base`)."""

from tierd.tiers.base import Tier, TierUsage
from tierd.tiers.host import HostTier
from tierd.tiers.nvme import NvmeTier

__all__ = ["Tier", "TierUsage", "HostTier", "NvmeTier"]
