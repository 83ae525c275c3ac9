"""Access-trace generators for the policy simulator (``tierd simulate``).

    python bench/traces.py OUT_DIR [--seed 0]

writes one JSON-lines trace per workload (fields t, op, key, size, tier):

* ``activations``: training activations: forward puts layer 0..L-1, backward
  gets L-1..0 and frees them; the same every step.
* ``optimizer``: optimizer states, cyclic over parameters: each step reads
  and writes back m and v of every parameter, in the same order.
* ``kv``: KV-cache prefixes: requests pick a shared prefix by Zipf
  popularity; multi-turn conversations read their earlier blocks and add new ones.
* ``checkpoint``: bursts of large checkpoint shards every few steps over a
  background of optimizer traffic.
* ``serving``: a serving engine's prefix cache: shared system prompts,
  interleaved multi-turn sessions extending their own prefix (with bursts),
  and a long tail of one-shot documents.
"""

from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tierd.policies.simulator import TraceEvent  # noqa: E402

MIB = 1 << 20


# Seconds of compute between accesses: what a prefetch has to hide behind.
LAYER_S = 0.004
PARAM_S = 0.001
BLOCK_S = 0.002


def activations(*, layers: int = 32, steps: int = 20, size: int = 8 * MIB) -> Iterator[TraceEvent]:
    t = 0.0
    for _ in range(steps):
        for i in range(layers):
            t += LAYER_S
            yield TraceEvent(t, "put", f"acts/l{i}", size, "host")
        for i in reversed(range(layers)):
            t += 2 * LAYER_S  # backward costs about twice forward
            yield TraceEvent(t, "get", f"acts/l{i}", size, "host")
            yield TraceEvent(t, "delete", f"acts/l{i}", size, "host")


def optimizer(*, params: int = 120, steps: int = 20, seed: int = 0) -> Iterator[TraceEvent]:
    rng = random.Random(seed)
    sizes = [rng.choice([1, 2, 4, 8, 16]) * MIB for _ in range(params)]
    t = 0.0
    for _ in range(steps):
        for p in range(params):
            for state in ("m", "v"):
                t += PARAM_S
                yield TraceEvent(t, "get", f"opt/p{p}.{state}", sizes[p], "host")
            for state in ("m", "v"):
                t += PARAM_S
                yield TraceEvent(t, "put", f"opt/p{p}.{state}", sizes[p], "host")


