"""Eviction and prefetch policies, schedules, the simulator and OPT, and the engine using them."""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config

import tierd
from tierd.policies import EVICTION_POLICIES, Schedule, make_eviction_policy
from tierd.policies.base import EvictionPolicy
from tierd.policies.lru import LRUPolicy
from tierd.policies.simulator import OPT, TraceEvent, read_trace, simulate
from tierd.testing import wait_until

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import traces  # noqa: E402

MIB = 1 << 20


def _rotation_of(a: list[str], b: list[str]) -> bool:
    return len(a) == len(b) and any(a == b[i:] + b[:i] for i in range(len(b)))


def _gets(keys: str, size: int = 1) -> list[TraceEvent]:
    return [TraceEvent(float(i), "get", k, size) for i, k in enumerate(keys.split())]


# -- policies alone -----------------------------------------------------------------


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_every_policy_skips_pins_and_puts_expired_first(name: str) -> None:
    pol = make_eviction_policy(name)
    for i in range(20):
        pol.on_insert(f"k{i}", "host", 100 + i, float(i), pinned=i % 3 == 0,
                      expires_at=5.0 if i == 7 else None)
        pol.on_access(f"k{i}", "host", float(i))
    order = list(itertools.islice(pol.victims("host", 1000, now=10.0), 100))
    assert order[0] == "k7"  # expired at 5.0, now is 10.0
    assert not {f"k{i}" for i in range(0, 20, 3)} & set(order)  # pinned never offered
    assert set(order) == {f"k{i}" for i in range(20) if i % 3}  # everything else, once
    pol.on_remove("k7", "host")
    assert "k7" not in itertools.islice(pol.victims("host", 1, now=10.0), 100)


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_every_policy_respects_capacity_in_the_simulator(name: str) -> None:
    rng = random.Random(1)
    events = [TraceEvent(float(i), rng.choice(["put", "get", "get"]), f"k{rng.randrange(50)}",
                         rng.choice([1, 2, 3]) * MIB) for i in range(3000)]
    res = simulate(events, name, host_bytes=10 * MIB, nvme_bytes=1 << 30)
    assert 0 < res.hits < res.gets
    assert res.bytes_demoted > 0


def test_opt_on_the_classic_belady_string() -> None:
    # 1 2 3 4 1 2 5 1 2 3 4 5 with 3 frames: OPT faults 7 times (5 hits), LRU 10 (2 hits).
    trace = _gets("1 2 3 4 1 2 5 1 2 3 4 5")
    assert simulate(trace, OPT, host_bytes=3, nvme_bytes=100).hits == 5
    assert simulate(trace, "lru", host_bytes=3, nvme_bytes=100).hits == 2


def test_opt_on_a_cyclic_string() -> None:
    # a b c d repeated 5 times (20 gets), 3 frames: LRU never hits. By hand, Belady
    # misses at accesses 1-4, 7, 10, 13, 16, 19 and hits the other 11 (5 6 8 9 11 12
    # 14 15 17 18 20): each miss evicts the object whose next use is farthest.
    trace = _gets(" ".join(["a b c d"] * 5))
    assert simulate(trace, "lru", host_bytes=3, nvme_bytes=100).hits == 0
    opt = simulate(trace, OPT, host_bytes=3, nvme_bytes=100)
    assert opt.hits == 11
    # The schedule policy learns the cycle after two rounds, then matches OPT's rate.
    longer = _gets(" ".join(["a b c d"] * 50))
    learned = simulate(longer, "schedule", host_bytes=3, nvme_bytes=100).hits
    assert learned >= simulate(longer, OPT, host_bytes=3, nvme_bytes=100).hits - 6


