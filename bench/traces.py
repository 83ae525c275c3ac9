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


def kv(*, prefixes: int = 400, requests: int = 6000, blocks: int = 8, block_size: int = 2 * MIB,
       zipf_s: float = 1.1, turns: int = 3, seed: int = 0) -> Iterator[TraceEvent]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** zipf_s for i in range(prefixes)]
    t = 0.0
    stored: set[str] = set()
    conversations = 0
    for _ in range(requests):
        p = rng.choices(range(prefixes), weights)[0]
        chain = [f"kv/p{p}/b{b}" for b in range(blocks)]
        conversations += 1
        for turn in range(rng.randint(1, turns)):
            for key in chain:
                t += BLOCK_S
                if key in stored:
                    yield TraceEvent(t, "get", key, block_size, "host")
                else:
                    stored.add(key)
                    yield TraceEvent(t, "put", key, block_size, "host")
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


WORKLOADS = {"activations": activations, "optimizer": optimizer, "kv": kv, "checkpoint": checkpoint}


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
