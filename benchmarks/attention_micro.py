"""Micro-benchmark of pacer's paged attention on SmolLM2-135M shapes (30 layers, 9 q / 3 kv heads,
head 64): the C++ paged decode kernel vs dense grouped-matmul attention and the gather reference,
and SDPA GQA variants for prefill. Prints ms per step (30 layers' worth of calls).

    python -m benchmarks.attention_micro [decode] [prefill] [--threads 1,2] [--fp32] [--min]   (repo root)

"cold": 30 distinct layer caches, as in a real step (KV streams from DRAM). "hot": one layer's
cache reused 30 times (KV stays in the 48 MB L3).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
import torch.nn.functional as F

from pacer.model import attention as A
from pacer.model import cpu_kernels as K

L, H, KV, HD = 30, 9, 3, 64
SCALE = HD**-0.5
USE_MIN = False


def median_ms(fn, reps: int = 9) -> float:
    """Median wall time; the minimum instead with --min (less sensitive to a busy machine)."""
    fn()
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return (min(times) if USE_MIN else statistics.median(times)) * 1e3


def decode_case(B: int, ctx: int, block_size: int, dtype: torch.dtype, layers: int) -> dict[str, float]:
    nblk = -(-ctx // block_size)
    num_blocks = B * nblk + 8
    cache = A.allocate_kv_cache(layers, num_blocks, block_size, KV, HD, dtype, "cpu")
    for t in cache.k + cache.v:
        t.normal_()
    perm = torch.randperm(num_blocks).tolist()
    tables = [perm[i * nblk:(i + 1) * nblk] for i in range(B)]
    meta = A.AttentionMetadata.build(block_size, decode=[(t, ctx) for t in tables])
    q = torch.randn(B, H, HD).to(dtype)
    k = torch.randn(B, KV, HD).to(dtype)
    v = torch.randn(B, KV, HD).to(dtype)
    ops = K.attention_ops()
    out = torch.empty_like(q)
    lay = [i % layers for i in range(L)]

    def kernel_full():  # what the model calls: write + decode
        for i in lay:
            A.paged_attention(q, k, v, cache, i, meta, SCALE)

    def kernel_decode():
        for i in lay:
            ops.decode(q, cache.k[i], cache.v[i], meta.decode_block_tables, meta.decode_context_lens, SCALE, out)

    def reference():
        for i in lay:
            A.paged_attention_reference(q, k, v, cache, i, meta, SCALE)

    dense_k = [torch.randn(B, KV, ctx, HD).to(dtype) for _ in range(layers)]
    dense_v = [torch.randn(B, KV, ctx, HD).to(dtype) for _ in range(layers)]
    qg = q.view(B, KV, H // KV, HD)

    def dense():  # perf/README's grouped matmul on a dense cache
        for i in lay:
            s = (qg @ dense_k[i].transpose(-1, -2)) * SCALE
            torch.softmax(s.float(), -1).to(dtype) @ dense_v[i]

    res = {"kernel": median_ms(kernel_full), "kernel decode only": median_ms(kernel_decode), "dense": median_ms(dense)}
    if B * ctx <= 32 * 192:
        res["gather ref"] = median_ms(reference, reps=3)
    return res


def run_decode(dtype: torch.dtype) -> None:
    print(f"decode, {str(dtype)[6:]}, block 16, {L} layers, ms/step")
    for B, ctx in ((1, 192), (8, 192), (32, 192), (32, 1024), (1, 2048)):
        for mode, layers in (("cold", L), ("hot", 1)):
            r = decode_case(B, ctx, 16, dtype, layers)
            cells = "  ".join(f"{k} {v:6.2f}" for k, v in r.items())
            print(f"  B={B:2d} ctx={ctx:4d} {mode}: {cells}", flush=True)


def prefill_case(n: int, past: int, dtype: torch.dtype) -> dict[str, float]:
    """ms per chunk of `n` tokens after `past` cached ones, over L layers, for each way to compute it."""
    q = torch.randn(H, n, HD).to(dtype)
    k = torch.randn(KV, past + n, HD).to(dtype)
    v = torch.randn(KV, past + n, HD).to(dtype)
    mask = torch.ones(n, past + n, dtype=torch.bool).tril(past) if past else None
    kw = {"attn_mask": mask, "is_causal": mask is None, "scale": SCALE}
    bs = 16
    nblk = -(-(past + n) // bs)
    cache = A.allocate_kv_cache(1, nblk + 4, bs, KV, HD, dtype, "cpu")
    for t in cache.k + cache.v:
        t.normal_()
    meta = A.AttentionMetadata.build(bs, prefill=[(torch.randperm(nblk + 4)[:nblk].tolist(), past, n)])
    qt, kt, vt = q.transpose(0, 1), k[:, past:].transpose(0, 1), v[:, past:].transpose(0, 1)
    variants = {
        "3d repeat": lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(3, 0), v.repeat_interleave(3, 0), **kw),
        "4d repeat": lambda: F.scaled_dot_product_attention(
            q[None], k.repeat_interleave(3, 0)[None], v.repeat_interleave(3, 0)[None], **kw),
        "4d enable_gqa": lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True, **kw),
        "pacer paged_attention": lambda: A.paged_attention(qt, kt, vt, cache, 0, meta, SCALE),
    }
    return {name: median_ms(functools.partial(repeat, f, L), 3) for name, f in variants.items()}


def repeat(f, times: int) -> None:
    for _ in range(times):
        f()


def run_prefill() -> None:
    print(f"prefill attention per chunk, {L} layers, ms: SDPA variants on dense k/v, and pacer's paged path")
    for dtype in (torch.bfloat16, torch.float32):
        for n, past in ((128, 0), (512, 0), (512, 1536)):
            ms = prefill_case(n, past, dtype)
            cells = "  ".join(f"{name} {t:7.1f}" for name, t in ms.items())
            print(f"  {str(dtype)[6:]:8s} chunk {n:3d} past {past:4d}: {cells}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", nargs="*", default=["decode", "prefill"])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts to run")
    parser.add_argument("--fp32", action="store_true", help="decode in fp32 too")
    parser.add_argument("--min", action="store_true", help="report the fastest run, not the median")
    args = parser.parse_args()
    global USE_MIN
    USE_MIN = args.min
    start = time.perf_counter()
    if K.attention_ops() is None:
        raise SystemExit("C++ kernel unavailable")
    print(f"kernel load (build if not cached): {time.perf_counter() - start:.1f} s")
    with torch.inference_mode():
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            print(f"== {threads} thread(s)")
            if "decode" in args.what:
                run_decode(torch.bfloat16)
                if args.fp32:
                    run_decode(torch.float32)
            if "prefill" in args.what:
                run_prefill()


if __name__ == "__main__":
    main()