def test_schedule_learns_follows_and_relearns() -> None:
    s = Schedule(relearn_after=4)
    step = ["a", "b", "c", "b", "a"]  # 'a' twice per step must not end the period early
    for key in step * 8:
        s.observe(key)
    assert len(s.order) == len(step) and not s.declared
    # Whatever rotation it caught, it predicts the stream: the next keys are the step's start.
    assert s.upcoming(2) == ["a", "b"]
    assert s.distance("c") == 3  # a, b, then c
    new = ["x", "y", "z"]
    for key in new * 6:
        s.observe(key)
    assert _rotation_of(s.order, new) and s.relearns == 1


def test_schedule_never_wedges_on_random_accesses() -> None:
    s = Schedule()
    rng = random.Random(0)
    for _ in range(20000):
        s.observe(f"k{rng.randrange(1000)}")
    # Whatever it believes, it keeps answering, and a clean cycle takes over.
    for key in [f"c{i}" for i in range(10)] * 40:
        s.observe(key)
    assert _rotation_of(s.order, [f"c{i}" for i in range(10)])  # the cycle, from wherever it was caught
    assert len(s.upcoming(3)) == 3



# -- indexed victims are the sorted ones --------------------------------------------------
#
# OPT and the schedule policy pick victims from heaps per object size (tierd/policies/farthest.py)
# instead of sorting every key at every eviction. These references are the sorts they replaced;
# the replay must be the same event for event.


class _SortedBelady(EvictionPolicy):
    name = OPT

    def __init__(self) -> None:
        super().__init__()
        self.next_use: dict[str, float] = {}
        self._keys: dict[str, dict[str, int]] = {}

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        self._keys.setdefault(tier, {})[key] = max(nbytes, 1)

    def _on_access(self, key: str, tier: str, now: float) -> None:
        pass

    def _on_remove(self, key: str, tier: str) -> None:
        self._keys.get(tier, {}).pop(key, None)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Any:
        keys = self._keys.get(tier, {})
        yield from sorted(keys, key=lambda k: -(self.next_use.get(k, math.inf) - now) * keys[k])


class _SortedSchedule(LRUPolicy):
    name = "schedule"

    def __init__(self, schedule: Schedule) -> None:
        super().__init__()
        self.schedule = schedule
        self._size: dict[tuple[str, str], int] = {}

    def _on_insert(self, key: str, tier: str, nbytes: int, now: float) -> None:
        super()._on_insert(key, tier, nbytes, now)
        self._size[(tier, key)] = max(nbytes, 1)

    def _on_remove(self, key: str, tier: str) -> None:
        super()._on_remove(key, tier)
        self._size.pop((tier, key), None)

    def _candidates(self, tier: str, need_bytes: int, now: float) -> Any:
        if not self.schedule.active:
            yield from super()._candidates(tier, need_bytes, now)
            return
        dist = self.schedule.distance
        heap = [(-dist(k) * self._size.get((tier, k), 1), i, k) for i, k in enumerate(self._tier(tier))]
        heapq.heapify(heap)
        while heap:
            yield heapq.heappop(heap)[2]

    def declare_schedule(self, keys: Any, *, cyclic: bool = True) -> None:
        self.schedule.declare(keys, cyclic=cyclic)


def _mixed_trace(seed: int, n: int = 4000) -> list[TraceEvent]:
    """Cycles with noise, deletes and three sizes: resyncs, relearns and ties all happen."""
    rng = random.Random(seed)
    cycle = [f"k{i}" for i in range(rng.randrange(20, 60))]
    sizes = {k: rng.choice([1, 2, 5]) * MIB for k in cycle + [f"x{i}" for i in range(40)]}
    events = []
    while len(events) < n:
        for key in cycle:
            r = rng.random()
            if r < 0.05:
                key = f"x{rng.randrange(40)}"  # noise: a key off the cycle
            elif r < 0.08:
                continue  # a skipped access: the schedule resyncs
            op = "delete" if r > 0.995 else rng.choice(["get", "get", "get", "put"])
            events.append(TraceEvent(float(len(events)), op, key, sizes[key]))
    return events


