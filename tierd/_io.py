"""Whole-buffer positional I/O and directory fsync, shared by the nvme tier and checkpoints."""

from __future__ import annotations

import errno
import os

__all__ = ["pwrite_all", "pread_all", "fsync_dir"]


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view`` at ``offset`` (pwritev may write less than asked)."""
    while view:
        n = os.pwritev(fd, [view], offset)
        view, offset = view[n:], offset + n


def pread_all(fd: int, view: memoryview, offset: int) -> None:
    """Fill all of ``view`` from ``offset``; EIO if the file ends first."""
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(errno.EIO, "short read: the file is shorter than its index says")
        view, offset = view[n:], offset + n


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so that a rename or a new file in it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
