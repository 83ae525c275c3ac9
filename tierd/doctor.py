"""``tierd doctor``: what this machine offers tierd, and what to fix."""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tierd.config import Config
from tierd.tiers.cxl import cpuless_nodes, dax_devices
from tierd.tiers.numa import numa_nodes
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


def _numa_checks(cfg: Config) -> list[Check]:
    nodes = numa_nodes()
    if not nodes:
        return [Check("NUMA", "off", "no NUMA information in /sys: the cxl tier and numa_node binding are unavailable")]
    out = [Check(f"NUMA node {n.id}", "ok",
                 f"{format_size(n.mem_total_bytes)} ({format_size(n.mem_free_bytes)} free), "
                 + (f"CPUs {_cpu_ranges(n.cpus)}" if n.cpus else "CPU-less (CXL or other memory-only node)"))
           for n in nodes.values()]
    cpuless = [n.id for n in cpuless_nodes()]
    dax = dax_devices()
    out.append(Check("CXL memory", "ok" if cpuless or dax else "off",
                     f"CPU-less nodes: {', '.join(map(str, cpuless)) or 'none'}; devdax: "
                     + (", ".join(f"{d.path} ({format_size(d.size_bytes)})" for d in dax) or "none")))
    cxl = cfg.tiers.cxl
    if cxl.enabled:
        where = cxl.devdax or f"NUMA node(s) {', '.join(map(str, cxl.nodes))}"
        plain = [n for n in cxl.nodes if n in nodes and not nodes[n].cpuless]
        out.append(Check("cxl tier", "warn" if plain else "ok", f"on: {format_size(cxl.size)} on {where}"
                         + (f"; node(s) {', '.join(map(str, plain))} have CPUs (not CXL memory)" if plain else ""),
                         "point tiers.cxl.node at a CPU-less node" if plain else ""))
    else:
        fix = "set [tiers.cxl] size (and node or devdax) to use it" if cpuless or dax else ""
        out.append(Check("cxl tier", "off", "off (tiers.cxl.size is 0, or no CXL memory was found)", fix))
    host_node = cfg.tiers.host.numa_node
    out.append(Check("host arena NUMA", "ok", "bound to node " + str(host_node) if host_node is not None
                     else "not bound (follows the process's policy; set tiers.host.numa_node to bind it)"))
    return out


def _cpu_ranges(cpus: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``"0-2,5"``, as sysfs writes cpulists."""
    runs: list[list[int]] = []
    for cpu in cpus:
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in runs)


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


def _remote_check(cfg: Config) -> Check:
    remote = cfg.tiers.remote
    if not remote.url:
        return Check("remote tier", "off", "no tiers.remote.url: this machine's tiers only")
    try:
        import redis
    except ImportError:
        return Check("remote tier", "fail", f"tiers.remote.url is {remote.url} but redis-py is not installed "
                     "(tierd serve refuses to start)", "pip install 'tierd[redis]'")
    from tierd.errors import TierdError
    from tierd.tiers.remote import redis_client

    timeout = min(remote.timeout_s, 2.0)
    try:
        client = redis_client(remote.url, cluster=remote.cluster, timeout_s=timeout)
        try:
            client.ping()
            if remote.cluster:
                return _cluster_check(remote.url, client, redis)
        finally:
            client.close()
    except TierdError as exc:
        return Check("remote tier", "fail", str(exc), "correct tiers.remote.url")
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError, ValueError) as exc:
        return Check("remote tier", "fail", f"{remote.url} does not answer: {exc}",
                     "start the Redis/Valkey server, or correct tiers.remote.url")
    return Check("remote tier", "ok", f"{remote.url} answers (one server)")


def _cluster_check(url: str, client: Any, redis: Any) -> Check:
    """A cluster's state, its shards, and whether a failing shard would stop the healthy ones."""
    state = client.cluster_info().get("cluster_state", "?")
    primaries = client.get_primaries()
    what = f"{url}: cluster_state {state}, {len(primaries)} primaries"
    if state != "ok":
        return Check("remote tier", "warn", what + ": some slots are not served",
                     "redis-cli --cluster check HOST:PORT tells which")
    try:
        settings = client.config_get("cluster-require-full-coverage", target_nodes=redis.RedisCluster.PRIMARIES)
    except redis.ResponseError:  # CONFIG is often disabled on managed services: nothing to tell then
        return Check("remote tier", "ok", what)
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
        return Check("remote tier", "warn", what + f"; a primary does not answer: {exc}",
                     "redis-cli --cluster check HOST:PORT tells which")
    if "cluster-require-full-coverage" in settings:  # one primary: redis-py returns its reply alone
        settings = {primaries[0].name: settings}
    full = sorted(node for node, got in settings.items() if got.get("cluster-require-full-coverage") == "yes")
    if full:
        return Check("remote tier", "warn", what + f"; {', '.join(full)} refuse every key while any shard "
                     "fails over (cluster-require-full-coverage yes)",
                     "redis-cli -h HOST -p PORT CONFIG SET cluster-require-full-coverage no on each node")
    return Check("remote tier", "ok", what)


def run_checks(cfg: Config) -> list[Check]:
    """Every check, in the order ``tierd doctor`` prints them."""
    ram = psutil.virtual_memory()
    host = cfg.tiers.host.size
    checks = [Check("host tier", "ok" if host <= ram.available else "warn",
                    f"{format_size(host)} arena; {format_size(ram.available)} of {format_size(ram.total)} RAM available",
                    "" if host <= ram.available else "lower tiers.host.size: the arena would swap")]
    checks += _nvme_checks(cfg)
    checks.append(_memlock_check())
    checks += _numa_checks(cfg)
    checks += _gpu_checks(cfg)
    checks.append(_remote_check(cfg))
    checks.append(_aio_check())
    return checks
