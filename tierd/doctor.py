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


def _gpu_checks(cfg: Config) -> list[Check]:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - doctor reports, never crashes
        return [Check("GPU", "fail", f"importing torch failed: {exc}", "reinstall torch")]
    from tierd.tiers.gpu import gds_status

    gpu_cfg = cfg.tiers.gpu
    if not torch.cuda.is_available():
        return [
            Check("GPU", "off", f"torch {torch.__version__} sees no CUDA device: the gpu tier and pinning stay off"),
            Check("GDS", "off", gds_status()[1]),
        ]
    free, total = torch.cuda.mem_get_info()
    out = [Check("GPU", "ok", f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}, "
                              f"{format_size(free)} of {format_size(total)} free")]
    if gpu_cfg.budget or gpu_cfg.fraction:
        budget = gpu_cfg.budget or int(free * gpu_cfg.fraction)
        out.append(Check("gpu tier", "ok", f"{format_size(budget)} per process"))
    else:
        out.append(Check("gpu tier", "off", "no budget configured", "set tiers.gpu.budget or tiers.gpu.fraction"))
    out.append(_pin_check(cfg))
    usable, why = gds_status()
    nvfs = Path("/proc/driver/nvidia-fs").exists()
    if usable and not nvfs:
        why += "; the nvidia-fs kernel module is not loaded"
    out.append(Check("GDS", "ok" if usable else "off", why,
                     "" if usable and nvfs else "install the GDS driver (nvidia-fs) and pip install 'tierd[gds]'"))
    return out


def _pin_check(cfg: Config) -> Check:
    """Register a small buffer the way clients register the arena (Note [pinned arena] in tiers/gpu.py)."""
    import mmap

    import torch

    from tierd.tiers.gpu import PinnedArena, memlock_allowance

    if not cfg.tiers.gpu.pin:
        return Check("pinned arena", "off", "tiers.gpu.pin = false: GPU copies go through the driver's staging buffer")
    buf = mmap.mmap(-1, 2 << 20)
    probe = PinnedArena(torch.frombuffer(buf, dtype=torch.uint8).data_ptr(), 2 << 20, piece=2 << 20)
    ok = probe.pinned_bytes == 2 << 20
    probe.close()
    allowance = memlock_allowance()
    arena = cfg.tiers.host.size
    if not ok:
        return Check("pinned arena", "fail", probe.problem or "cudaHostRegister failed",
                     "check the driver; or set tiers.gpu.pin = false")
    if allowance is not None and allowance < arena:
        return Check("pinned arena", "warn", f"ulimit -l lets clients pin {format_size(allowance)} of the "
                     f"{format_size(arena)} arena", "raise memlock (LimitMEMLOCK=infinity, ulimit -l unlimited)")
    return Check("pinned arena", "ok", f"cudaHostRegister works; the {format_size(arena)} arena is pinned in "
                 f"{format_size(cfg.tiers.gpu.pin_piece)} pieces by each client")


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
    checks += _gpu_checks(cfg)
    checks.append(_aio_check())
    return checks
