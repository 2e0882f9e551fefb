"""pacer's numpy decoders of every GGUF block format it loads, bit for bit against gguf.quants.dequantize (the
reference), on random blocks: random quants and packed sub-scales, fp16 scales from a real file's range (finite,
edges included). Random blocks reach every bit pattern, which K-quants need: gguf.quants cannot quantize to them."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize

from pacer.model.dequant import BLOCK_TYPES, dequantize_blocks
from pacer.model.gguf_file import REFERENCE_TYPES, _dequantize, _GGUFTensor, read_gguf

# Byte offsets of each format's fp16 scalars (scale d, and the minimum m or dmin where the format has one).
F16_OFFSETS = {Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q4_K: (0, 2),
               Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# zero, both signs, subnormal, the largest finite, tiny and huge
EDGE_SCALES = np.array([0.0, -0.0, 1.0, -1.0, 6e-8, -6e-8, 65504.0, -65504.0, 1e-4, 3.14], dtype=np.float16)


def random_blocks(qtype: Q, num_blocks: int, seed: int = 0) -> np.ndarray:
    """uint8 `[num_blocks, block bytes]`: random bytes, then finite fp16 scalars where the format keeps them."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(num_blocks, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    for offset in F16_OFFSETS[qtype]:
        scales = np.where(rng.random(num_blocks) < 0.3, rng.choice(EDGE_SCALES, num_blocks),
                          rng.normal(0, 0.02, num_blocks)).astype(np.float16)
        blocks[:, offset : offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks


def test_every_loadable_format_has_its_scale_offsets_here() -> None:
    assert set(F16_OFFSETS) == set(BLOCK_TYPES)


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_dequantize_blocks_is_bit_exact_with_gguf(qtype: Q) -> None:
    blocks = random_blocks(qtype, 4096)
    expected = gguf_dequantize(blocks, qtype).reshape(len(blocks), -1)
    values = dequantize_blocks(blocks, qtype)
    assert values.dtype == np.float32 and values.shape == expected.shape
    assert np.array_equal(values.view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda q: q.name)
def test_dequantize_blocks_reads_a_strided_view_of_a_file(qtype: Q) -> None:
    """The loader hands over rows of a memory-mapped file: a read-only, possibly unaligned view."""
    type_size = GGML_QUANT_SIZES[qtype][1]
    blocks = random_blocks(qtype, 64, seed=1)
    buffer = np.concatenate([np.zeros(3, np.uint8), blocks.reshape(-1)])
    view = np.frombuffer(buffer.tobytes(), np.uint8, blocks.size, 3).reshape(-1, type_size)
    assert np.array_equal(dequantize_blocks(view, qtype).view(np.int32), dequantize_blocks(blocks, qtype).view(np.int32))


def test_formats_without_a_decoder_are_named() -> None:
    with pytest.raises(ValueError, match="Q2_K"):
        dequantize_blocks(np.zeros((1, GGML_QUANT_SIZES[Q.Q2_K][1]), np.uint8), Q.Q2_K)


# ---- the loader: formats without a decoder here ---------------------------------------------------------------------


@pytest.mark.parametrize("qtype", REFERENCE_TYPES, ids=lambda q: q.name)
def test_other_formats_load_as_gguf_decodes_them(qtype: Q) -> None:
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.random.default_rng(2).integers(0, 256, (3 * 2, type_size), dtype=np.uint8)  # 3 rows of 2 blocks
    # finite fp16 scales where these formats keep them: the IQ quants first, Q2_K and Q3_K last
    blocks[:, :2] = blocks[:, -4:-2] = blocks[:, -2:] = np.array([0.5], np.float16).view(np.uint8)
    values = _dequantize(blocks.reshape(-1), _GGUFTensor(qtype, (3, 2 * block_size), 0, blocks.size))
    assert np.array_equal(values, gguf_dequantize(blocks.reshape(3, -1), qtype))


def test_a_format_nothing_decodes_is_refused_by_name(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.int32))  # I32: an index table, not weights
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()
    with pytest.raises(ValueError, match="'token_embd.weight' is I32"):
        read_gguf(tmp_path / "model.gguf", torch.float32)
