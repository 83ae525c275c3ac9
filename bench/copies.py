"""Why host copies below 4 MiB run on one thread: torch's parallel copy vs np.copyto, idle and on busy cores.

    python bench/copies.py

Copies 1, 4 and 16 MiB between two CPU tensors, first on an idle machine,
then with as many busy-looping processes as there are cores, and prints the
median and p90 of 40 copies for torch's multi-threaded ``copy_`` and for
``np.copyto`` on one thread (what ``tierd._buffers.copy_bytes`` uses below
4 MiB). On busy cores torch's OpenMP threads spin-wait for a time slice and
the copy's tail stretches to milliseconds. Not part of ``tierd bench``: it
loads every core on purpose.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import torch

MIB = 1 << 20


def _p50_p90_us(fn: object, reps: int = 40) -> tuple[float, float]:
    for _ in range(5):
        fn()  # type: ignore[operator]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.9)] * 1e6


def main() -> int:
    for label, busy in (("idle", 0), (f"{os.cpu_count()} busy processes", os.cpu_count() or 1)):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            for n in (MIB, 4 * MIB, 16 * MIB):
                src = torch.randint(0, 255, (n,), dtype=torch.uint8)
                dst = torch.empty_like(src)
                t = _p50_p90_us(lambda: dst.copy_(src))
                one = _p50_p90_us(lambda: np.copyto(dst.numpy(), src.numpy()))
                print(f"{label:>20} {n // MIB:3d} MiB  torch copy_ p50 {t[0]:7.0f} p90 {t[1]:7.0f} us   "
                      f"np.copyto p50 {one[0]:7.0f} p90 {one[1]:7.0f} us")
        finally:
            for hog in hogs:
                hog.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