class _PrefixCache:
    """What a prefix cache sees of requests: a block is a put the first time, a get after."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.t = 0.0
        self.stored: set[str] = set()

    def request(self, blocks: list[str]) -> Iterator[TraceEvent]:
        for key in blocks:
            self.t += BLOCK_S
            if key in self.stored:
                yield TraceEvent(self.t, "get", key, self.block_size, "host")
            else:
                self.stored.add(key)
                yield TraceEvent(self.t, "put", key, self.block_size, "host")


def kv(*, prefixes: int = 400, requests: int = 6000, blocks: int = 8, block_size: int = 2 * MIB,
       zipf_s: float = 1.1, turns: int = 3, seed: int = 0) -> Iterator[TraceEvent]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** zipf_s for i in range(prefixes)]
    cache = _PrefixCache(block_size)
    conversations = 0
    for _ in range(requests):
        p = rng.choices(range(prefixes), weights)[0]
        chain = [f"kv/p{p}/b{b}" for b in range(blocks)]
        conversations += 1
        for turn in range(rng.randint(1, turns)):
            yield from cache.request(chain)
            # The turn's answer extends this conversation's private suffix.
            chain = chain + [f"kv/c{conversations}/t{turn}/b{b}" for b in range(2)]


def checkpoint(*, params: int = 60, steps: int = 30, every: int = 5, shards: int = 8,
               shard_size: int = 64 * MIB) -> Iterator[TraceEvent]:
    t = 0.0
    for step in range(steps):
        for ev in optimizer(params=params, steps=1):
            t += PARAM_S
            yield TraceEvent(t, ev.op, ev.key, ev.size, ev.tier)
        if step % every == every - 1:
            for s in range(shards):
                t += PARAM_S
                yield TraceEvent(t, "put", f"ckpt/step{step}/shard{s}", shard_size, "nvme")
            for s in range(shards):
                yield TraceEvent(t, "delete", f"ckpt/step{step - every}/shard{s}", shard_size, "nvme")


def serving(*, requests: int = 20000, system_prompts: int = 32, system_blocks: int = 4,
            new_session_p: float = 0.25, document_p: float = 0.45, document_blocks: tuple[int, int] = (8, 48),
            first_turn_blocks: tuple[int, int] = (2, 8), turn_blocks: tuple[int, int] = (1, 3),
            end_p: float = 0.15, active: int = 5000, recency: float = 0.05, burst_p: float = 0.15, burst_turns: tuple[int, int] = (2, 5),
            block_size: int = MIB, seed: int = 0) -> Iterator[TraceEvent]:
    """A serving engine's prefix cache: what each request's blocks do, block by block.

    Every request starts with one of a few system prompts (Zipf-popular,
    ``system_blocks`` blocks each, shared by all). Then either:

    * a turn of a multi-turn session: it reads the session's whole history
      (its own prefix, which only it has) and appends ``turn_blocks`` new
      blocks; sessions start with ``first_turn_blocks``, end after each turn
      with ``end_p``, and interleave: the next turn is of one of the
      ``active`` open sessions, the recently used ones likelier (Pareto on
      recency rank with shape ``recency``: smaller, a longer think time). A burst (``burst_p``) is several turns of one session back to back;
    * a one-shot document (``document_p``): a long unique context, stored
      and never read again (a long tail that floods an LRU).

    A block is a ``put`` the first time it is seen and a ``get`` after, as a
    prefix cache sees them; its key names its prefix (``kv/s<p>/b<i>``,
    ``kv/u<session>/b<i>``, ``kv/d<doc>/b<i>``), so a block's parent is the
    block before it in its request.
    """
    rng = random.Random(seed)
    prompt_weights = [1 / (i + 1) for i in range(system_prompts)]
    request = _PrefixCache(block_size).request
    sessions: list[tuple[int, int, list[str]]] = []  # (session id, system prompt, history), most recent last
    next_id = 0

    def system(prompt: int) -> list[str]:
        return [f"kv/s{prompt}/b{b}" for b in range(system_blocks)]

    done = 0
    while done < requests:
        r = rng.random()
        if r < document_p:
            doc = next_id
            next_id += 1
            prompt = rng.choices(range(system_prompts), prompt_weights)[0]
            n = rng.randint(*document_blocks)
            yield from request(system(prompt) + [f"kv/d{doc}/b{b}" for b in range(n)])
            done += 1
            continue
        if r < document_p + new_session_p or not sessions:
            sid, prompt = next_id, rng.choices(range(system_prompts), prompt_weights)[0]
            next_id += 1
            history = [f"kv/u{sid}/b{b}" for b in range(rng.randint(*first_turn_blocks))]
            sessions.append((sid, prompt, history))
            if len(sessions) > active:
                sessions.pop(0)  # the oldest open session is abandoned
            turns = 1
        else:
            # The recently used are likelier: a user who just got an answer types again soon.
            i = len(sessions) - 1 - min(len(sessions) - 1, int(rng.paretovariate(recency)) - 1)
            sid, prompt, history = sessions.pop(i)
            sessions.append((sid, prompt, history))
            turns = rng.randint(*burst_turns) if rng.random() < burst_p else 1
        for _ in range(turns):
            history.extend(f"kv/u{sid}/b{b}" for b in range(len(history), len(history) + rng.randint(*turn_blocks)))
            yield from request(system(prompt) + history)
            done += 1
            if rng.random() < end_p:
                sessions[:] = [s for s in sessions if s[0] != sid]
                break


WORKLOADS = {"activations": activations, "optimizer": optimizer, "kv": kv, "checkpoint": checkpoint,
             "serving": serving}


def write(path: Path, events: Iterator[TraceEvent]) -> int:
    enc = msgspec.json.Encoder()
    n = 0
    with open(path, "wb") as fh:
        for ev in events:
            fh.write(enc.encode(ev) + b"\n")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, gen in WORKLOADS.items():
        n = write(args.out / f"{name}.jsonl", gen())
        print(f"{args.out / (name + '.jsonl')}: {n} events")
    return 0


if __name__ == "__main__":
    sys.exit(main())
