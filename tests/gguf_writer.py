"""Write a GGUF from an HF directory laid out as llama.cpp's convert_hf_to_gguf.py lays it out, so the family tests can
load the same model from both: the converter's architecture name and metadata keys, q/k rows permuted for the llama
architecture, Llama 3's `llama3` RoPE scaling baked into a `rope_freqs` tensor, matrices in the chosen type (1-D
tensors stay F32, as the converter keeps them), and tokenizer.json's byte-level BPE vocabulary.

Written from convert_hf_to_gguf's behaviour, not its code; only types gguf.quants can quantize are available (the
K-quants are not: their decoding is tested on random blocks instead)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import quantize
from safetensors import safe_open

# HF model_type -> GGUF architecture: the converter writes MistralForCausalLM as llama (and no sliding window).
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
PERMUTED = ("llama",)  # LlamaModel permutes q/k for ggml's adjacent-pair RoPE; Qwen2/Qwen3 run NEOX RoPE unpermuted


def write_gguf(hf_dir: Path, path: Path, qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
               pre: str = "gpt-2", metadata: dict[str, Any] | None = None,
               tokenizer: dict[str, Any] | None = None) -> Path:
    """Convert `hf_dir` to `path` with every matrix in `qtype`; `pre` is tokenizer.ggml.pre (the converter's is a
    hash lookup we skip), `metadata` extra `{arch}.*` keys the converter would not write (a sliding window...).
    `tokenizer`: `tokenizer.*` keys to write as they are (a real model's, from a llama.cpp vocab file) instead of
    converting the directory's byte-level tokenizer.json."""
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    arch = ARCHITECTURES[config["model_type"]]
    writer = gguf.GGUFWriter(path, arch)
    _write_parameters(writer, arch, config)
    if tokenizer is None:
        _write_vocab(writer, hf_dir, config, pre)
    else:
        _copy_tokenizer(writer, tokenizer)
    for key, value in (metadata or {}).items():
        _add_value(writer, f"{arch}.{key}", value)
    for name, data, kind in _tensors(hf_dir, arch, config, qtype):
        writer.add_tensor(name, data, raw_dtype=None if kind in (GGMLQuantizationType.F32,
                                                                  GGMLQuantizationType.F16) else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def permute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """HF's rotate_half row order (j with j + head_dim/2) -> ggml's adjacent pairs (2j with 2j+1), per head."""
    per_head = rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, -1)
    return np.ascontiguousarray(per_head.swapaxes(1, 2)).reshape(rows.shape)


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, or the older `rope_scaling` plus `rope_theta`."""
    return config.get("rope_parameters") or {**(config.get("rope_scaling") or {}), "rope_theta": config["rope_theta"]}


def _write_parameters(writer: gguf.GGUFWriter, arch: str, config: dict[str, Any]) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type", "default") not in ("default", "llama3"):  # llama3 becomes the rope_freqs tensor
        writer.add_rope_scaling_type(gguf.RopeScalingType(rope["rope_type"]))
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(_head_dim(config))


def _write_vocab(writer: gguf.GGUFWriter, hf_dir: Path, config: dict[str, Any], pre: str) -> None:
    """tokenizer.json's byte-level BPE as `tokenizer.ggml.*`: tokens by id, added special tokens as CONTROL."""
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    by_id = {i: token for token, i in tokenizer["model"]["vocab"].items()}
    special = {added["id"] for added in tokenizer["added_tokens"] if added["special"]}
    by_id |= {added["id"]: added["content"] for added in tokenizer["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([by_id[i] for i in range(config["vocab_size"])])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
                            for i in range(config["vocab_size"])])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])


def _copy_tokenizer(writer: gguf.GGUFWriter, metadata: dict[str, Any]) -> None:
    arrays = {"tokenizer.ggml.tokens": writer.add_token_list, "tokenizer.ggml.token_type": writer.add_token_types,
              "tokenizer.ggml.merges": writer.add_token_merges, "tokenizer.ggml.scores": writer.add_token_scores}
    for key, value in metadata.items():
        if key in arrays:
            arrays[key](value)
        elif key.startswith("tokenizer."):
            _add_value(writer, key, value)


def _tensors(hf_dir: Path, arch: str, config: dict[str, Any], qtype: GGMLQuantizationType,
             ) -> list[tuple[str, np.ndarray, GGMLQuantizationType]]:
    """(GGUF name, data, type) for every weight, in the converter's layout."""
    names = gguf.get_tensor_name_map(_MODEL_ARCH[arch], config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    out = []
    with safe_open(hf_dir / "model.safetensors", framework="np") as shard:
        for hf_name in shard.keys():  # noqa: SIM118  (safe_open is not a mapping)
            data = shard.get_tensor(hf_name).astype(np.float32)
            projection = hf_name.split(".")[-2]
            if arch in PERMUTED and projection in heads:
                data = permute_rotary_rows(data, heads[projection])
            kind = qtype if data.ndim == 2 else GGMLQuantizationType.F32
            out.append((names.get_name(hf_name, try_suffixes=(".weight", ".bias")), quantize(data, kind), kind))
    rope = rope_parameters(config)
    if rope.get("rope_type") == "llama3":
        out.append(("rope_freqs.weight", _llama3_factors(rope, _head_dim(config)), GGMLQuantizationType.F32))
    return out


def _llama3_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.1's RoPE scaling as one divisor per rotated pair: 1 for short wavelengths, `factor` for long ones, a
    smooth blend between (Meta's reference; the converter stores these as `rope_freqs`)."""
    inv_freq = 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim)
    original = rope["original_max_position_embeddings"]
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    factors = []
    for wavelength in 2 * math.pi / inv_freq:
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def _head_dim(config: dict[str, Any]) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _add_value(writer: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    else:
        writer.add_string(key, value)


_MODEL_ARCH = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
