#!/usr/bin/env python3
"""Which weight-only kernel to build quantized linear layers on: PyTorch's own CPU kernels and pacer's against fp32
`F.linear`, at the default model's shapes and the batch sizes that matter (M = 1, 8, 32 decode rows, 512 prefill).

    .venv/bin/python benchmarks/quant_micro.py [--threads 2] [--repeats 3] [--out benchmarks/out/quant_micro.json]

Per shape and M: the median time of each kernel, and for M = 1 the weight bytes it streams over that time (GB/s),
beside this machine's memory bandwidth measured by a torch triad on the same threads. Kernels measured:
- fp32: `F.linear` on dequantized weights (pacer today);
- int8: `aten._weight_int8pack_mm` (int8 weights, one scale per output channel);
- int4-g32: `aten._weight_int4pack_mm_for_cpu` (4-bit weights in groups of 32 with a scale and a zero point each:
  the layout Q4_1's blocks map onto);
- pacer-q4_1, pacer-q4_1-a8: pacer's kernel on GGUF Q4_1 blocks, fp32 or int8 activations (quant_cpu.cpp).
Each kernel cycles through copies of its weights (--cold-mb in all), so every call reads them from memory as a
decode step does, not from a cache that one layer's weights fit in.
Not measured: `aten._dyn_quant_matmul_4bit` packs for KleidiAI (Arm) only; elsewhere its "packed" weight is the float
weights and scales side by side (torch/_meta_registrations.py), a reference path. A kernel this torch build cannot
run on this CPU is reported as such, not skipped silently.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from pacer.model import cpu_kernels
from pacer.model.quant import QuantizedLinear, QuantizedTensor

# (in features, out features) of SmolLM2-135M's linear layers: q/o, k/v, gate/up, down, and the tied LM head
SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
ROWS = [1, 8, 32, 512]
GROUP = 32


def timed(fn: Callable[[], torch.Tensor], repeats: int, min_s: float = 0.2) -> float:
    """Median seconds per call over `repeats` rounds of as many calls as fill `min_s`."""
    fn()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_s / 4:
        fn()
        calls += 1
    per_round = max(1, calls * 4)
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_round):
            fn()
        rounds.append((time.perf_counter() - start) / per_round)
    return statistics.median(rounds)


def triad_gb_s(repeats: int) -> float:
    """a = b + s * c over 3 x 64 MiB fp32 arrays: bytes moved (read b, c; write a) over time."""
    n = 16 << 20
    a, b, c = torch.empty(n), torch.rand(n), torch.rand(n)
    seconds = timed(lambda: torch.add(b, c, alpha=1.5, out=a), repeats)
    return 3 * 4 * n / seconds / 1e9


Kernel = tuple[tuple[torch.Tensor, ...], Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor], int]


def kernels(k: int, n: int) -> dict[str, Kernel]:
    """name -> (its weight tensors, (x, weights) -> x @ W.T in that kernel, weight bytes it reads)."""
    weight = torch.randn(n, k) * 0.05
    out: dict[str, Kernel] = {"fp32": ((weight,), lambda x, w: F.linear(x, w[0]), weight.numel() * 4)}

    scales8 = weight.abs().amax(dim=1) / 127
    int8 = torch.clamp(torch.round(weight / scales8[:, None]), -128, 127).to(torch.int8)
    out["int8"] = ((int8, scales8), lambda x, w: torch.ops.aten._weight_int8pack_mm(x, *w), int8.numel() + n * 4)

    groups = weight.reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(dim=2), groups.amax(dim=2)
    scale = ((high - low) / 15).clamp(min=1e-8)
    q = torch.clamp(torch.round((groups - low[..., None]) / scale[..., None]), 0, 15).to(torch.int32).reshape(n, k)
    # torch's int4 layout dequantizes (q - 8) x scale + zero, so Q4_1's d x q + m is scale d, zero m + 8d
    scales_zeros = torch.stack([scale, low + 8 * scale], dim=2).transpose(0, 1).contiguous()  # [k / 32, n, 2]
    packed4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # int32 values 0..15, [n, k]
    out["int4-g32"] = ((packed4, scales_zeros),
                       lambda x, w: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w[0], GROUP, w[1]),
                       n * k // 2 + scales_zeros.numel() * 4)

    ops = cpu_kernels.quant_ops()
    if ops is not None:  # pacer's own (pacer/model/quant_cpu.cpp), on GGUF Q4_1 blocks as the default model's
        blocks = QuantizedTensor.quantize(weight, GGMLQuantizationType.Q4_1).blocks
        gemm_from = QuantizedLinear.GEMM_FROM
        out["pacer-q4_1"] = ((blocks,), lambda x, w: ops.linear(x, w[0], 3, gemm_from, False), blocks.numel())
        if ops.int8_activations():
            out["pacer-q4_1-a8"] = ((blocks,), lambda x, w: ops.linear(x, w[0], 3, gemm_from, True), blocks.numel())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/quant_micro.json"))
    parser.add_argument("--cold-mb", type=int, default=256, help="weight copies cycled per kernel, in MiB")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bandwidth = triad_gb_s(args.repeats)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads; "
          f"triad bandwidth {bandwidth:.1f} GB/s")
    rows = []
    for k, n in SHAPES:
        for name, (weights, fn, weight_bytes) in kernels(k, n).items():
            # Copies enough to outgrow the caches: each call reads its weights from memory, as a decode step does.
            copies = [tuple(t.clone() for t in weights) for _ in range(-(-args.cold_mb * 2**20 // weight_bytes))]
            turn = itertools.cycle(copies)
            for m in ROWS:
                x = torch.randn(m, k)
                try:
                    seconds = timed(lambda fn=fn, x=x, turn=turn: fn(x, next(turn)), args.repeats)
                except RuntimeError as error:  # not built for this CPU: said, not hidden
                    rows.append({"shape": [k, n], "kernel": name, "m": m, "error": str(error).splitlines()[0]})
                    print(f"{k}x{n} {name:13s} M={m:4d}: {str(error).splitlines()[0][:80]}")
                    break
                row = {"shape": [k, n], "kernel": name, "m": m, "us": seconds * 1e6,
                       "weight_gb_s": weight_bytes / seconds / 1e9}
                rows.append(row)
                print(f"{k}x{n} {name:13s} M={m:4d}: {seconds * 1e6:9.1f} us"
                      + (f"  {row['weight_gb_s']:6.1f} GB/s of weights" if m == 1 else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "triad_gb_s": bandwidth, "cpu":
                                    torch.backends.cpu.get_cpu_capability(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
