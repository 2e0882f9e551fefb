"""GGUF's block formats decoded to fp32 in numpy, bit for bit as gguf.quants.dequantize decodes them.

gguf.quants is the reference but not a loader: it works 16 rows at a time through generic reshapes and took 1.5-2x
the time per byte of these on Q5 and K-quant matrices (and far longer when handed bare blocks). Each decoder here
makes the integer quants in uint8, then does the reference's fp32 ops in its order (scale products first, then
`value * scale - min`), so the results are its results. Single-threaded numpy on purpose, see gguf_file.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from gguf import GGMLQuantizationType

QK_K = 256  # values in a K-quant super-block: 8 sub-blocks of 32 (Q4_K, Q5_K) or 16 of 16 (Q6_K)


def dequantize_blocks(blocks: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """`[n, block bytes]` uint8 blocks of a `BLOCK_TYPES` format -> a new fp32 `[n, block size]`."""
    if qtype not in _BLOCK_DEQUANTIZERS:
        raise ValueError(f"no dequantizer for {qtype.name} blocks; supported: {[t.name for t in BLOCK_TYPES]}")
    return _BLOCK_DEQUANTIZERS[qtype](blocks)


def _f16_column(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scalar at byte `start` of every block, as fp32 `[num_blocks, 1]`."""
    return blocks[:, start : start + 2].view(np.float16).astype(np.float32)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """`[..., m]` bytes -> `[..., 2m]` 4-bit values: low nibbles first, then the high ones (every format's order)."""
    q = np.empty((*packed.shape[:-1], 2 * packed.shape[-1]), np.uint8)
    np.bitwise_and(packed, 0x0F, out=q[..., : packed.shape[-1]])
    np.right_shift(packed, 4, out=q[..., packed.shape[-1] :])
    return q


def _fifth_bits(packed: np.ndarray) -> np.ndarray:
    """`[n, m]` bytes -> `[n, 8m]` of 0 or 16: bit k of byte j (little-endian bit order) is value 8j + k's 5th bit."""
    bits = np.unpackbits(packed, axis=-1, bitorder="little")
    bits <<= 4
    return bits


def _dequant_q8_0(blocks: np.ndarray) -> np.ndarray:
    # [n, 34] = f16 scale d | 32 x int8; value = d * q
    values = blocks[:, 2:].view(np.int8).astype(np.float32)
    values *= _f16_column(blocks, 0)
    return values


def _dequant_q4_0(blocks: np.ndarray) -> np.ndarray:
    # [n, 18] = f16 d | 16 bytes of nibbles; value = d * (q - 8)
    values = _unpack_nibbles(blocks[:, 2:]).astype(np.float32)
    values -= 8
    values *= _f16_column(blocks, 0)
    return values


def _dequant_q4_1(blocks: np.ndarray) -> np.ndarray:
    # [n, 20] = f16 d | f16 m | 16 bytes of nibbles; value = d * q + m
    values = _unpack_nibbles(blocks[:, 4:]).astype(np.float32)
    values *= _f16_column(blocks, 0)
    values += _f16_column(blocks, 2)
    return values


def _dequant_q5_0(blocks: np.ndarray) -> np.ndarray:
    # [n, 22] = f16 d | 4 bytes of 5th bits | 16 bytes of nibbles; value = d * (q - 16)
    q = _unpack_nibbles(blocks[:, 6:])
    q |= _fifth_bits(blocks[:, 2:6])
    values = np.subtract(q, 16, dtype=np.float32)
    values *= _f16_column(blocks, 0)
    return values


def _dequant_q5_1(blocks: np.ndarray) -> np.ndarray:
    # [n, 24] = f16 d | f16 m | 4 bytes of 5th bits | 16 bytes of nibbles; value = d * q + m
    q = _unpack_nibbles(blocks[:, 8:])
    q |= _fifth_bits(blocks[:, 4:8])
    values = np.multiply(q, _f16_column(blocks, 0), dtype=np.float32)
    values += _f16_column(blocks, 2)
    return values


