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
  multi-turn sessions extending their own prefix after their users' think
  times (quick and slow users, bursts), and a long tail of one-shot documents.

Prefix-cache traces give each event its ``parent``: the block before it in
its request.
"""

from __future__ import annotations

import argparse
import heapq
import math
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
        parent = ""  # each block's parent is the one before it (what PrefixKVStore declares)
        for key in blocks:
            self.t += BLOCK_S
            if key in self.stored:
                yield TraceEvent(self.t, "get", key, self.block_size, "host", parent)
            else:
                self.stored.add(key)
                yield TraceEvent(self.t, "put", key, self.block_size, "host", parent)
            parent = key


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


def serving(*, requests: int = 12000, system_prompts: int = 16, system_blocks: int = 1, rate: float = 1.0,
            session_share: float = 0.45, first_turn_blocks: tuple[int, int] = (4, 16), turn_blocks: tuple[int, int] = (1, 4),
            document_blocks: tuple[int, int] = (16, 48), end_p: float = 0.35, end_spread: float = 0.0,
            think_s: float = 900.0,
            think_sigma: float = 0.4, user_sigma: float = 1.2, burst_p: float = 0.05, burst_turns: tuple[int, int] = (2, 5),
            closed_share: float = 0.0, block_size: int = MIB, seed: int = 0,
            users: dict[str, float] | None = None) -> Iterator[TraceEvent]:
    """A serving engine's prefix cache under multi-turn chat and one-shot documents, block by block.

    New requests arrive at ``rate`` a second (Poisson). Each starts with one
    of ``system_prompts`` shared system prompts (Zipf-popular,
    ``system_blocks`` blocks each). A new request is either

    * the first turn of a session (``session_share``): ``first_turn_blocks``
      blocks of its own. After each turn the session ends with ``end_p``
      (with ``end_spread`` > 0, each session's own probability, drawn from a
      Beta distribution around ``end_p`` with concentration ``1 / end_spread``:
      some users stay long, some leave at once); otherwise its user comes
      back after a think time, lognormal around the user's own median
      (``think_s`` times a lognormal of ``user_sigma`` across users: some
      users and agents are quick, some slow) with ``think_sigma`` from turn
      to turn. The next turn reads the whole
      history (its own prefix, which only it has) and appends ``turn_blocks``.
      A burst (``burst_p``) is a few turns a second apart (a tool loop);
    * or a one-shot document: a long unique context, stored and never read
      again (the long tail that floods a recency cache).

    A block is a ``put`` the first time it is seen and a ``get`` after; its
    ``parent`` is the block before it in its request (what ``PrefixKVStore``
    declares). The defaults were set so that the trace resembles a real
    multi-turn production trace in what issue 20 reports of it, with the
    fast tier at 2 % of the distinct blocks: about 1.5 events per distinct
    block, LRU ~0.3 of gets hit, S3-FIFO a little better, GDSF close to LRU,
    Belady ~0.88.

    ``closed_share``: the share of conversations whose client says when they
    are over (an agent's finished task, a closed chat, a one-shot batch
    request): a ``done`` event on the last block of the request right after
    a session's last turn or a document's only one
    (``Store.declare_prefix(keys, done=True)``, ``PrefixKVStore.finish``).

    ``users``, if given, is filled with what no cache can see: each session's
    user's median think time in seconds, by the session's key prefix (``kv/u7``).
    """
    rng = random.Random(seed)
    prompt_weights = [1 / (i + 1) for i in range(system_prompts)]
    request = _PrefixCache(block_size).request
    # Sessions waiting for their next turn: (when, tiebreak, session, prompt, history, burst turns left).
    waiting: list[tuple[float, int, int, int, list[str], int]] = []
    scale: dict[int, float] = {}  # session -> its user's median think time
    leave: dict[int, float] = {}  # session -> its chance to end after a turn
    t = 0.0
    next_id = done = 0

    def system(prompt: int) -> list[str]:
        return [f"kv/s{prompt}/b{b}" for b in range(system_blocks)]

    while done < requests:
        arrival = t + rng.expovariate(rate)
        if waiting and waiting[0][0] <= arrival:
            t, _, sid, prompt, history, burst = heapq.heappop(waiting)
            history.extend(f"kv/u{sid}/b{b}" for b in range(len(history), len(history) + rng.randint(*turn_blocks)))
        else:
            t = arrival
            prompt = rng.choices(range(system_prompts), prompt_weights)[0]
            sid = next_id
            next_id += 1
            if rng.random() >= session_share:
                n = rng.randint(*document_blocks)
                yield from request(system(prompt) + [f"kv/d{sid}/b{b}" for b in range(n)])
                if closed_share and rng.random() < closed_share:
                    yield TraceEvent(t, "done", f"kv/d{sid}/b{n - 1}", block_size, "host")
                done += 1
                continue
            history = [f"kv/u{sid}/b{b}" for b in range(rng.randint(*first_turn_blocks))]
            burst = 0
            scale[sid] = think_s * rng.lognormvariate(0, user_sigma)
            leave[sid] = (rng.betavariate(end_p / end_spread, (1 - end_p) / end_spread) if end_spread and 0 < end_p < 1
                          else end_p)
            if users is not None:
                users[f"kv/u{sid}"] = scale[sid]
        yield from request(system(prompt) + history)
        done += 1
        if burst > 0:
            wait = rng.expovariate(1.0)
        elif rng.random() >= leave[sid]:
            burst = rng.randint(*burst_turns) - 1 if rng.random() < burst_p else 0
            wait = rng.lognormvariate(math.log(scale[sid]), think_sigma)
        else:
            del scale[sid], leave[sid]
            if closed_share and rng.random() < closed_share:
                yield TraceEvent(t, "done", history[-1], block_size, "host")
            continue
        next_id += 1
        heapq.heappush(waiting, (t + wait, next_id, sid, prompt, history, burst - 1 if burst > 0 else 0))


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
