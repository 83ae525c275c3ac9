"""KV-aware policies (tierd/policies/prefix.py): hints, prefix-aware eviction, admission, in the
simulator and in the engine through PrefixKVStore."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import small_config

import tierd
from tierd.policies import PrefixAdmission, PrefixHints, PrefixPolicy, make_admission_policy
from tierd.policies.prefix import KINDS
from tierd.policies.simulator import OPT, TraceEvent, read_trace, simulate
from tierd.testing import wait_until

sys.path.append(str(Path(__file__).resolve().parent.parent / "bench"))  # after tests/: its daemon.py is the one
import oracles  # noqa: E402
import traces  # noqa: E402

MIB = 1 << 20


def test_hints_know_parents_depths_and_children() -> None:
    h = PrefixHints()
    h.declare(["s", "a1", "a2"])
    h.declare(["s", "b1"])
    assert [h.get(k).depth for k in ("s", "a1", "a2", "b1")] == [0, 1, 2, 1]
    assert h.get("a2").parent == "a1" and h.get("s").children == 2
    h.forget("b1")
    assert h.get("s").children == 1
    small = PrefixHints(max_entries=3)
    small.declare(["x", "y", "z", "w"])  # the oldest entry goes: x is unknown again
    assert "x" not in small and len(small) == 3 and small.dropped == 1


def test_a_finished_chain_marks_only_what_no_other_chain_shares() -> None:
    h = PrefixHints()
    h.declare(["sys", "a1", "a2", "a3"])
    h.declare(["sys", "a1", "b2"])  # b branches off a1
    assert h.finish("a3") == 2  # a3 and a2; a1 has another child, and sys above it
    assert [h.get(k).done for k in ("sys", "a1", "a2", "a3", "b2")] == [False, False, True, True, False]
    policy = PrefixPolicy(h)
    for k in ("sys", "a1", "a2", "a3", "b2"):
        policy.on_insert(k, "host", MIB, 0.0)
    assert next(iter(policy.victims("host", MIB, 0.0))) == "a3"  # the finished tail, though newest
    h.read("a3")  # back after all: an ordinary block again
    assert not h.get("a3").done and h.get("a2").done
    assert h.finish("missing") == 0
    h.declare(["sys", "a1", "a2", "c3"])  # a chain declared again is live: a2 is someone's prefix
    assert not h.get("a2").done
    assert h.finish("a2") == 0  # another chain goes on from a2: nothing of it is over
    solo = PrefixHints()
    solo.declare(["sys", "u1"])
    assert solo.finish("u1") == 2  # the only conversation under its system prompt so far...
    solo.declare(["sys", "v1"])
    assert not solo.get("sys").done  # ...until another one comes


def test_kinds_follow_the_parent() -> None:
    h = PrefixHints()
    h.declare(["sys", "d0", "d1"])  # a new document under a system prompt
    assert KINDS[h.kind("sys")] == "root" and KINDS[h.kind("d1")] == "fresh"
    h.read("sys")
    h.declare(["sys", "u0"])
    h.read("d0")  # a session's history read again: its extension continues it
    h.declare(["sys", "d0", "d1", "d2"])
    assert KINDS[h.kind("u0")] == "branch"  # "sys" has children d0 and u0
    h2 = PrefixHints()
    h2.declare(["a", "b"])
    h2.read("a")
    assert KINDS[h2.kind("b")] == "continue"  # "a" was read and b is its only child


def _victims(policy: PrefixPolicy, n: int) -> list[str]:
    out = []
    for _ in range(n):
        key = next(policy.victims("host", 1, 0.0))
        policy.on_remove(key, "host")
        out.append(key)
    return out


@pytest.mark.parametrize("tail_first", [False, True])
def test_eviction_takes_leaves_only(tail_first: bool) -> None:
    hints = PrefixHints()
    policy = PrefixPolicy(hints)
    chains = [["sys"] + [f"c{c}/{i}" for i in range(5)] for c in range(6)]
    for chain in chains:
        hints.declare(chain)
        for key in (reversed(chain) if tail_first else chain):  # PrefixKVStore stores tail first
            if key != "sys" or chain is chains[0]:
                policy.on_insert(key, "host", MIB, 0.0)
    gone: set[str] = set()
    for key in _victims(policy, 30):
        gone.add(key)
        # Nothing below a block is still cached when it goes: a chain is cut from its tail.
        assert all(f"{key.split('/')[0]}/{i}" in gone for i in range(int(key.split("/")[1]) + 1, 5)) \
            if key != "sys" else len(gone) == 31
    assert "sys" not in gone  # the shared block outlives every chain below it
    assert _victims(policy, 1) == ["sys"]


def test_admission_learns_to_keep_one_shot_blocks_out() -> None:
    hints = PrefixHints()
    admit = PrefixAdmission(hints)
    for doc in range(200):  # one-shot documents: stored, never read again
        hints.declare(["sys"] + [f"d{doc}/{i}" for i in range(8)])
        for _ in range(4):
            hints.read("sys")
        for i in range(8):
            hints.put(f"d{doc}/{i}")
            admit.admit(f"d{doc}/{i}", "host", MIB, 0.0)
    hints.declare(["sys", "new/0", "new/1"])
    hints.put("new/1")
    assert not admit.admit("new/1", "host", MIB, 0.0)
    assert admit.admit("new/1", "nvme", MIB, 0.0)  # only the fast tier is guarded
    hints.read("new/1")
    hints.put("new/1")
    assert admit.admit("new/1", "host", MIB, 0.0)  # read once: no longer one-shot
    rows = {(r["kind"], r["depth"]): r for r in admit.table()}
    assert rows[("fresh", ">= 8")]["refused"] > 0 and rows[("fresh", ">= 8")]["reuse"] < 0.1
    # A session whose history is read again: its extensions are admitted (the kind's prior, then its record).
    hints = PrefixHints()
    admit = PrefixAdmission(hints)
    for turn in range(1, 300):
        chain = [f"s/{i}" for i in range(turn + 1)]
        hints.declare(chain)
        for key in chain[:-1]:
            hints.read(key)
        hints.put(chain[-1])
        assert admit.admit(chain[-1], "host", MIB, 0.0)
    assert all(r["reuse"] > 0.9 for r in admit.table() if r["kind"] == "continue" and r["depth"] == ">= 16")


def test_size_admission_wraps_prefix_admission() -> None:
    hints = PrefixHints()
    admit = make_admission_policy("prefix", hints=hints, max_bytes=4 * MIB)
    assert not admit.admit("k", "host", 8 * MIB, 0.0)  # too large, whatever the kind
    for i in range(2000):  # a kind never read again: learned one-shot
        hints.declare(["root", f"d{i}/0", f"d{i}/1"])
        hints.put(f"d{i}/1")
        admit.admit(f"d{i}/1", "host", MIB, 0.0)
    hints.declare(["root", "n/0", "n/1"])
    hints.put("n/1")
    assert not admit.admit("n/1", "host", MIB, 0.0)  # small enough, but the inner policy refuses
    with pytest.raises(tierd.ConfigError, match="unknown admission policy"):
        make_admission_policy("nope")


def test_serving_trace_prefix_policies_beat_lru_and_s3fifo() -> None:
    events = list(traces.serving(requests=4000, seed=2))
    host = int(len({e.key for e in events}) * 0.02) * MIB
    hit = {(p, a): simulate(events, p, host_bytes=host, nvme_bytes=1 << 40, admission=a).hit_ratio
           for p, a in [("lru", "all"), ("s3fifo", "all"), ("prefix", "prefix"), ("lru", "prefix"), (OPT, "all")]}
    assert hit[("prefix", "prefix")] > 1.4 * hit[("lru", "all")]
    assert hit[("prefix", "prefix")] > 1.2 * hit[("s3fifo", "all")]
    assert hit[("lru", "prefix")] > hit[("lru", "all")]  # admission alone helps a recency cache
    assert hit[("prefix", "prefix")] < hit[(OPT, "all")]


def test_told_which_sessions_are_over_the_prefix_policy_nears_opt() -> None:
    """Where OPT's lead on the serving trace comes from (bench/oracles.py): told which sessions
    are over, the prefix policy comes within 0.8 x OPT; told each user's median think time
    instead, it gains next to nothing over its own estimate from read gaps."""
    users: dict[str, float] = {}
    events = list(traces.serving(requests=4000, seed=2, users=users))
    assert users and all(k.startswith("kv/u") and v > 0 for k, v in users.items())
    host = int(len({e.key for e in events}) * 0.02) * MIB

    def hit(make: Any = None) -> float:
        return simulate(events, "prefix", host_bytes=host, nvme_bytes=1 << 40, admission="prefix",
                        make_policy=make).hit_ratio

    per_s = len(events) / (events[-1].t - events[0].t)
    medians = {k: v * per_s for k, v in users.items()}
    last = oracles.last_reads(events)
    plain, ends = hit(), hit(lambda h: oracles.ToldEnds(h, last))
    think = hit(lambda h: oracles.ToldThink(h, medians))
    opt = simulate(events, OPT, host_bytes=host, nvme_bytes=1 << 40).hit_ratio
    assert ends >= 0.8 * opt and ends > plain + 0.1
    assert abs(think - plain) < 0.05


def test_declared_ends_close_most_of_the_gap_to_opt() -> None:
    """With every conversation's end declared (``closed_share=1``), the prefix policies gain a
    tenth of the gets on the serving trace with 2 % of the blocks (the whole trace: 0.82 x OPT
    and 2.4 x LRU, bench/policies.py; this shorter one leaves less time to learn)."""
    events = list(traces.serving(requests=4000, seed=2, closed_share=1.0))
    assert sum(e.op == "done" for e in events) > 1000
    host = int(len({e.key for e in events}) * 0.02) * MIB
    plain = [e for e in events if e.op != "done"]
    hit = {name: simulate(evs, p, host_bytes=host, nvme_bytes=1 << 40, admission=a).hit_ratio
           for name, evs, p, a in [("told", events, "prefix", "prefix"), ("untold", plain, "prefix", "prefix"),
                                   ("lru", events, "lru", "all"), ("opt", events, OPT, "all")]}
    assert hit["told"] >= 0.75 * hit["opt"] and hit["told"] >= 2 * hit["lru"], hit
    assert hit["told"] > hit["untold"] + 0.1, hit


def test_without_parents_the_prefix_policy_still_works() -> None:
    """A trace with no hints (every block a root) replays; the policy falls back on reads and gaps."""
    events = [TraceEvent(e.t, e.op, e.key, e.size, e.tier) for e in traces.serving(requests=1500, seed=4)]
    host = int(len({e.key for e in events}) * 0.05) * MIB
    r = simulate(events, "prefix", host_bytes=host, nvme_bytes=1 << 40, admission="prefix")
    assert 0 < r.hits < r.gets


# -- in the engine ------------------------------------------------------------------

def _kv(tokens: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 2, tokens, 2, 64, generator=g)  # 64 KiB a block of 32 tokens


def _where(store: tierd.Store, kv: tierd.PrefixKVStore, tokens: list[int]) -> list[str]:
    return [store.info(k).tier for k in kv.block_keys(tokens)]


@pytest.mark.parametrize("access", ["prefix", pytest.param("random", marks=pytest.mark.xfail(strict=True))])
def test_engine_keeps_one_shot_documents_out_of_host_and_sessions_in(nvme_dir: Path, access: str) -> None:
    """Sessions re-read every round share host with a stream of one-shot documents: with
    ``access = "prefix"`` the documents go to nvme and the sessions stay; LRU (``random``) lets the
    documents flush them."""
    cfg = small_config(nvme_dir, host="4MiB", namespaces={"kv": {"access": access}})  # 64 blocks
    rng = random.Random(0)
    with tierd.open(cfg) as store:
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=32, dtype=torch.float32)
        system = [rng.randrange(1000) for _ in range(32)]
        # 3 x 12 blocks at the end: what stays under the low watermark (75 % of 64 blocks)
        sessions = [system + [rng.randrange(1000) for _ in range(2 * 32)] for _ in range(3)]
        full = [_kv(len(h) + 10 * 32, 100 + i) for i, h in enumerate(sessions)]  # each session's whole KV
        docs = []
        demoted_at = {}
        for round_ in range(10):
            demoted_at[round_] = store.stats()["nvme"].demoted_bytes
            for i, history in enumerate(sessions):  # a turn: read the history, store what it adds
                got = kv.get(history)
                if round_:
                    assert torch.equal(got[:, :, 32:], full[i][:, :, 32 : len(history)])
                history += [rng.randrange(1000) for _ in range(32)]
                kv.put(history, full[i][:, :, : len(history)])
            for _ in range(16):  # one-shot documents, a host tier's worth a round
                tokens = system + [rng.randrange(1000) for _ in range(4 * 32)]
                kv.get(tokens)
                kv.put(tokens, _kv(len(tokens), len(docs)))
                docs.append(tokens)
        held = [t for history in sessions for t in _where(store, kv, history)[1:]]
        assert held.count("host") > 0.9 * len(held)  # the sessions, read every round, stay in host
        # Learned within a few rounds (a block's fate is known after a few hundred events): documents are
        # not read again, so they go straight to nvme instead of through host (LRU writes every one to
        # host, then demotes it).
        late_doc_bytes = 5 * 16 * 4 * 64 * 1024
        assert store.stats()["nvme"].demoted_bytes - demoted_at[5] < 0.1 * late_doc_bytes
        for d, tokens in enumerate(docs):  # nothing was lost, wherever it went
            assert torch.equal(kv.get(tokens)[:, :, 32:], _kv(len(tokens), d)[:, :, 32:])


@contextlib.contextmanager
def _store(via: str, nvme_dir: Path, host: str, namespaces: dict[str, Any]) -> Iterator[tierd.Store]:
    """An embedded store, or a client of a real daemon (``via``), with these tiers and namespaces."""
    if via == "embedded":
        with tierd.open(small_config(nvme_dir, host=host, namespaces=namespaces)) as store:
            yield store
        return
    from daemon import Daemon

    d = Daemon(nvme_dir, host=host, namespaces=namespaces).start()
    try:
        with tierd.connect(d.socket) as store:
            yield store
    finally:
        d.close()


def _demoted_to_low_watermark(store: tierd.Store, timeout_s: float = 30.0) -> None:
    """Wait until background demotion is done: host is under its low watermark (where a pass
    ends), or under the high one (where a pass starts) and its use stays put for 0.2 s."""
    seen: list[int] = []

    def settled() -> bool:
        host = store.stats()["host"]
        seen.append(host.used_bytes)
        if host.used_bytes <= 0.75 * host.capacity_bytes:  # the default watermarks: 0.75 and 0.9
            return True
        # wait_until polls every 10 ms: 20 equal readings are 0.2 s without a demotion
        return host.used_bytes <= 0.9 * host.capacity_bytes and seen[-20:] == [host.used_bytes] * 20

    assert wait_until(settled, timeout_s=timeout_s), f"host use kept changing: {seen[-5:]}"


@pytest.mark.parametrize("via", ["embedded", "daemon"])
@pytest.mark.parametrize("policy", ["prefix", pytest.param("lru", marks=pytest.mark.xfail(strict=True))])
def test_engine_evicts_chains_from_their_tail(nvme_dir: Path, policy: str, via: str) -> None:
    """Through the daemon too: a client's declare_prefix is not waited for, so this checks that the
    daemon applies it before the put that follows it."""
    rng = random.Random(1)
    with _store(via, nvme_dir, "8MiB", {"kv": {"policy": policy}}) as store:
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=32, dtype=torch.float32)
        chains = [[rng.randrange(1000) for _ in range(32 * 8)] for _ in range(40)]  # 40 x 8 blocks x 64 KiB
        for c, tokens in enumerate(chains):
            kv.put(tokens, _kv(len(tokens), c))
            # Reading a tail makes it the most recent (an LRU would evict its head first). Only blocks
            # in host are read: a read from below promotes, in whatever order there is room for. So
            # background demotion has to be done first, or a tail seen in host may be demoted and
            # promoted back by the read (the daemon's mover runs in its own process).
            _demoted_to_low_watermark(store)
            for old in chains[max(0, c - 4) : c]:
                tail = kv.block_keys(old)[-1]
                if store.info(tail).tier == "host":
                    store.get(tail)
        assert store.stats()["host"].used_bytes <= 8 * MIB
        demoted = 0
        for tokens in chains:
            where = _where(store, kv, tokens)
            demoted += where.count("nvme")
            # Host holds a head of each chain: never a block whose parent left.
            assert where == sorted(where, key=lambda t: t != "host"), where
        assert demoted > 0
        for c, tokens in enumerate(chains):
            assert torch.equal(kv.get(tokens), _kv(len(tokens), c))


def test_trace_records_parents_and_replays_prefix_policies(nvme_dir: Path, tmp_path: Path) -> None:
    trace = tmp_path / "kv.jsonl"
    cfg = small_config(nvme_dir, trace={"path": str(trace)}, namespaces={"kv": {"access": "prefix"}})
    with tierd.open(cfg) as store:
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=32, dtype=torch.float32)
        tokens = list(range(32 * 4))
        kv.put(tokens, _kv(len(tokens), 0))
        kv.get(tokens)
        kv.finish(tokens)
        keys = kv.block_keys(tokens)
    events = read_trace(trace)
    puts = {e.key: e.parent for e in events if e.op == "put"}
    assert puts == {keys[0]: "", **{keys[i]: keys[i - 1] for i in range(1, 4)}}
    assert [(e.op, e.key) for e in events][-1] == ("done", keys[-1])  # the chain's end, declared
    assert simulate(events, "prefix", host_bytes=MIB, nvme_bytes=1 << 30, admission="prefix").gets == 4
    assert simulate(events, OPT, host_bytes=MIB, nvme_bytes=1 << 30).gets == 4  # a hint is not an access


def test_a_finished_conversation_stored_again_is_live(nvme_dir: Path) -> None:
    with tierd.open(small_config(nvme_dir, namespaces={"kv": {"access": "prefix"}})) as store:
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=32, dtype=torch.float32)
        tokens = list(range(32 * 4))
        kv.put(tokens, _kv(len(tokens), 0))
        kv.finish(tokens)
        hints = store._engine._policies.get("kv").hints
        assert all(hints.get(k).done for k in kv.block_keys(tokens))
        kv.put(tokens, _kv(len(tokens), 0))  # every block stored already: still declared, live again
        assert not any(hints.get(k).done for k in kv.block_keys(tokens))


@pytest.mark.parametrize("via", ["embedded", "daemon"])
@pytest.mark.parametrize("finish", [True, pytest.param(False, marks=pytest.mark.xfail(strict=True))])
def test_finished_conversations_leave_host_first(nvme_dir: Path, via: str, finish: bool) -> None:
    """Sessions whose client said they are over (``PrefixKVStore.finish``) make room for the rest,
    though they are the newest; without the hint, the older ones would go."""
    rng = random.Random(2)
    with _store(via, nvme_dir, "5MiB", {"kv": {"access": "prefix"}}) as store:  # 80 blocks of 64 KiB
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=32, dtype=torch.float32)
        system = [rng.randrange(1000) for _ in range(32)]
        sessions = [system + [rng.randrange(1000) for _ in range(32 * 8)] for _ in range(6)]  # 6 x 8 own blocks
        for i, tokens in enumerate(sessions):
            kv.put(tokens, _kv(len(tokens), i))
        if finish:  # the newest three were one-turn conversations: over
            for tokens in sessions[3:]:
                kv.finish(tokens)
        _demoted_to_low_watermark(store)
        kept = [_where(store, kv, tokens)[1:].count("host") for tokens in sessions]
        assert kept == [8] * 6, kept  # all in host (49 blocks, under the low watermark)... until room is needed:
        more = [system + [rng.randrange(1000) for _ in range(32 * 8)] for _ in range(3)]
        for i, tokens in enumerate(more):
            kv.put(tokens, _kv(len(tokens), 10 + i))
        _demoted_to_low_watermark(store)
        kept = [_where(store, kv, tokens)[1:].count("host") for tokens in sessions]
        assert sum(kept[:3]) == 24 and sum(kept[3:]) < 24, kept  # the finished ones made the room
        assert _where(store, kv, system)[0] == "host"  # the shared system prompt is nobody's to finish
        for i, tokens in enumerate(sessions):  # nothing lost (the system prompt's block is session 0's)
            assert torch.equal(kv.get(tokens)[:, :, 32:], _kv(len(tokens), i)[:, :, 32:])


def test_config_access_prefix_sets_policy_and_admission() -> None:
    cfg = tierd.load_config({"namespaces": {"kv": {"access": "prefix"}, "k2": {"access": "prefix", "admission": "all"}}})
    assert (cfg.namespace("kv").eviction_policy, cfg.namespace("kv").admission_policy) == ("prefix", "prefix")
    assert cfg.namespace("k2").admission_policy == "all"
    assert cfg.namespace("other").admission_policy == "all"
    with pytest.raises(tierd.ConfigError, match="admission"):
        tierd.load_config({"namespaces": {"kv": {"admission": "ghost"}}})


def test_simulate_command_runs_prefix_admission(tmp_path: Path) -> None:
    path = tmp_path / "serving.jsonl"
    traces.write(path, traces.serving(requests=600, seed=5))
    res = subprocess.run([sys.executable, "-m", "tierd", "simulate", str(path), "--policy", "lru,prefix+prefix",
                          "--tiers", "host=64MiB,nvme=64GiB"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "prefix+prefix" in res.stdout and "prefill saved" in res.stdout
    bad = subprocess.run([sys.executable, "-m", "tierd", "simulate", str(path), "--policy", "lru+ghost"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown admission 'ghost'" in bad.stderr


def test_engine_admits_everything_while_host_has_room(nvme_dir: Path) -> None:
    """Admission filters only a full tier: under the low watermark even one-shot documents stay in host."""
    cfg = small_config(nvme_dir, host="64MiB", namespaces={"kv": {"access": "prefix"}})
    rng = random.Random(3)
    with tierd.open(cfg) as store:
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=32, dtype=torch.float32)
        system = [rng.randrange(1000) for _ in range(32)]
        docs = [system + [rng.randrange(1000) for _ in range(4 * 32)] for _ in range(80)]  # 20 MiB in all
        for d, tokens in enumerate(docs):
            kv.get(tokens)
            kv.put(tokens, _kv(len(tokens), d))
        assert {t for tokens in docs for t in _where(store, kv, tokens)} == {"host"}
        assert store.stats()["nvme"].demoted_bytes == 0


def test_eviction_never_sorts_and_cuts_tails_when_leaves_are_skipped() -> None:
    hints = PrefixHints()
    policy = PrefixPolicy(hints)
    for c in range(3):
        chain = [f"c{c}/{i}" for i in range(50)]
        hints.declare(chain)
        for key in chain:
            policy.on_insert(key, "host", MIB, 0.0)
    leaves = {f"c{c}/49" for c in range(3)}
    offered = []
    for key in policy.victims("host", MIB, 0.0):  # a caller that skips everything (all being read)
        offered.append(key)
        if len(offered) == 9:
            break
    assert set(offered[:3]) == leaves  # the leaves first
    assert set(offered[3:6]) == {f"c{c}/48" for c in range(3)}  # then the next tail up, never a head
    assert set(offered[6:9]) == {f"c{c}/47" for c in range(3)}


def test_a_daemon_client_that_only_declares_never_blocks(daemon: Any) -> None:
    """Declarations are not waited for, but their replies are read before too many pile up: a
    client that only declares (a sweeper finishing sessions) would otherwise fill the socket both
    ways until neither side reads."""
    with tierd.connect(daemon.socket) as store:
        def sweep() -> None:
            for i in range(3000):
                store.declare_prefix([f"kv/s/{i}", f"kv/t/{i}"], done=True)

        sweeper = threading.Thread(target=sweep, daemon=True)
        sweeper.start()
        sweeper.join(timeout=60)
        assert not sweeper.is_alive(), "declare_prefix blocked"
        assert not store.exists("kv/s/0")  # and the connection still answers
        assert len(store._calls) == 0


def test_a_daemon_client_stops_declaring_where_no_hints_are_kept(daemon: Any) -> None:
    with tierd.connect(daemon.socket) as store:  # the daemon's default config: lru everywhere
        kv = tierd.PrefixKVStore(store, model="m", namespace="other", block_tokens=32, dtype=torch.float32)
        kv.put(list(range(64)), _kv(64, 0))  # declares the chain: the daemon answers that it keeps no hints
        assert "other" in store._unhinted  # so the next puts skip that message
        store.declare_prefix(["plain/a", "plain/b"])  # sent, not waited for: its answer comes with the next call's
        assert "plain" not in store._unhinted
        assert not store.exists("plain/a")
        assert "plain" in store._unhinted
        kv.put(list(range(96)), _kv(96, 0))
        assert store.exists_many(kv.block_keys(list(range(96)))) == [True, True, True]
        with pytest.raises(tierd.InvalidArgument):
            store.declare_prefix(["other/a", "other/a"])  # still validated when skipped


def test_status_shows_what_prefix_admission_learned(nvme_dir: Path) -> None:
    with _store("daemon", nvme_dir, "2MiB", {"kv": {"access": "prefix"}}) as store:
        assert isinstance(store, tierd.RemoteStore)
        kv = tierd.PrefixKVStore(store, model="m", block_tokens=32, dtype=torch.float32)
        for d in range(40):  # one-shot documents, more than host holds: admission has to decide
            kv.put(list(range(d * 1000, d * 1000 + 128)), _kv(128, d))
        store.put("plain/x", torch.ones(4))
        status = store.status()
        kvp = status["policies"]["kv"]
        assert (kvp["policy"], kvp["admission"]) == ("prefix", "prefix")
        assert kvp["hinted_blocks"] >= 40 * 4
        assert sum(r["admitted"] + r["refused"] for r in kvp["admission_table"]) == 40 * 4
        assert abs(sum(kvp["experts"].values()) - 1) < 1e-6
        assert status["policies"]["plain"]["policy"] == "lru" and not status["policies"]["plain"]["admission_table"]
        sock = store.socket_path
        res = subprocess.run([sys.executable, "-m", "tierd", "status", "--socket", sock], capture_output=True,
                             text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "admission to host in kv" in res.stdout and "fresh" in res.stdout, res.stdout
