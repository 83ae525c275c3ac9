"""``tierd doctor``: what this machine offers tierd, and what to fix."""

from __future__ import annotations

import glob
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import psutil

from tierd.config import Config
from tierd.tiers.nvme import probe_direct
from tierd.units import format_size

__all__ = ["Check", "run_checks"]


@dataclass(frozen=True, slots=True)
class Check:
    """One finding: ``status`` is ``ok``, ``warn``, ``off`` (feature absent) or ``fail``."""

    name: str
    status: str
    detail: str
    fix: str = ""


def _nvme_checks(cfg: Config) -> list[Check]:
    path = Path(cfg.tiers.nvme.path)
    out = []
    refused = probe_direct(path)
    if refused is None:
        out.append(Check("O_DIRECT", "ok", f"works in {path}"))
    else:
        out.append(Check("O_DIRECT", "warn", f"{path}: {refused}; buffered I/O will be used (page cache, no fsync bypass)",
                         "point tiers.nvme.path at an ext4/xfs directory on local SSD"))
    free = psutil.disk_usage(str(path)).free
    size = cfg.tiers.nvme.size
    status = "ok" if free >= size else "warn"
    out.append(Check("nvme space", status, f"tier {format_size(size)}, {format_size(free)} free in {path}",
                     "" if status == "ok" else "lower tiers.nvme.size or free disk space: slabs are fallocate'd as they fill"))
    return out


def _memlock_check() -> Check:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY:
        return Check("ulimit -l", "ok", "unlimited")
    detail = f"{format_size(soft)} of memory may be locked"
    if os.geteuid() == 0:
        return Check("ulimit -l", "ok", detail + " (root: CUDA registration is not limited by it)")
    return Check("ulimit -l", "warn", detail + "; pinning the host arena for GPUs needs more",
                 "raise memlock (LimitMEMLOCK=infinity in the unit, or /etc/security/limits.conf)")


def _numa_checks() -> list[Check]:
    nodes = sorted(glob.glob("/sys/devices/system/node/node[0-9]*"))
    if not nodes:
        return [Check("NUMA", "off", "no NUMA information in /sys")]
    cpuless = [Path(n).name for n in nodes if not Path(n, "cpulist").read_text().strip()]
    out = [Check("NUMA", "ok", f"{len(nodes)} node(s)")]
    dax = sorted(glob.glob("/dev/dax*"))
    if cpuless or dax:
        out.append(Check("CXL", "ok", f"CPU-less nodes: {cpuless or 'none'}; devdax: {dax or 'none'}"))
    else:
        out.append(Check("CXL", "off", "no CPU-less NUMA node and no /dev/dax device: the cxl tier stays off"))
    return out


def _gpu_checks() -> list[Check]:
    try:
        import torch

        if torch.cuda.is_available():
            gpu = Check("GPU", "ok", f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
        else:
            gpu = Check("GPU", "off", f"torch {torch.__version__} sees no CUDA device: the gpu tier stays off")
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        gpu = Check("GPU", "fail", f"importing torch failed: {exc}", "reinstall torch")
    try:
        import kvikio  # type: ignore[import-not-found]  # noqa: F401

        gds = Check("kvikio", "ok", "importable: GPUDirect Storage path available when a GPU is present")
    except Exception as exc:  # noqa: BLE001
        gds = Check("kvikio", "off", f"not importable ({type(exc).__name__}): nvme<->GPU goes through host memory",
                    "pip install 'tierd[gds]' on a machine with a CUDA driver")
    return [gpu, gds]


def _aio_check() -> Check:
    try:
        nr = int(Path("/proc/sys/fs/aio-max-nr").read_text())
    except OSError:
        return Check("fs.aio-max-nr", "off", "not readable")
    status = "ok" if nr >= 65536 else "warn"
    return Check("fs.aio-max-nr", status, str(nr), "" if status == "ok" else "sysctl -w fs.aio-max-nr=1048576")


def run_checks(cfg: Config) -> list[Check]:
    """Every check, in the order ``tierd doctor`` prints them."""
    ram = psutil.virtual_memory()
    host = cfg.tiers.host.size
    checks = [Check("host tier", "ok" if host <= ram.available else "warn",
                    f"{format_size(host)} arena; {format_size(ram.available)} of {format_size(ram.total)} RAM available",
                    "" if host <= ram.available else "lower tiers.host.size: the arena would swap")]
    checks += _nvme_checks(cfg)
    checks.append(_memlock_check())
    checks += _numa_checks()
    checks += _gpu_checks()
    checks.append(_aio_check())
    return checks
