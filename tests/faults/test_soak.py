"""Load and soak: 16 client processes against one daemon, mixed sizes, every read verified.

Each client puts, gets, deletes and checks keys of two kinds for a bounded
time: shared keys (any client writes them) and its own keys (only it
writes them, so it knows which version each must hold). An object's bytes
derive from its key and version, so any reader can check any object: a
header (version, size) and then a pattern seeded by xxh64(key:version).
The host tier is small, so most objects are demoted to nvme and promoted
back while others use them. Run as root, every other client becomes uid
65534 first: a uid the daemon does not trust with its arena, whose bytes
all travel through the socket (Note [arena trust] in tierd/daemon/server.py).

CI runs 16 clients for ~5 s; TIERD_FULL_FAULTS=1 for 60 s. The figures
(ops/s, p50/p99 latency, daemon RSS) are printed, written to soak.json in
the test's tmp dir, and summed up by tests/faults/conftest.py.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import xxhash
from daemon import Daemon, open_to_all

import tierd

FULL = bool(os.environ.get("TIERD_FULL_FAULTS"))
CLIENTS = 16
DURATION_S = 60.0 if FULL else 5.0
HOST = 16 << 20
SIZES = [300, 4096, 60_000, 256 << 10, 1 << 20, 3 << 20]
SIZE_WEIGHTS = [30, 20, 20, 15, 10, 5]
SHARED_KEYS = 64
OWN_KEYS = 24
_HEADER = 16  # int64 version, int64 size


def make_value(key: str, version: int, size: int) -> torch.Tensor:
    """The bytes of ``key`` at ``version``: a header, then a pattern only they produce."""
    seed = xxhash.xxh64_intdigest(f"{key}:{version}".encode()) >> 2
    words = -(-max(size - _HEADER, 0) // 8)
    body = (torch.arange(words, dtype=torch.int64) * 6364136223846793005 + seed).view(torch.uint8)
    head = torch.tensor([version, size], dtype=torch.int64).view(torch.uint8)
    return torch.cat([head, body])[:size] if size >= _HEADER else head[:size].clone()


def check_value(key: str, got: torch.Tensor) -> int:
    """The version ``got`` holds, after checking every byte of it; raises AssertionError on any mismatch."""
    assert got.dtype == torch.uint8 and got.dim() == 1, (key, got.dtype, got.shape)
    assert got.numel() >= _HEADER, (key, got.numel())
    version, size = got[:_HEADER].view(torch.int64).tolist()
    assert size == got.numel(), f"{key}: header says {size} bytes, got {got.numel()}"
    assert torch.equal(got, make_value(key, version, size)), f"{key}: bytes of version {version} differ"
    return int(version)


def client(sock: str, index: int, duration_s: float, seed: int, uid: int | None) -> dict[str, Any]:
    """One client process: mixed operations until ``duration_s`` has passed; returns its figures."""
    if uid is not None:
        os.setgid(uid)
        os.setuid(uid)
    torch.set_num_threads(1)
    rng = random.Random(seed * 1000 + index)
    own: dict[str, int | None] = {}  # own key -> version it must hold (None: deleted)
    latencies: list[float] = []
    counts = {"put": 0, "get": 0, "delete": 0, "exists": 0, "verified": 0, "bytes": 0, "not_found": 0}
    errors: list[str] = []
    version = index << 40
    deadline = time.monotonic() + duration_s
    with tierd.connect(sock) as s:
        streamed = not s.has_arena
        while time.monotonic() < deadline:
            mine = rng.random() < 0.5
            key = f"own/{index}/{rng.randrange(OWN_KEYS)}" if mine else f"shared/{rng.randrange(SHARED_KEYS)}"
            op = rng.random()
            started = time.perf_counter()
            try:
                if op < 0.40:
                    version += 1
                    size = rng.choices(SIZES, SIZE_WEIGHTS)[0]
                    value = make_value(key, version, size)
                    s.put(key, value)
                    latencies.append(time.perf_counter() - started)
                    counts["put"] += 1
                    counts["bytes"] += size
                    if mine:
                        own[key] = version
                elif op < 0.85:
                    try:
                        got = s.get(key)
                    except tierd.NotFound:
                        latencies.append(time.perf_counter() - started)
                        counts["not_found"] += 1
                        if mine and own.get(key) is not None:
                            errors.append(f"{key}: acknowledged version {own[key]} not found")
                        continue
                    latencies.append(time.perf_counter() - started)
                    counts["get"] += 1
                    counts["bytes"] += got.numel()
                    held = check_value(key, got)
                    counts["verified"] += 1
                    if mine and held != own.get(key):
                        errors.append(f"{key}: holds version {held}, the last acknowledged is {own.get(key)}")
                elif op < 0.95:
                    s.delete(key)
                    latencies.append(time.perf_counter() - started)
                    counts["delete"] += 1
                    if mine:
                        own[key] = None
                else:
                    there = s.exists(key)
                    latencies.append(time.perf_counter() - started)
                    counts["exists"] += 1
                    if mine and there != (own.get(key) is not None):
                        errors.append(f"{key}: exists() says {there}, expected {own.get(key) is not None}")
            except AssertionError as exc:
                errors.append(f"bad bytes: {exc}")
            except tierd.TierdError as exc:
                errors.append(f"{key}: {type(exc).__name__}: {exc}")
        # The end: every own key once more, as acknowledged.
        for key, want in own.items():
            try:
                held = check_value(key, s.get(key))
                if held != want:
                    errors.append(f"{key}: final version {held}, the last acknowledged is {want}")
                counts["verified"] += 1
            except tierd.NotFound:
                if want is not None:
                    errors.append(f"{key}: acknowledged version {want} lost")
            except AssertionError as exc:
                errors.append(f"bad bytes: {exc}")
    return {"counts": counts, "latencies": latencies, "errors": errors[:20], "streamed": streamed}


def _sample_rss(pid: int, stop: threading.Event, out: list[tuple[float, int]]) -> None:
    proc = psutil.Process(pid)
    t0 = time.monotonic()
    while not stop.wait(0.1):
        out.append((time.monotonic() - t0, proc.memory_info().rss))


def test_soak(tmp_path: Path, fault_report: Any) -> None:
    d = Daemon(tmp_path / "nvme", host=f"{HOST >> 20}MiB", nvme="768MiB").start()
    try:
        assert d.proc is not None
        with d.connect() as s:  # a first client warms the daemon up before its base RSS is taken
            s.put("warm/x", make_value("warm/x", 1, 1 << 20))
            check_value("warm/x", s.get("warm/x"))
        base_rss = psutil.Process(d.proc.pid).memory_info().rss
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "tierd", "xxhash"])  # imported once, not once per client
        rss: list[tuple[float, int]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=_sample_rss, args=(d.proc.pid, stop, rss), daemon=True)
        untrusted = 65534 if os.geteuid() == 0 else None
        if untrusted is not None:
            open_to_all(d)
        with ctx.Pool(CLIENTS, maxtasksperchild=1) as pool:  # one client a process (its uid is its own)
            sampler.start()
            started = time.monotonic()
            pending = pool.starmap_async(client, [(str(d.socket), i, DURATION_S, 1, untrusted if i % 2 else None)
                                                  for i in range(CLIENTS)])
            # No deadlock: everything finishes well within this bound (or the pool is torn down).
            results = pending.get(timeout=DURATION_S + 180)
            elapsed = time.monotonic() - started
        stop.set()
        sampler.join()
        assert d.proc.poll() is None, "the daemon died under load"

        errors = [e for r in results for e in r["errors"]]
        assert not errors, errors[:10]
        counts = {k: sum(r["counts"][k] for r in results) for k in results[0]["counts"]}
        lat = sorted(x for r in results for x in r["latencies"])
        ops = len(lat)
        assert counts["verified"] > CLIENTS and counts["put"] > CLIENTS
        q = statistics.quantiles(lat, n=100)
        # Bounded memory: under the base, plus the arena (its touched pages count), plus a margin,
        # and not growing in the second half of the run.
        limit = base_rss + HOST + (256 << 20)
        half = [m for t, m in rss if t > elapsed / 2]
        first = [m for t, m in rss if t <= elapsed / 2]
        peak = max(m for _, m in rss)
        assert peak < limit, f"daemon RSS {peak >> 20} MiB over {limit >> 20} MiB"
        # (A median: one burst of frames in flight at the sample is no trend.)
        assert not first or not half or statistics.median(half) <= max(first) + (64 << 20), (
            f"daemon RSS grows: {[(round(t, 1), m >> 20) for t, m in rss]}")
        with d.connect() as s:
            stats = s.stats()
        figures = {
            "clients": CLIENTS, "streamed_clients": sum(r["streamed"] for r in results), "seconds": round(elapsed, 1), "ops": ops, "ops_per_s": round(ops / elapsed, 1),
            "p50_ms": round(q[49] * 1e3, 2), "p99_ms": round(q[98] * 1e3, 2), "verified_reads": counts["verified"],
            "puts": counts["put"], "deletes": counts["delete"], "mib_moved": round(counts["bytes"] / 2**20, 1),
            "demoted_mib": round(stats["nvme"].demoted_bytes / 2**20, 1), "lost": 0,
            "rss_base_mib": base_rss >> 20, "rss_peak_mib": peak >> 20,
            "rss_first_half_max_mib": max(first, default=0) >> 20, "rss_second_half_max_mib": max(half, default=0) >> 20,
        }
        print("soak:", json.dumps(figures))
        (tmp_path / "soak.json").write_text(json.dumps(figures, indent=2))
        fault_report("soak", **figures)
        assert stats["nvme"].demoted_bytes > 0  # the small host tier made objects move
    finally:
        d.close()
