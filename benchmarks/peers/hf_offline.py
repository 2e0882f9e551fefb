#!/usr/bin/env python3
"""Offline throughput of transformers' `generate` (greedy, static batch), run with its own venv:

    /work/peers/hf/bin/python benchmarks/peers/hf_offline.py --model /work/peers/smollm2-hf --dtype float32

All prompts of a case have the same length, so the batch needs no padding.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, run_cases


def main() -> None:
    ap = parser(__doc__)
    args = ap.parse_args()
    if args.max_num_batched_tokens:
        ap.error("transformers runs whole batches: it has no token budget")
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    load_s = time.perf_counter() - start

    @torch.inference_mode()
    def generate(prompts: list[list[int]], output_len: int) -> list[int]:
        ids = torch.tensor(prompts)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=output_len,
                             min_new_tokens=output_len, pad_token_id=model.config.eos_token_id)
        return [out.shape[1] - ids.shape[1]] * len(prompts)

    run_cases(args, "transformers", generate, {"load_s": load_s})


if __name__ == "__main__":
    main()
