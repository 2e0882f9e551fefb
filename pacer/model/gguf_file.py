"""GGUF files of the Llama-like families (llama, which Mistral's are too, qwen2, qwen3): a direct header parser
(gguf's GGUFReader makes one numpy view per vocabulary string and took 3.6-5 s on the default model), the config
from each architecture's keys, HF-named tensors dequantized (dequant.py), or the blocks themselves for the formats
pacer's kernels compute with."""

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

# `general.architecture` values pacer loads; each becomes `LlamaConfig.architecture`. Mistral has none of its own:
# llama.cpp's converter writes MistralForCausalLM as "llama" (and drops its sliding window).
_GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# The converter permutes q/k rows (weights and biases) for these: LlamaModel reorders them for ggml's adjacent-pair
# RoPE, while Qwen2/Qwen3 keep HF's order and llama.cpp runs them with NEOX RoPE, which is HF's rotate_half.
_PERMUTED_ARCHITECTURES = ("llama",)
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
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BIASED = ("attn_q", "attn_k", "attn_v")  # Qwen2's q/k/v biases; the HF contract has no others
_GGUF_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # RoPE frequency divisors, read into the config (see _rope_freq_factors)
_ROTARY_ROWS = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")
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
    """The config, HF-named `[out, in]` tensors (q/k un-permuted where the converter permuted them) and tokenizer of a
    GGUF. Tensors are dequantized to `dtype`, except with `keep_blocks`: then matrices in a block format the kernels
    compute with stay as the file's blocks (`QuantizedTensor`). An architecture, block type or RoPE scaling pacer
    does not implement is refused before any tensor is read."""
    file = GGUFFile(path)
    for gguf_name, info in file.tensors.items():
        if info.ggml_type not in _LOADABLE_TYPES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is {info.ggml_type.name} blocks, which pacer does not load; "
                             f"supported: {', '.join(t.name for t in _LOADABLE_TYPES)}")
    config = _config_from_gguf(file)
    permuted = config.architecture in _PERMUTED_ARCHITECTURES
    weights: dict[str, torch.Tensor | QuantizedTensor] = {}
    dequantized = set()
    for gguf_name, info in file.tensors.items():
        if gguf_name == _ROPE_FREQS:
            continue
        name = _hf_name(gguf_name, config.architecture)
        raw = file.tensor_bytes(info)
        keep = keep_blocks and info.ggml_type in KERNEL_TYPES and len(info.shape) == 2
        values = raw.reshape(info.shape[0], -1) if keep else _dequantize(raw, info)
        if permuted and name.endswith(_ROTARY_ROWS):  # whole rows move: blocks permute as values do
            heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
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


def _config_from_gguf(file: GGUFFile) -> LlamaConfig:
    metadata, tensors = file.metadata, file.tensors
    arch = metadata.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_GGUF_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise ValueError(f"GGUF metadata is missing {arch}.{key}")
        return value

    hidden, num_heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // num_heads)  # Qwen3's is not hidden / heads
    if get("attention.value_length", head_dim) != head_dim:
        raise ValueError("GGUF has value heads of another size than its key heads, which pacer does not implement")
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
        architecture=arch,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        rope_freq_factors=_rope_freq_factors(file, arch, head_dim),
        sliding_window=get("attention.sliding_window", 0) or None,  # 0: no window (llama.cpp's convention)
    )


def _rope_freq_factors(file: GGUFFile, arch: str, head_dim: int) -> tuple[float, ...] | None:
    """What RoPE's inverse frequencies are divided by, as llama.cpp's rope applies them: the `rope_freqs` tensor
    (Llama 3.1's `llama3` scaling, which the converter bakes into it) times a `linear` scaling factor. llama.cpp
    reads a missing scaling type as linear and ignores the factor under `none`; YaRN and LongRoPE are refused."""
    kind = file.metadata.get(f"{arch}.rope.scaling.type", "linear")
    if kind not in ("none", "linear"):
        raise ValueError(f"GGUF RoPE scaling type {kind!r} is not supported; supported: 'none', 'linear'")
    factor = file.metadata.get(f"{arch}.rope.scaling.factor") or file.metadata.get(f"{arch}.rope.scale_linear")
    factor = float(factor or 1.0) if kind == "linear" else 1.0
    info = file.tensors.get(_ROPE_FREQS)
    if info is None:
        return None if factor == 1.0 else (factor,) * (head_dim // 2)
    return tuple(float(f) * factor for f in _dequantize(file.tensor_bytes(info), info).reshape(-1))


def _hf_name(gguf_name: str, arch: str) -> str:
    if gguf_name in _GGUF_NAMES:
        return _GGUF_NAMES[gguf_name]
    match = _GGUF_LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _GGUF_LAYER_NAMES or (
            match.group(3) == "bias" and match.group(2) not in _GGUF_BIASED):
        raise ValueError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_GGUF_LAYER_NAMES[part]}.{kind}"


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


def _unpermute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q/k rows (a weight's rows, a bias's values).

    ggml's RoPE rotates adjacent pairs (rows 2j, 2j+1 of a head); HF's rotate_half rotates row j
    with row j + head_dim/2. The converter reordered rows for ggml; we put them back.
    """
    head_dim = rows.shape[0] // num_heads
    per_head = rows.reshape(num_heads, head_dim // 2, 2, -1)
    return np.ascontiguousarray(per_head.transpose(0, 2, 1, 3)).reshape(rows.shape)
