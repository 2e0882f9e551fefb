"""GGUF files: a direct header parser (gguf's GGUFReader makes one numpy view per vocabulary string
and took 3.6-5 s on the default model), vectorised dequantization of the block formats, or the blocks
themselves for the formats pacer's kernels compute with."""

from __future__ import annotations

import logging
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from pacer.model.config import LlamaConfig
from pacer.model.dequant import BLOCK_TYPES, dequantize_blocks
from pacer.model.quant import KERNEL_TYPES, QuantizedTensor
from pacer.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}  # fmt: skip

_GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
_FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
# Formats without a decoder in dequant.py that GGUFs of Llama-like models use (Q2_K/Q3_K files, the importance-matrix
# IQ quants): gguf.quants decodes them, correctly but several times slower per byte.
REFERENCE_TYPES = tuple(GGMLQuantizationType[name] for name in (
    "Q2_K", "Q3_K", "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS"))
_LOADABLE_TYPES = _FLOAT_TYPES + BLOCK_TYPES + REFERENCE_TYPES


@dataclass(frozen=True)
class _GGUFTensor:
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: GGUF lists dims fastest-varying first, we reverse them
    offset: int  # absolute byte offset in the file
    num_bytes: int


class GGUFFile:
    """A memory-mapped GGUF file: metadata parsed with `struct`, tensors located but not read.

    gguf.GGUFReader builds a numpy view per string, ~3.6 s for SmolLM2's 98k vocab and merge
    strings; this takes ~0.15 s. We still use the gguf package for its type tables.
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as file:
            if file.read(4) != _GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF')")
            buffer = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self.buffer, self.pos = buffer, 0
        version, num_tensors, num_kv = struct.unpack_from("<4xIQQ", buffer)
        if version not in (2, 3):
            raise ValueError(f"{path}: unsupported GGUF version {version} (big-endian files too)")
        self.pos = 24
        self.metadata = dict(self._read_kv() for _ in range(num_kv))
        infos = [self._read_tensor_info() for _ in range(num_tensors)]
        alignment = self.metadata.get("general.alignment", 32)
        data_start = -(-self.pos // alignment) * alignment
        self.tensors = {name: _locate(name, data_start, *info) for name, *info in infos}
        end = max((t.offset + t.num_bytes for t in self.tensors.values()), default=0)
        if end > len(buffer):
            raise ValueError(f"{path} is truncated: tensor data ends at byte {end}, file has {len(buffer)}")

    def tensor_bytes(self, info: _GGUFTensor) -> np.ndarray:
        return np.frombuffer(self.buffer, np.uint8, info.num_bytes, info.offset)

    def _unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _read_string(self) -> str:
        length = self._unpack("<Q")
        self.pos += length
        return self.buffer[self.pos - length : self.pos].decode("utf-8")

    def _read_value(self, value_type: int) -> Any:
        if value_type == GGUFValueType.STRING:
            return self._read_string()
        if value_type == GGUFValueType.ARRAY:
            item_type, count = self._unpack("<I"), self._unpack("<Q")
            if item_type in _GGUF_SCALARS and item_type != GGUFValueType.BOOL:
                dtype = np.dtype("<" + _GGUF_SCALARS[item_type])
                values = np.frombuffer(self.buffer, dtype, count, self.pos).tolist()
                self.pos += count * dtype.itemsize
                return values
            return [self._read_value(item_type) for _ in range(count)]
        if value_type not in _GGUF_SCALARS:
            raise ValueError(f"unknown GGUF metadata value type {value_type}")
        return self._unpack("<" + _GGUF_SCALARS[value_type])

    def _read_kv(self) -> tuple[str, Any]:
        key = self._read_string()
        return key, self._read_value(self._unpack("<I"))

    def _read_tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._read_string()
        num_dims = self._unpack("<I")
        dims = struct.unpack_from(f"<{num_dims}Q", self.buffer, self.pos)
        self.pos += 8 * num_dims
        ggml_type, offset = self._unpack("<I"), self._unpack("<Q")
        return name, dims, ggml_type, offset


def _locate(name: str, data_start: int, dims: tuple[int, ...], ggml_type: int, offset: int) -> _GGUFTensor:
    try:
        qtype = GGMLQuantizationType(ggml_type)
    except ValueError:
        raise ValueError(f"GGUF tensor {name!r} has unknown block type {ggml_type}") from None
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if dims[0] % block_size:
        raise ValueError(f"GGUF tensor {name}: row of {dims[0]} values is not whole {qtype.name} blocks")
    num_blocks = int(np.prod(dims, dtype=np.int64)) // block_size
    return _GGUFTensor(qtype, tuple(reversed(dims)), data_start + offset, num_blocks * type_size)


def read_gguf(path: Path, dtype: torch.dtype, keep_blocks: bool = False,
              ) -> tuple[LlamaConfig, dict[str, torch.Tensor | QuantizedTensor], Tokenizer]:
    """The config, HF-named `[out, in]` tensors (q/k un-permuted) and tokenizer of a GGUF. Tensors are dequantized
    to `dtype`, except with `keep_blocks`: then matrices in a block format the kernels compute with stay as the
    file's blocks (`QuantizedTensor`)."""
    file = GGUFFile(path)
    for gguf_name, info in file.tensors.items():
        if info.ggml_type not in _LOADABLE_TYPES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is {info.ggml_type.name} blocks, which pacer does not load; "
                             f"supported: {', '.join(t.name for t in _LOADABLE_TYPES)}")
    config = _config_from_gguf(file.metadata, file.tensors)
    weights: dict[str, torch.Tensor | QuantizedTensor] = {}
    dequantized = set()
    for gguf_name, info in file.tensors.items():
        name = _hf_name(gguf_name)
        raw = file.tensor_bytes(info)
        keep = keep_blocks and info.ggml_type in KERNEL_TYPES and len(info.shape) == 2
        values = raw.reshape(info.shape[0], -1) if keep else _dequantize(raw, info)
        if name.endswith(("q_proj.weight", "k_proj.weight")):  # whole rows move: blocks permute as values do
            heads = config.num_heads if name.endswith("q_proj.weight") else config.num_kv_heads
            values = _unpermute_rotary_rows(values, heads)
        if keep:
            weights[name] = QuantizedTensor(info.ggml_type, torch.from_numpy(np.array(values)))
        else:
            weights[name] = _to_torch(values, dtype)
            if keep_blocks and len(info.shape) == 2 and info.ggml_type not in _FLOAT_TYPES:
                dequantized.add(info.ggml_type.name)
    if dequantized:
        logger.info("no kernel for %s blocks: those weights are dequantized to %s", ", ".join(sorted(dequantized)),
                    dtype)
    return config, weights, Tokenizer.from_gguf_metadata(file.metadata)


