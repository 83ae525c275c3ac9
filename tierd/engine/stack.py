"""The engine's tiers, built from the config and ordered fastest first.

``TIER_ORDER`` is the one list of tier names below the per-process gpu tier
(``config.TierName`` spells the same names for the config's type checks;
``ObjectRecord`` has one field a tier). A :class:`TierStack` holds the tiers
this config turns on (cxl and remote only when configured) and answers the
questions placement and movement ask: which tiers lie below one, which are
arenas (byte-addressable, kept under watermarks), which persist, and which
share an index with other stores.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from tierd.config import Config
from tierd.tiers.base import Tier
from tierd.tiers.cxl import CxlTier
from tierd.tiers.host import ArenaTier, HostTier
from tierd.tiers.nvme import NvmeTier
from tierd.tiers.remote import RemoteTier

__all__ = ["TIER_ORDER", "TierStack"]

TIER_ORDER = ("host", "cxl", "nvme", "remote")  # fastest first


class TierStack(Mapping[str, Tier]):
    """name -> tier for the tiers this config turns on, fastest first.

    Construction opens every tier (the arena, the nvme directory and its lock,
    the Redis connection); if one fails, those opened before it are closed
    again, so a refused config leaves nothing mapped or locked.
    """

    def __init__(self, config: Config, *, gds: bool = False) -> None:
        host_cfg, cxl_cfg, nvme_cfg, remote_cfg = (config.tiers.host, config.tiers.cxl, config.tiers.nvme,
                                                   config.tiers.remote)
        self.host = HostTier(host_cfg.size, hugepages=host_cfg.hugepages, numa_node=host_cfg.numa_node)
        self.cxl: CxlTier | None = None
        self.remote: RemoteTier | None = None
        opened: list[Tier] = [self.host]
        try:
            # The cxl tier is the engine's own (clients never map it): objects on it
            # are read by promoting them into host, or copied out by read_into.
            if cxl_cfg.enabled:
                self.cxl = CxlTier(cxl_cfg.size, nodes=cxl_cfg.nodes, devdax=cxl_cfg.devdax)
                opened.append(self.cxl)
            self.nvme = NvmeTier(
                nvme_cfg.path, nvme_cfg.size, slab_size=nvme_cfg.slab_size,
                chunk_size=nvme_cfg.chunk_size, io_threads=nvme_cfg.io_threads, direct=nvme_cfg.direct, gds=gds,
            )
            opened.append(self.nvme)
            if remote_cfg.url:  # redis-py missing, a bad URL: raises here
                self.remote = RemoteTier(
                    remote_cfg.url, remote_cfg.size, chunk_size=remote_cfg.chunk_size, ttl_s=remote_cfg.ttl_s,
                    timeout_s=remote_cfg.timeout_s, prefix=remote_cfg.prefix, cluster=remote_cfg.cluster,
                )
                opened.append(self.remote)
        except BaseException:
            _close_all(reversed(opened))
            raise
        self._tiers: dict[str, Tier] = {t.name: t for t in sorted(opened, key=lambda t: TIER_ORDER.index(t.name))}
        # (arena, high, low): the tiers the background mover keeps under their watermarks.
        self.watermarks: list[tuple[ArenaTier, int, int]] = [
            (arena, int(cfg.high_watermark * arena.capacity_bytes), int(cfg.low_watermark * arena.capacity_bytes))
            for arena, cfg in ((self.host, host_cfg), (self.cxl, cxl_cfg)) if arena is not None
        ]

    def __getitem__(self, name: str) -> Tier:
        return self._tiers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tiers)

    def __len__(self) -> int:
        return len(self._tiers)

    def below(self, name: str) -> tuple[str, ...]:
        """The configured tiers slower than ``name``, nearest first (``name`` need not be configured)."""
        rank = TIER_ORDER.index(name)
        return tuple(t for t in self._tiers if TIER_ORDER.index(t) > rank)

    def arena(self, name: str) -> ArenaTier:
        """The byte-addressable tier ``name`` (host, or cxl when configured)."""
        tier = self._tiers.get(name)
        if not isinstance(tier, ArenaTier):
            raise KeyError(f"{name!r} is not a configured arena tier")
        return tier

    @property
    def persistent(self) -> tuple[str, ...]:
        """Tiers whose bytes outlive the process."""
        return tuple(n for n, t in self._tiers.items() if t.persistent)

    def close(self) -> None:
        """Close every tier, slowest first (the nvme tier flushes before the arenas go)."""
        _close_all(reversed(list(self._tiers.values())))


def _close_all(tiers: Iterator[Tier]) -> None:
    for tier in tiers:
        tier.close()
