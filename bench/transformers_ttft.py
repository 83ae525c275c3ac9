"""Time to first token of a 1024-token prompt with TierdCache: a stored 960-token prefix vs none.

    python bench/transformers_ttft.py [--quick] [--reps N] [--out PATH]

A small Llama built from its config (4 layers, hidden 256, 4 KV heads of 64, float32, random
weights, no download) on the CPU. Time to first token is ``generate(max_new_tokens=1)`` of a
1024-token prompt, cache construction included (the prefix lookup and load):

* transformers' default ``DynamicCache``;
* ``TierdCache`` with nothing stored (a new salt each run: it computes and stores all 1024);
* ``TierdCache`` with the 960-token prefix stored (a new 64-token suffix each run: it loads 960,
  computes 64 and stores those 4 blocks);

each with offload off and on. Medians of ``--reps`` runs after one warm-up; the first tokens
are checked to match the default cache's. Writes ``bench/results/transformers_ttft.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import tierd
from tierd.integrations.transformers import TierdCache, model_fingerprint

PROMPT, PREFIX, BLOCK, VOCAB = 1024, 960, 16, 1024
MODEL = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 2048}


def median_ms(fn: Callable[[int], Callable[[], None] | None], reps: int) -> float:
    """Median milliseconds of ``fn(rep)`` over ``reps`` runs after a warm-up (rep -1); what it
    returns is called after each run, off the clock."""
    times = []
    for rep in range(-1, reps):
        t0 = time.perf_counter()
        after = fn(rep)
        if rep >= 0:
            times.append(time.perf_counter() - t0)
        if after is not None:
            after()
    return statistics.median(times) * 1e3


def measure(reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, pad_token_id=0)).eval()
    model_id = model_fingerprint(model)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(1, VOCAB, (PREFIX,), generator=g)
    suffixes = [torch.randint(1, VOCAB, (PROMPT - PREFIX,), generator=g) for _ in range(reps + 1)]

    def ids(rep: int) -> torch.Tensor:
        return torch.cat([prefix, suffixes[rep]])[None]

    def first_token(out: torch.Tensor) -> int:
        return int(out[0, -1])

    expected = {rep: first_token(model.generate(ids(rep), max_new_tokens=1, do_sample=False))
                for rep in range(-1, reps)}
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as nvme:
        config = {"tiers": {"host": {"size": "1GiB"}, "nvme": {"path": nvme, "size": "1GiB"}}}
        with tierd.open(config) as store:
            with TierdCache(store, model, prompt=ids(0), model_id=model_id, salt="shared", block_tokens=BLOCK,
                            offload=False) as cache:
                model.generate(ids(0), cache=cache, max_new_tokens=1, do_sample=False)
            # Later runs use other suffixes: only the 960-token prefix is found.
            suffixes[0] = torch.randint(1, VOCAB, (PROMPT - PREFIX,), generator=g)
            expected[0] = first_token(model.generate(ids(0), max_new_tokens=1, do_sample=False))

            def default(rep: int) -> None:
                out = model.generate(ids(rep), cache=DynamicCache(config=model.config), max_new_tokens=1,
                                     do_sample=False)
                check(out, rep, 0)

            def tierd_run(offload: bool, reuse: bool) -> Callable[[int], Callable[[], None]]:
                salts = iter(range(1 << 30))

                def run(rep: int) -> Callable[[], None]:
                    salt = "shared" if reuse else f"fresh-{offload}-{next(salts)}"
                    cache = TierdCache(store, model, prompt=ids(rep), model_id=model_id, salt=salt,
                                       block_tokens=BLOCK, offload=offload)
                    out = model.generate(ids(rep), cache=cache, max_new_tokens=1, do_sample=False)
                    check(out, rep, cache.reused_tokens)

                    def cleanup() -> None:
                        cache.close()
                        # Only the shared prefix stays stored: the next variant's runs find 960 again.
                        store.delete_many(cache.prefix.block_keys(ids(rep))[PREFIX // BLOCK if reuse else 0:])

                    return cleanup

                return run

            def check(out: torch.Tensor, rep: int, reused: int) -> None:
                if first_token(out) != expected[rep]:
                    raise RuntimeError(f"first token {first_token(out)} differs from the default cache's "
                                       f"{expected[rep]} (rep {rep}, {reused} reused)")
                if reused not in (0, PREFIX):
                    raise RuntimeError(f"reused {reused} tokens, expected 0 or {PREFIX}")

            variants: list[tuple[str, int, Callable[[int], Any]]] = [("transformers DynamicCache", 0, default)]
            for offload in (False, True):
                for reuse in (False, True):
                    name = f"TierdCache offload={'on' if offload else 'off'}, " + (
                        f"{PREFIX} stored" if reuse else "nothing stored")
                    variants.append((name, PREFIX if reuse else 0, tierd_run(offload, reuse)))
            for name, reused, fn in variants:
                rows.append({"variant": name, "reused_tokens": reused, "computed_tokens": PROMPT - reused,
                             "ttft_ms": median_ms(fn, reps)})
    base = rows[0]["ttft_ms"]
    for row in rows:
        row["vs_default"] = row["ttft_ms"] / base
    return {"prompt_tokens": PROMPT, "prefix_tokens": PREFIX, "block_tokens": BLOCK, "reps": reps, "model": MODEL,
            "dtype": "float32", "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "rows": rows}


def table(res: dict[str, Any]) -> str:
    lines = [f"Time to first token, {res['prompt_tokens']}-token prompt, Llama {res['model']['num_hidden_layers']} "
             f"layers x hidden {res['model']['hidden_size']} ({res['dtype']}, {res['torch_threads']} CPU threads), "
             f"median of {res['reps']}:", "",
             "| variant | reused | computed | TTFT ms | vs DynamicCache |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['reused_tokens']} | {r['computed_tokens']} | {r['ttft_ms']:.1f} | "
                     f"{r['vs_default']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 runs per variant instead of 9")
    parser.add_argument("--reps", type=int, default=None, help="runs per variant (overrides --quick)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "transformers_ttft.json")
    args = parser.parse_args(argv)
    res = measure(args.reps or (3 if args.quick else 9))
    print(table(res))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
