"""A parsed config checked against this machine: RAM, NUMA nodes, CXL devices, the nvme directory.

:func:`resolve_for_machine` is the last step of :func:`tierd.config.load_config`:
automatic sizes (``-1``) become numbers, the cxl tier gets its nodes or
devdax device (or is turned off), and every value that cannot work here is a
:class:`~tierd.errors.ConfigError` naming its key.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import psutil

from tierd.errors import ConfigError
from tierd.units import format_size

if TYPE_CHECKING:
    from tierd.config import Config

__all__ = ["resolve_for_machine"]

log = logging.getLogger("tierd.config")

GIB = 1 << 30


def _resolve_numa(cfg: Config, host_size: int) -> Config:
    """Check ``[tiers.host] numa_node`` and ``[tiers.cxl]`` against this machine's nodes and devices.

    The cxl tier ends up off (``size = 0``) or with its ``node`` or ``devdax`` set.
    """
    from tierd.tiers.cxl import cpuless_nodes, dax_device
    from tierd.tiers.numa import numa_nodes

    machine = numa_nodes()
    known = ", ".join(map(str, machine)) or "none (no NUMA information in /sys)"
    numa_node = cfg.tiers.host.numa_node
    if numa_node is not None:
        if numa_node not in machine:
            raise ConfigError(f"tiers.host.numa_node: NUMA node {numa_node} does not exist here (nodes: {known})")
        if host_size > machine[numa_node].mem_total_bytes:
            raise ConfigError(f"tiers.host.size is {format_size(host_size)} but NUMA node {numa_node} has "
                              f"{format_size(machine[numa_node].mem_total_bytes)}; set it below that")
    cxl = cfg.tiers.cxl
    if cxl.size < 0:
        raise ConfigError(f"tiers.cxl.size must be >= 0 (0: tier off), got {cxl.size}")
    if not 0 < cxl.low_watermark <= cxl.high_watermark <= 1:
        raise ConfigError("tiers.cxl watermarks must satisfy 0 < low_watermark <= high_watermark <= 1, "
                          f"got low={cxl.low_watermark} high={cxl.high_watermark}")
    if cxl.nodes and cxl.devdax:
        raise ConfigError("tiers.cxl: set node or devdax, not both")
    if cxl.size == 0:
        cxl = msgspec.structs.replace(cxl, node=None, devdax="")
    elif cxl.devdax:
        try:
            device = dax_device(Path(cxl.devdax).expanduser())
        except FileNotFoundError:
            raise ConfigError(f"tiers.cxl.devdax: {cxl.devdax!r} does not exist; "
                              "list devdax devices with `daxctl list` or `tierd doctor`") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"tiers.cxl.devdax: {exc}") from None
        if cxl.size > device.size_bytes:
            raise ConfigError(f"tiers.cxl.size is {format_size(cxl.size)} but {device.path} holds "
                              f"{format_size(device.size_bytes)}; set it below that")
        cxl = msgspec.structs.replace(cxl, devdax=device.path)
    else:
        nodes = tuple(sorted(set(cxl.nodes)))
        if not nodes:
            nodes = tuple(n.id for n in cpuless_nodes())
            if not nodes:
                log.info("tiers.cxl.size is set but this machine has no CPU-less NUMA node and no node or "
                         "devdax is named: the cxl tier is off")
                cxl = msgspec.structs.replace(cxl, size=0)
        for node in nodes:
            if node not in machine:
                raise ConfigError(f"tiers.cxl.node: NUMA node {node} does not exist here (nodes: {known})")
            if not machine[node].cpuless:
                log.warning("tiers.cxl.node: NUMA node %d is not CPU-less (it has CPUs); the cxl tier will "
                            "use it anyway", node)
        total = sum(machine[n].mem_total_bytes for n in nodes)
        if nodes and cxl.size > total:
            raise ConfigError(f"tiers.cxl.size is {format_size(cxl.size)} but NUMA node(s) "
                              f"{', '.join(map(str, nodes))} hold {format_size(total)}; set it below that")
        if nodes:
            cxl = msgspec.structs.replace(cxl, node=list(nodes))
    return msgspec.structs.replace(cfg, tiers=msgspec.structs.replace(cfg.tiers, cxl=cxl))


def resolve_for_machine(cfg: Config, default_nvme_path: Path) -> Config:
    """``cfg`` checked against this machine, its automatic values (``-1`` sizes, cxl nodes) resolved.

    Raises:
        ConfigError: naming the key that does not fit.
    """
    host = cfg.tiers.host
    ram = psutil.virtual_memory().total
    host_size = host.size if host.size >= 0 else min(ram // 4, 8 * GIB)
    if host_size > ram:
        raise ConfigError(
            f"tiers.host.size is {format_size(host_size)} but this machine has "
            f"{format_size(ram)} of RAM; set it below that"
        )
    cfg = _resolve_numa(cfg, host_size)
    if not 0 < host.low_watermark <= host.high_watermark <= 1:
        raise ConfigError(
            "tiers.host watermarks must satisfy 0 < low_watermark <= high_watermark <= 1, "
            f"got low={host.low_watermark} high={host.high_watermark}"
        )
    nvme = cfg.tiers.nvme
    path = Path(nvme.path).expanduser() if nvme.path else default_nvme_path
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"tiers.nvme.path {str(path)!r} cannot be created ({exc.strerror}); "
            "point it at a writable directory"
        ) from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"tiers.nvme.path {str(path)!r} is not writable by this user")
    if nvme.size >= 0:
        nvme_size = nvme.size
    else:
        free = psutil.disk_usage(str(path)).free
        nvme_size = min(2 * host_size, free // 10)
    for key, value in (("slab_size", nvme.slab_size), ("chunk_size", nvme.chunk_size)):
        if value < 4096 or value % 4096:
            raise ConfigError(f"tiers.nvme.{key} must be a multiple of 4 KiB, got {value}")
    if nvme.io_threads < 1:
        raise ConfigError(f"tiers.nvme.io_threads must be >= 1, got {nvme.io_threads}")
    for name, ns in cfg.namespaces.items():
        if not name or "/" in name or "\x00" in name or name in (".", ".."):
            raise ConfigError(f"namespace names must be non-empty and hold no '/' or NUL, and not be '.' or '..', "
                              f"got {name!r}")
        if ns.tier == "cxl" and not cfg.tiers.cxl.enabled:
            raise ConfigError(f"namespaces.{name}.tier is 'cxl' but the cxl tier is off; "
                              "configure [tiers.cxl] (node or devdax, and size) or choose another tier")
        if ns.prefetch_depth < 1:
            raise ConfigError(f"namespaces.{name}.prefetch_depth must be >= 1, got {ns.prefetch_depth}")
        if ns.share is not None and not 0 < ns.share <= 1:
            raise ConfigError(f"namespaces.{name}.share must be a fraction of each tier, 0 < share <= 1, "
                              f"got {ns.share}")
        if ns.cache and ns.durable:
            raise ConfigError(f"namespaces.{name}: cache = true and durable = true contradict each other (durable "
                              "objects are never dropped); choose one")
    for uid in cfg.daemon.trusted_uids:
        if not 0 <= uid < 1 << 32:
            raise ConfigError(f"daemon.trusted_uids must hold uids (0 to 2**32-1), got {uid}")
    gpu = cfg.tiers.gpu
    if gpu.budget < 0 or not 0 <= gpu.fraction < 1:
        raise ConfigError(f"tiers.gpu: budget must be >= 0 and 0 <= fraction < 1, got {gpu.budget}, {gpu.fraction}")
    if gpu.pin_piece < (2 << 20) or gpu.pin_piece % (2 << 20):
        raise ConfigError(f"tiers.gpu.pin_piece must be a multiple of 2 MiB, got {gpu.pin_piece}")
    if cfg.daemon.lease_s <= 0:
        raise ConfigError(f"daemon.lease_s must be > 0 seconds, got {cfg.daemon.lease_s}")
    return msgspec.structs.replace(
        cfg,
        tiers=msgspec.structs.replace(
            cfg.tiers,
            host=msgspec.structs.replace(host, size=host_size),
            nvme=msgspec.structs.replace(nvme, path=str(path), size=nvme_size),
        ),
    )
