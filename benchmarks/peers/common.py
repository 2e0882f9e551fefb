"""What every offline runner shares (stdlib only: each runs in its own engine's venv)."""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable


def parser(doc: str, default_dtype: str = "float32") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (pacer: default SmolLM2 GGUF; peers: an HF export)")
    ap.add_argument("--dtype", default=default_dtype, choices=["bfloat16", "float32"])
    ap.add_argument("--cases", default="1x128x128,8x128x128,32x128x128,1x512x1",
                    help="NxPxO: N requests of P random prompt tokens, O output tokens (O=1: prefill)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="token budget per iteration (decodes count); default: the engine's own")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    ap.add_argument("--json", help="write the results here")
    return ap


def make_prompts(n: int, prompt_len: int, seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    """The same token ids in every runner (ids below 100 hold SmolLM2's special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(n)]


def run_cases(args: argparse.Namespace, engine: str, generate: Callable[[list[list[int]], int], list[int]],
              extra: dict) -> list[dict]:
    """generate(prompts, output_len) -> output token counts. Warm up each case, then time it."""
    results = []
    for case in args.cases.split(","):
        n, p, o = map(int, case.split("x"))
        generate(make_prompts(n, p, seed=1), min(o, 4))  # warm-up on other prompts of the same shape
        prompts, times = make_prompts(n, p), []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            counts = generate(prompts, o)
            times.append(time.perf_counter() - t0)
            assert counts == [o] * n, f"{engine}: expected {o} tokens per request, got {sorted(set(counts))}"
        elapsed = statistics.median(times)
        results.append({"engine": engine, "dtype": args.dtype, "case": case, "elapsed_s": elapsed,
                        "elapsed_all_s": times, "output_tok_s": n * o / elapsed,
                        "prefill_tok_s": n * p / elapsed if o == 1 else None, "threads": args.threads, **extra})
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results