def _config_from_gguf(metadata: dict[str, Any], tensors: dict[str, _GGUFTensor]) -> LlamaConfig:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama'")

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"llama.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata is missing llama.{key}")
        return value

    if get("rope.scaling.type", "none") not in ("none", "linear") or get("rope.scaling.factor", 1.0) != 1.0:
        raise ValueError("GGUF uses RoPE scaling, which pacer does not implement")
    hidden, num_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // num_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ValueError("GGUF uses partial rotary embeddings, which pacer does not implement")
    return LlamaConfig(
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=num_heads,
        num_kv_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        max_position_embeddings=get("context_length"),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
    )


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES:
        raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")
    return f"model.layers.{match.group(1)}.{_GGUF_LAYER_NAMES[match.group(2)]}.weight"


def _dequantize(raw: np.ndarray, info: _GGUFTensor) -> np.ndarray:
    """Raw GGUF bytes -> a new fp32 array of `info.shape` (never a view of the file).

    numpy, not torch: it is single-threaded, and torch's 2-thread elementwise ops ran 25x slower
    than 1 thread on a busy 2-core box. Blocks are decoded with the same fp32 ops as
    gguf.quants.dequantize, so results match it bit for bit (`REFERENCE_TYPES` are its results).
    """
    kind = info.ggml_type
    if kind == GGMLQuantizationType.F32:
        values = raw.view(np.float32).copy()
    elif kind == GGMLQuantizationType.F16:
        values = raw.view(np.float16).astype(np.float32)
    elif kind == GGMLQuantizationType.BF16:  # bf16 is the top half of an fp32
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind in BLOCK_TYPES:
        values = dequantize_blocks(raw.reshape(-1, GGML_QUANT_SIZES[kind][1]), kind)
    else:  # REFERENCE_TYPES, by whole rows: gguf.quants works 16 rows at a time, so blocks as rows crawl
        from gguf.quants import dequantize

        block_size, type_size = GGML_QUANT_SIZES[kind]
        values = dequantize(raw.reshape(-1, info.shape[-1] // block_size * type_size), kind)
    return values.reshape(info.shape)


def _to_torch(values: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """fp32 array -> `dtype` tensor, rounding in numpy for the same single-thread reason."""
    if dtype == torch.float32:
        return torch.from_numpy(values)
    if dtype == torch.float16:
        return torch.from_numpy(values.astype(np.float16))
    if dtype == torch.bfloat16:  # round to nearest even on the fp32 bits (weights are finite)
        bits = values.view(np.uint32)
        rounded = bits >> 16
        rounded &= 1
        rounded += 0x7FFF
        rounded += bits
        rounded >>= 16
        return torch.from_numpy(rounded.astype(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(values).to(dtype)


def _unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q/k rows.

    ggml's RoPE rotates adjacent pairs (rows 2j, 2j+1 of a head); HF's rotate_half rotates row j
    with row j + head_dim/2. The converter reordered rows for ggml; we put them back.
    """
    out_features, in_features = weight.shape
    head_dim = out_features // num_heads
    per_head = weight.reshape(num_heads, head_dim // 2, 2, in_features)
    return np.ascontiguousarray(per_head.transpose(0, 2, 1, 3)).reshape(out_features, in_features)
