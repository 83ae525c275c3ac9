"""The ``cxl`` tier: an arena in CXL-attached (or any other NUMA node's) memory.

CXL memory expanders appear to Linux in one of two ways, and the tier takes
either:

* a CPU-less NUMA node (``/sys/devices/system/node/nodeN/cpulist`` empty):
  the arena is a memfd bound to the node with ``mbind(MPOL_BIND)`` and
  prefaulted (``fallocate``) so that every page is really there at start
  (Note [binding a memfd] in tierd/tiers/numa.py);
* a devdax device (``/dev/daxX.Y``): the arena is a shared mapping of the
  device, whose size is a multiple of its alignment (2 MiB by default).

Either way the bytes are handled by :class:`~tierd.tiers.host.ArenaTier`,
the same extent allocator and copy code as the host tier; only the backing
differs. The tier is daemon-owned (clients never map it): demotion host ->
cxl and promotion cxl -> host are memcpys in the engine.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tierd.errors import ConfigError, MediaError
from tierd.tiers.host import ArenaTier, memfd_arena
from tierd.tiers.numa import NODE_ROOT, NumaNode, numa_nodes

__all__ = ["CxlTier", "DaxDevice", "cpuless_nodes", "dax_device", "dax_devices", "devdax_arena"]

log = logging.getLogger("tierd.tiers.cxl")

DEFAULT_DAX_ALIGN = 2 << 20  # device-dax maps in 2 MiB pages unless its "align" says otherwise


@dataclass(frozen=True, slots=True)
class DaxDevice:
    """A device-dax character device.

    Attributes:
        path: ``/dev/daxX.Y``.
        size_bytes: its capacity (sysfs ``size``).
        align_bytes: mapping granularity (sysfs ``align``; 2 MiB when absent).
    """

    path: str
    size_bytes: int
    align_bytes: int


def cpuless_nodes(root: Path = NODE_ROOT) -> list[NumaNode]:
    """NUMA nodes that have memory and no CPU: where CXL expanders show up."""
    return [n for n in numa_nodes(root).values() if n.cpuless and n.mem_total_bytes > 0]


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text, 0)
    except ValueError:
        return None


def dax_device(path: str | os.PathLike[str], sys_root: Path = Path("/sys")) -> DaxDevice:
    """Describe the devdax device at ``path`` from sysfs.

    The size is looked up in ``/sys/bus/dax/devices/NAME/size``, else in the
    character device's own sysfs directory (``/sys/dev/char/MAJ:MIN/size``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: sysfs does not give its size (not a devdax device).
    """
    dev = Path(path)
    st = os.stat(dev)
    dirs = [sys_root / "bus" / "dax" / "devices" / dev.name]
    if stat.S_ISCHR(st.st_mode):
        dirs.append(sys_root / "dev" / "char" / f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}")
    for d in dirs:
        size = _read_int(d / "size")
        if size is not None:
            return DaxDevice(str(dev), size, _read_int(d / "align") or DEFAULT_DAX_ALIGN)
    raise ValueError(f"{dev}: sysfs gives no size for it (looked in {', '.join(str(d) for d in dirs)})")


def dax_devices(dev_root: Path = Path("/dev"), sys_root: Path = Path("/sys")) -> list[DaxDevice]:
    """Every devdax device under ``dev_root`` whose size sysfs knows."""
    out = []
    for path in sorted(dev_root.glob("dax*")):
        try:
            out.append(dax_device(path, sys_root))
        except (OSError, ValueError) as exc:
            log.debug("skipping %s: %s", path, exc)
    return out


def devdax_arena(device: DaxDevice, size: int) -> tuple[int, mmap.mmap]:
    """Map the first ``size`` bytes of ``device`` (rounded down to its alignment), shared.

    Raises:
        ConfigError: the device cannot be opened or mapped (named as ``tiers.cxl.devdax``).
    """
    size -= size % device.align_bytes
    if size <= 0:
        raise ConfigError(f"tiers.cxl.size must be at least the device's alignment of "
                          f"{device.align_bytes >> 20} MiB for {device.path}")
    try:
        fd = os.open(device.path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"tiers.cxl.devdax: cannot open {device.path} ({exc.strerror}); "
                          "run tierd as a user with read-write access to it") from exc
    try:
        # The kernel places a devdax mapping at an address aligned to the device's align.
        return fd, mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    except OSError as exc:
        os.close(fd)
        raise ConfigError(f"tiers.cxl.devdax: cannot map {size >> 20} MiB of {device.path} ({exc.strerror})") from exc


class CxlTier(ArenaTier):
    """An arena of ``capacity_bytes`` bound to NUMA ``nodes``, or mapped from ``devdax``.

    Exactly one of ``nodes`` and ``devdax`` is given (the config checks it).

    Raises:
        ConfigError: binding, reserving or mapping the memory failed (the message names the key).
        MediaError: no memfd could be created.
    """

    name = "cxl"

    def __init__(self, capacity_bytes: int, *, nodes: Sequence[int] = (), devdax: str = "",
                 block: int = 4096) -> None:
        if bool(nodes) == bool(devdax):
            raise MediaError("the cxl tier needs NUMA nodes or a devdax path, not both or neither")
        if devdax:
            try:
                device = dax_device(devdax)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"tiers.cxl.devdax: {exc}") from exc
            fd, mapping = devdax_arena(device, capacity_bytes)
            self.backing = device.path
        else:
            size = max(capacity_bytes - capacity_bytes % block, block)
            fd, mapping = memfd_arena("tierd-cxl", size, nodes=nodes, prefault=True, key="tiers.cxl",
                                      node_key="node")
            self.backing = f"NUMA node(s) {','.join(map(str, nodes))}"
        super().__init__(fd, mapping, capacity_bytes, block=block)
        log.info("cxl tier: %d MiB on %s", self.capacity_bytes >> 20, self.backing)
