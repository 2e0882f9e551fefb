#!/usr/bin/env python3
"""Offline throughput of pacer; same flags and JSON as the peer runners beside it.

    .venv/bin/python benchmarks/peers/pacer_offline.py --dtype float32 --cases 32x128x128 --repeats 3
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, run_cases

from pacer import LLM, SamplingParams


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--scheduler", default="sarathi")
    ap.add_argument("--quantization", default="auto", help="pacer's --quantization (auto: the GGUF's own blocks)")
    ap.add_argument("--int8-activations", action="store_true", help="pacer's --int8-activations")
    args = ap.parse_args()
    start = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, threads=args.threads, scheduler=args.scheduler,
              max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_memory="2GiB",
              quantization=args.quantization, int8_activations=args.int8_activations,
              prefix_caching=False)  # the same prompts are timed repeatedly: engine speed, not cache hits
    load_s = time.perf_counter() - start

    def generate(prompts: list[list[int]], output_len: int) -> list[int]:
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        return [len(r.token_ids) for r in llm.generate(prompts, params, use_tqdm=False)]

    run_cases(args, "pacer", generate, {"load_s": load_s, "scheduler": args.scheduler,
                                        "token_budget": llm.engine.scheduler.token_budget,
                                        "quantization": llm.engine.executor.quantization,
                                        "weight_bytes": llm.engine.executor.weight_bytes})


if __name__ == "__main__":
    main()