@pytest.mark.parametrize("seed", range(6))
def test_indexed_opt_and_schedule_replay_exactly_as_the_sorted_ones(seed: int,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from tierd.policies import simulator

    events = _mixed_trace(seed)
    host = random.Random(seed).choice([6, 12, 30]) * MIB
    declared = [e.key for e in events[:40]] if seed % 2 else None
    fast = [simulate(events, p, host_bytes=host, nvme_bytes=1 << 30, declared=declared if p != OPT else None)
            for p in (OPT, "schedule")]
    monkeypatch.setattr(simulator, "_Belady", _SortedBelady)
    monkeypatch.setattr(simulator, "make_eviction_policy", lambda name, schedule, **_: _SortedSchedule(schedule))
    slow = [simulate(events, p, host_bytes=host, nvme_bytes=1 << 30, declared=declared if p != OPT else None)
            for p in (OPT, "schedule")]
    assert fast == slow
    assert 0 < fast[1].hits < fast[1].gets

@pytest.mark.parametrize(
    ("workload", "host", "steps", "declare"),
    [("optimizer", 400 * MIB, 20, True), ("optimizer", 400 * MIB, 300, False), ("checkpoint", 256 * MIB, 30, False)],
)
def test_schedule_reaches_opt_on_cyclic_training_traces(workload: str, host: int, steps: int, declare: bool) -> None:
    events = list(traces.WORKLOADS[workload](steps=steps))
    declared = None
    if declare:  # the caller declares one step's order: the policy plans from the first access
        per_step = len([e for e in events if e.op != "delete"]) // steps
        declared = [e.key for e in events if e.op != "delete"][:per_step]
    opt = simulate(events, OPT, host_bytes=host, nvme_bytes=64 << 30)
    sched = simulate(events, "schedule", host_bytes=host, nvme_bytes=64 << 30, declared=declared)
    lru = simulate(events, "lru", host_bytes=host, nvme_bytes=64 << 30)
    assert opt.hit_ratio > 0.3
    assert sched.hit_ratio >= 0.98 * opt.hit_ratio
    assert lru.hit_ratio <= 0.5 * opt.hit_ratio


def test_prefetch_cuts_modelled_stall_when_compute_hides_it() -> None:
    events = list(traces.activations(layers=48, size=4 * MIB))
    none = simulate(events, "lru", host_bytes=64 * MIB, nvme_bytes=1 << 30)
    pre = simulate(events, "lru", host_bytes=64 * MIB, nvme_bytes=1 << 30, prefetch="schedule")
    assert none.stall_s > 0
    assert pre.stall_s < 0.5 * none.stall_s


# -- in the engine ------------------------------------------------------------------


@pytest.mark.parametrize("name", EVICTION_POLICIES)
def test_engine_with_each_policy_keeps_capacity_pins_and_data(nvme_dir: Path, name: str) -> None:
    cfg = small_config(nvme_dir, host="8MiB", nvme="128MiB", namespaces={"x": {"policy": name}})
    with tierd.open(cfg) as s:
        pinned = torch.full((MIB,), 255, dtype=torch.uint8)
        s.put("x/pinned", pinned, pin=True)
        values = {f"x/{i}": torch.full((MIB,), i, dtype=torch.uint8) for i in range(30)}
        for i, (k, v) in enumerate(values.items()):
            s.put(k, v)
            if i % 4 == 0:
                s.get("x/0")  # some reuse for the frequency-aware ones
            assert s.stats()["host"].used_bytes <= 8 * MIB
        assert s.info("x/pinned").tier == "host"
        assert all(torch.equal(s.get(k), v) for k, v in values.items())
        assert torch.equal(s.get("x/pinned"), pinned)


def test_live_policy_switch_keeps_every_object(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir, host="8MiB", nvme="128MiB", namespaces={"x": {"policy": "lru"}})
    with tierd.open(cfg) as s:
        values = {f"x/{i}": torch.full((MIB,), i, dtype=torch.uint8) for i in range(20)}
        for k, v in values.items():
            s.put(k, v)
        for name in ("s3fifo", "gdsf", "schedule", "lru"):
            s.engine.apply_config(tierd.load_config(
                small_config(nvme_dir, host="8MiB", nvme="128MiB", namespaces={"x": {"policy": name}})))
            for i in range(20, 26):  # more overflow under the new policy
                s.put(f"x/{i}", torch.full((MIB,), i, dtype=torch.uint8))
                values[f"x/{i}"] = torch.full((MIB,), i, dtype=torch.uint8)
            assert all(torch.equal(s.get(k), v) for k, v in values.items()), name
            assert s.stats()["host"].used_bytes <= 8 * MIB


def test_get_after_prefetch_is_a_host_hit(nvme_dir: Path) -> None:
    with tierd.open(small_config(nvme_dir)) as s:
        t = torch.randn(256, 256)
        s.put("p/x", t)
        s.move("p/x", "nvme")
        s.prefetch("p/x")
        assert wait_until(lambda: s.info("p/x").tier == "host", timeout_s=30)
        before = s.stats()["host"]
        assert torch.equal(s.get("p/x"), t)
        after = s.stats()["host"]
        assert after.hits == before.hits + 1 and after.misses == before.misses


@pytest.mark.parametrize("how", ["declared", "learned"])
def test_schedule_prefetch_brings_the_next_object_up_during_this_ones_use(nvme_dir: Path, how: str) -> None:
    ns = {"opt": {"prefetch": "schedule", "policy": "schedule", "prefetch_depth": 1}}
    if how == "learned":
        ns = {"opt": {"access": "cyclic", "prefetch_depth": 1}}
    with tierd.open(small_config(nvme_dir, namespaces=ns)) as s:
        keys = [f"opt/p{i}" for i in range(6)]
        values = {k: torch.full((100_000,), i, dtype=torch.int32) for i, k in enumerate(keys)}
        for k in keys:
            s.put(k, values[k])
        if how == "declared":
            s.declare_schedule(keys)
        else:
            for _ in range(3):  # the engine learns the order from the accesses
                for k in keys:
                    s.get(k)
        for k in keys:
            s.move(k, "nvme")
        hits = 0
        for i, k in enumerate(keys):
            nxt = keys[(i + 1) % len(keys)]
            s.get(k)
            # While the caller would be using k, the next key is coming up without a get.
            assert wait_until(lambda n=nxt: s.info(n).tier == "host", timeout_s=30), nxt
            before = s.stats()["host"].hits
            assert torch.equal(s.get(nxt), values[nxt])
            hits += s.stats()["host"].hits - before
        assert hits == len(keys)


def test_trace_recording_replays_in_the_simulator(nvme_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    cfg = small_config(nvme_dir, trace={"path": str(trace)})
    with tierd.open(cfg) as s:
        for _step in range(3):
            for i in range(5):
                s.put(f"t/{i}", torch.zeros(1000 + i))
            for i in reversed(range(5)):
                s.get(f"t/{i}")
            s.delete("t/0")
    events = read_trace(trace)
    assert [e.op for e in events[:11]] == ["put"] * 5 + ["get"] * 5 + ["delete"]
    assert events[0].key == "t/0" and events[0].size == 4000 and events[0].tier == "host"
    assert simulate(events, "lru", host_bytes=1 << 20, nvme_bytes=1 << 30).hits == 15


def test_simulate_command(tmp_path: Path) -> None:
    path = tmp_path / "opt.jsonl"
    traces.write(path, traces.optimizer(params=30, steps=5))
    png = tmp_path / "sim.png"
    res = subprocess.run([sys.executable, "-m", "tierd", "simulate", str(path), "--policy", "lru,schedule",
                          "--tiers", "host=64MiB,nvme=8GiB", "--png", str(png)], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert "opt" in res.stdout and "schedule" in res.stdout
    assert png.stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "tierd", "simulate", str(path), "--policy", "mru"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown policy 'mru'" in bad.stderr  # errors go to stderr


def test_size_admission_keeps_huge_objects_off_host(nvme_dir: Path) -> None:
    cfg = small_config(nvme_dir, host="16MiB", namespaces={"w": {"admit_max": "4MiB"}})
    with tierd.open(cfg) as s:
        small = torch.ones(MIB, dtype=torch.uint8)
        s.put("w/small", small)
        huge = torch.ones(8 * MIB, dtype=torch.uint8)
        s.put("w/huge", huge)
        assert s.info("w/small").tier == "host"
        assert s.info("w/huge").tier == "nvme"  # refused by admission, not by room
        s.put("w/forced", huge, tier="host")  # an explicit tier= overrides admission
        assert s.info("w/forced").tier == "host"
        assert torch.equal(s.get("w/huge", out=torch.empty_like(huge)), huge)


def test_the_serving_trace_has_shared_prompts_growing_sessions_and_one_shot_documents() -> None:
    events = list(traces.serving(requests=3000, seed=3))
    per_key: dict[str, list[str]] = {}
    for e in events:
        per_key.setdefault(e.key, []).append(e.op)
    assert all(ops[0] == "put" and set(ops[1:]) <= {"get"} for ops in per_key.values())  # a prefix cache's view
    system = {k: ops for k, ops in per_key.items() if k.startswith("kv/s")}
    docs = {k: ops for k, ops in per_key.items() if k.startswith("kv/d")}
    sessions = {k: ops for k, ops in per_key.items() if k.startswith("kv/u")}
    assert len(system) <= 32 * 4 and max(len(ops) for ops in system.values()) > 100  # shared by many requests
    assert docs and all(ops == ["put"] for ops in docs.values())  # the one-shot tail: never read again
    assert len(docs) > 0.3 * len(per_key)
    # A session's turn reads its whole history in order before appending: block i is read after block i-1.
    reread = [k for k, ops in sessions.items() if len(ops) > 1]
    assert len(reread) > 0.2 * len(sessions)
    order = [e.key for e in events if e.key.startswith("kv/u")]
    first = {k: order.index(k) for k in set(order)}
    for key in reread[:200]:
        sid, b = key.rsplit("/b", 1)
        if int(b) > 0:
            assert first[f"{sid}/b{int(b) - 1}"] < first[key]  # its parent came first
    # Each block's parent is the block before it in its request (what PrefixKVStore declares).
    for e in events[:5000]:
        where, b = e.key.rsplit("/b", 1)
        if int(b) > 0:
            assert e.parent == f"{where}/b{int(b) - 1}"
        elif not where.startswith("kv/s"):
            assert e.parent.startswith("kv/s")  # a session's or document's first block: under its system prompt
    assert traces.serving(requests=200, seed=1).__next__() == next(traces.serving(requests=200, seed=1))


def test_serving_trace_end_spread_gives_users_their_own_session_lengths() -> None:
    def turns(**kw: float) -> list[int]:
        firsts: dict[str, int] = {}  # session -> turns (a turn reads block 0 again, or stores it)
        for e in traces.serving(requests=3000, seed=5, **kw):
            if e.key.startswith("kv/u") and e.key.endswith("/b0"):
                sid = e.key.rsplit("/", 1)[0]
                firsts[sid] = firsts.get(sid, 0) + 1
        return list(firsts.values())

    same, spread = turns(), turns(end_spread=0.5)
    assert statistics.mean(same) < 1 / 0.35  # geometric, cut short where the trace ends
    # Some users stay much longer, some leave at once: a wider spread of session lengths.
    assert statistics.pstdev(spread) > 1.3 * statistics.pstdev(same)