def _k_scales_and_mins(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: bytes 4..15 pack 8 six-bit scales and 8 six-bit minimums -> uint8 `[n, 8]` each.

    Bytes 0-3 hold scales 0-3 in their low 6 bits, bytes 4-7 minimums 0-3; scales and minimums 4-7 take their low 4
    bits from bytes 8-11 (low and high nibble) and their top 2 bits from the top of bytes 0-3 and 4-7."""
    packed = blocks[:, 4:16]
    low, mid, high = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    scales = np.concatenate([low & 0x3F, (high & 0x0F) | ((low >> 2) & 0x30)], axis=1)
    mins = np.concatenate([mid & 0x3F, (high >> 4) | ((mid >> 2) & 0x30)], axis=1)
    return scales, mins


def _k_sub_block_affine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K quants `q` uint8 `[n, 8, 32]` -> fp32 `[n, 256]`: value = (d * scale) * q - (dmin * min)."""
    scales, mins = _k_scales_and_mins(blocks)
    step = _f16_column(blocks, 0) * scales.astype(np.float32)  # [n, 8]
    offset = _f16_column(blocks, 2) * mins.astype(np.float32)
    values = np.multiply(q, step[:, :, None], dtype=np.float32)
    values -= offset[:, :, None]
    return values.reshape(-1, QK_K)


def _dequant_q4_k(blocks: np.ndarray) -> np.ndarray:
    # [n, 144] = f16 d | f16 dmin | 12 bytes of scales and mins | 128 bytes of nibbles: 4 chunks of 32 bytes, each
    # holding sub-block 2c in its low nibbles and 2c+1 in its high ones
    q = _unpack_nibbles(blocks[:, 16:].reshape(-1, 4, 32))
    return _k_sub_block_affine(blocks, q.reshape(-1, 8, 32))


def _dequant_q5_k(blocks: np.ndarray) -> np.ndarray:
    # [n, 176] = Q4_K's first 16 bytes | 32 bytes of 5th bits (bit k of byte j: sub-block k, value j) | 128 bytes of
    # nibbles laid out as Q4_K's
    q = _unpack_nibbles(blocks[:, 48:].reshape(-1, 4, 32)).reshape(-1, 8, 32)
    q |= _fifth_bits(blocks[:, 16:48]).reshape(-1, 32, 8).transpose(0, 2, 1)
    return _k_sub_block_affine(blocks, q)


def _dequant_q6_k(blocks: np.ndarray) -> np.ndarray:
    # [n, 210] = 128 bytes of low nibbles | 64 bytes of 2-bit highs | 16 x int8 scales | f16 d. Each half of 128
    # values takes 64 bytes of nibbles (low, then high) and 32 bytes of highs (bits 0-1, 2-3, 4-5, 6-7 for its
    # four quarters); value = (d * scale) * (q - 32), one scale per 16 values
    q = _unpack_nibbles(blocks[:, :128].reshape(-1, 2, 64)).reshape(-1, QK_K)
    highs = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    highs &= 0x03
    highs <<= 4
    q |= highs.reshape(-1, QK_K)
    step = _f16_column(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # [n, 16]
    values = np.subtract(q, 32, dtype=np.float32).reshape(-1, 16, 16)
    values *= step[:, :, None]
    return values.reshape(-1, QK_K)


_BLOCK_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLQuantizationType.Q8_0: _dequant_q8_0,
    GGMLQuantizationType.Q4_0: _dequant_q4_0,
    GGMLQuantizationType.Q4_1: _dequant_q4_1,
    GGMLQuantizationType.Q5_0: _dequant_q5_0,
    GGMLQuantizationType.Q5_1: _dequant_q5_1,
    GGMLQuantizationType.Q4_K: _dequant_q4_k,
    GGMLQuantizationType.Q5_K: _dequant_q5_k,
    GGMLQuantizationType.Q6_K: _dequant_q6_k,
}
# The block formats decoded here, what Q4_0 to Q8_0 files hold (a Q4_K_M file mixes Q4_K, Q6_K and sometimes Q5_0 or
# Q8_0); gguf_file hands the rarer ones (Q2_K, Q3_K, the IQ quants) to gguf.quants and refuses the rest.
BLOCK_TYPES = tuple(_BLOCK_DEQUANTIZERS)
