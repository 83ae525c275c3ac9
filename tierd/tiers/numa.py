"""NUMA nodes and memory binding, for the host arena and the ``cxl`` tier.

Three things, each a thin layer over what the kernel offers:

* :func:`numa_nodes` reads the nodes from sysfs (``node*/cpulist`` empty
  means a CPU-less node: CXL-attached memory shows up as one);
* :func:`bind_memory` calls ``mbind(2)`` with ``MPOL_BIND`` on a mapping
  (through ``syscall(SYS_mbind, ...)`` in libc: glibc has no wrapper, and
  libnuma is used only where the syscall number is unknown);
* :func:`mapping_placement` reads ``/proc/PID/numa_maps`` to say on which
  nodes a mapping's pages really are.

Note [binding a memfd]
    An arena is a memfd (shmem). ``mbind`` on a shared mapping of shmem sets
    the *file's* policy for that range, not only this mapping's: pages
    allocated later follow it whichever process faults them (a daemon client
    mapping the same memfd included), and so does ``fallocate`` of the file.
    So an arena is bound right after ``mmap``, before any page exists, and
    nothing has to move. ``MPOL_MF_MOVE | MPOL_MF_STRICT`` is passed anyway:
    should pages exist already, they are moved, or the call fails (``EIO``)
    instead of leaving them on the wrong node.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "NODE_ROOT",
    "NumaNode",
    "MappingPlacement",
    "numa_nodes",
    "parse_cpulist",
    "bind_memory",
    "mapping_placement",
]

NODE_ROOT = Path("/sys/devices/system/node")

MPOL_BIND = 2
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1

# mbind's syscall number: the generic table (aarch64, riscv64, loongarch64) says 235.
_SYS_MBIND = {"x86_64": 237, "aarch64": 235, "arm64": 235, "riscv64": 235, "loongarch64": 235,
              "ppc64le": 259, "ppc64": 259, "s390x": 268}

_MEMINFO_LINE = re.compile(r"Node\s+\d+\s+(\w+):\s+(\d+)(?:\s+kB)?")


@dataclass(frozen=True, slots=True)
class NumaNode:
    """One NUMA node as sysfs describes it.

    Attributes:
        id: the node number (``nodeN``).
        cpus: CPU ids of the node; empty for a CPU-less (memory-only, e.g. CXL) node.
        mem_total_bytes: ``MemTotal`` of ``nodeN/meminfo``.
        mem_free_bytes: ``MemFree`` of ``nodeN/meminfo``.
    """

    id: int
    cpus: tuple[int, ...]
    mem_total_bytes: int
    mem_free_bytes: int

    @property
    def cpuless(self) -> bool:
        return not self.cpus


def parse_cpulist(text: str) -> tuple[int, ...]:
    """``"0-3,8,10-11"`` -> ``(0, 1, 2, 3, 8, 10, 11)``; ``""`` -> ``()``."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return tuple(cpus)


def _meminfo(path: Path) -> dict[str, int]:
    out = {}
    for line in path.read_text().splitlines():
        m = _MEMINFO_LINE.match(line.strip())
        if m:
            out[m.group(1)] = int(m.group(2)) * 1024  # kB in the file
    return out


def numa_nodes(root: Path = NODE_ROOT) -> dict[int, NumaNode]:
    """The machine's NUMA nodes by id; empty when ``root`` does not exist (no NUMA support).

    ``root`` is a parameter so that tests can point it at a fake tree.
    """
    nodes = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return {}
    for entry in entries:
        m = re.fullmatch(r"node(\d+)", entry.name)
        if not m:
            continue
        try:
            cpus = parse_cpulist((entry / "cpulist").read_text())
            mem = _meminfo(entry / "meminfo")
        except (OSError, ValueError):
            continue  # a node going offline while we read: not usable anyway
        node_id = int(m.group(1))
        nodes[node_id] = NumaNode(node_id, cpus, mem.get("MemTotal", 0), mem.get("MemFree", 0))
    return nodes


@functools.cache
def _mbind_function() -> Callable[..., int]:
    """A callable ``mbind(addr, len, mode, nodemask, maxnode, flags)`` returning 0 or -1 (errno set)."""
    libc = ctypes.CDLL(None, use_errno=True)
    number = _SYS_MBIND.get(platform.machine())
    if number is not None:
        syscall = libc.syscall
        syscall.restype = ctypes.c_long

        def call(*args: object) -> int:
            return int(syscall(ctypes.c_long(number), *args))

        return call
    name = ctypes.util.find_library("numa")
    if name is None:
        raise OSError(errno.ENOSYS, f"mbind: no syscall number known for {platform.machine()} and no libnuma installed")
    fn = ctypes.CDLL(name, use_errno=True).mbind
    fn.restype = ctypes.c_long
    return lambda *args: int(fn(*args))


def bind_memory(address: int, length: int, nodes: Sequence[int]) -> None:
    """``mbind(MPOL_BIND)`` the ``length`` bytes at ``address`` to ``nodes``.

    ``address`` must be page-aligned (any mmap is). See Note [binding a memfd].

    Raises:
        OSError: the kernel refused (``EINVAL``: a node is offline or has no
            memory; ``EIO``: existing pages could not be moved; ``ENOSYS``:
            a kernel without NUMA support).
    """
    if not nodes:
        raise ValueError("bind_memory needs at least one node")
    words = max(nodes) // 64 + 1
    mask = (ctypes.c_ulong * words)()
    for node in nodes:
        mask[node // 64] |= 1 << (node % 64)
    # maxnode counts bits and the kernel reads maxnode - 1 of them (libnuma passes size + 1).
    rc = _mbind_function()(ctypes.c_void_p(address), ctypes.c_ulong(length), ctypes.c_int(MPOL_BIND), mask,
                           ctypes.c_ulong(words * 64 + 1), ctypes.c_uint(MPOL_MF_STRICT | MPOL_MF_MOVE))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind: {os.strerror(err)}")


@dataclass(frozen=True, slots=True)
class MappingPlacement:
    """Where a mapping's resident pages are, from ``numa_maps``.

    Attributes:
        policy: the memory policy of the mapping (``"bind:2"``, ``"default"``...).
        pages: resident pages per node (only pages mapped in that process count).
        page_bytes: the size of those pages (``kernelpagesize_kB``).
    """

    policy: str
    pages: dict[int, int]
    page_bytes: int

    @property
    def nodes(self) -> tuple[int, ...]:
        """Nodes holding at least one page."""
        return tuple(sorted(n for n, c in self.pages.items() if c))


def mapping_placement(address: int, pid: int | str = "self") -> MappingPlacement | None:
    """The placement of the mapping starting at ``address`` in process ``pid``; None if none starts there."""
    want = f"{address:x}"
    with open(f"/proc/{pid}/numa_maps") as fh:
        for line in fh:
            fields = line.split()
            if not fields or fields[0].lstrip("0") != want.lstrip("0"):
                continue
            pages: dict[int, int] = {}
            page_bytes = 4096
            for field in fields[2:]:
                key, _, value = field.partition("=")
                if re.fullmatch(r"N\d+", key):
                    pages[int(key[1:])] = int(value)
                elif key == "kernelpagesize_kB":
                    page_bytes = int(value) * 1024
            return MappingPlacement(fields[1], pages, page_bytes)
    return None
