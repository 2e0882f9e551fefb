#!/usr/bin/env python3
"""How long loading a GGUF takes per megabyte, per block type, against the default model (SmolLM2 Q4_1 + Q8_0).

    .venv/bin/python benchmarks/gguf_load.py [--layers 1] [--repeats 5] [--types Q4_K Q6_K ...]

For each type, one file of a TinyLlama-shaped llama (hidden 2048, 32 heads, 4 KV heads, FFN 5632; ~44M weights a
layer, ~25 MB a layer in Q4_K) whose matrices are random blocks of that type with finite fp16 scales, plus a
"Q4_K_M" file mixed as llama.cpp's Q4_K_M mixes (attn_v, ffn_down and the LM head in Q6_K, the rest Q4_K). Each file
is loaded with `read_gguf(path, float32)`, every matrix dequantized (K-quants always are: no kernel computes on
them); files are loaded in turn, `--repeats` rounds, and the best round reported, as wall seconds and as this
thread's CPU seconds (steadier on a shared machine), each per MB of file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from tokenizers import pre_tokenizers

from pacer.model.gguf_file import read_gguf
from pacer.model.weights import resolve_model_path

HIDDEN, HEADS, KV_HEADS, FFN = 2048, 32, 4, 5632
TOKENS = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "ĠĠ"]  # GPT-2's 256 bytes and one merge
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M")
# Byte offsets of each block format's fp16 scalars: random bytes there could be inf or NaN, which no file holds.
F16_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def random_tensor(rng: np.random.Generator, shape: tuple[int, int], qtype: Q) -> np.ndarray:
    """`shape` weights as `qtype`: floats for the float types, random blocks with sane scales for the others."""
    if qtype in (Q.F32, Q.F16, Q.BF16):
        values = rng.normal(0, 0.02, shape).astype(np.float32)
        return gguf.quants.quantize(values, qtype) if qtype == Q.BF16 else values.astype(
            np.float16 if qtype == Q.F16 else np.float32)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (shape[0] * shape[1] // block_size, type_size), dtype=np.uint8)
    for offset in F16_OFFSETS[qtype]:
        scales = rng.normal(0, 0.01, len(blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(shape[0], -1)


def write_model(path: Path, kind: str, num_layers: int, rng: np.random.Generator) -> None:
    """A llama GGUF with `num_layers` TinyLlama-shaped layers, matrices in `kind` (or the Q4_K_M mix)."""
    writer = gguf.GGUFWriter(path, "llama")
    for add, value in ((writer.add_block_count, num_layers), (writer.add_context_length, 2048),
                       (writer.add_embedding_length, HIDDEN), (writer.add_feed_forward_length, FFN),
                       (writer.add_head_count, HEADS), (writer.add_head_count_kv, KV_HEADS),
                       (writer.add_layer_norm_rms_eps, 1e-5), (writer.add_rope_freq_base, 10000.0)):
        add(value)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(["Ġ Ġ"])
    kv = HIDDEN // HEADS * KV_HEADS
    matrices = {"token_embd": (len(TOKENS), HIDDEN), "output": (len(TOKENS), HIDDEN)}
    for i in range(num_layers):
        matrices |= {f"blk.{i}.attn_q": (HIDDEN, HIDDEN), f"blk.{i}.attn_k": (kv, HIDDEN),
                     f"blk.{i}.attn_v": (kv, HIDDEN), f"blk.{i}.attn_output": (HIDDEN, HIDDEN),
                     f"blk.{i}.ffn_gate": (FFN, HIDDEN), f"blk.{i}.ffn_up": (FFN, HIDDEN),
                     f"blk.{i}.ffn_down": (HIDDEN, FFN)}
        for norm in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{i}.{norm}.weight", np.ones(HIDDEN, np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for name, shape in matrices.items():
        if kind == "Q4_K_M":
            qtype = Q.Q6_K if name.endswith(("attn_v", "ffn_down", "output")) else Q.Q4_K
        else:
            qtype = Q[kind]
        data = random_tensor(rng, shape, qtype)
        writer.add_tensor(f"{name}.weight", data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as directory:
        files = {"default model": resolve_model_path(None)}
        for kind in args.types:
            files[kind] = Path(directory) / f"{kind}.gguf"
            write_model(files[kind], kind, args.layers, rng)
        best = {name: (float("inf"), float("inf")) for name in files}
        for _ in range(args.repeats):
            for name, path in files.items():
                wall, cpu = time.perf_counter(), time.thread_time()
                read_gguf(path, torch.float32)
                wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
        print(f"{'file':>14} {'MB':>7} {'wall s':>7} {'ms/MB':>6} {'cpu s':>7} {'ms/MB':>6}")
        for name, path in files.items():
            mb = path.stat().st_size / 1e6
            wall, cpu = best[name]
            print(f"{name:>14} {mb:7.1f} {wall:7.3f} {wall / mb * 1e3:6.2f} {cpu:7.3f} {cpu / mb * 1e3:6.2f}")


if __name__ == "__main__":
    main()
