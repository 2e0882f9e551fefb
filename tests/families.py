"""Tiny random-weight models of each supported family, built and saved with transformers (no hub): the references the
family tests compare pacer against, from safetensors and (written by tests/gguf_writer.py) from GGUF.

Each family turns on the switch it is known by, at shapes small enough for the suite: Llama 3.1's `llama3` RoPE
scaling, Mistral's sliding window (wider than the tests' contexts), Qwen2's q/k/v biases, Qwen3's q/k norms and a head
dim that is not hidden / heads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from pacer.model.tokenizer import Tokenizer

_COMMON = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "bos_token_id": 1,
           "eos_token_id": 2}

FAMILIES: dict[str, dict] = {
    "llama": {"model_type": "llama", "head_dim": 16, "tie_word_embeddings": True,
              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
    "mistral": {"model_type": "mistral", "head_dim": 16, "tie_word_embeddings": False, "sliding_window": 4096,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "qwen2": {"model_type": "qwen2", "tie_word_embeddings": True, "use_sliding_window": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "qwen3": {"model_type": "qwen3", "head_dim": 32, "tie_word_embeddings": True, "attention_bias": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
}


def hf_model(family: str, seed: int = 0, **overrides: object) -> torch.nn.Module:
    """A transformers CausalLM of `family` with random weights large enough for varied logits, in fp32, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**_COMMON, **FAMILIES[family], **overrides}
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else (p.uniform_(0.8, 1.2) if "norm" in name else p.normal_(0, 0.2))
    return model.eval()


def byte_tokenizer() -> Backend:
    """A real byte-level tokenizer over the 256-token vocabulary the tiny models have (no merges)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(sorted(alphabet))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def save_family(family: str, directory: Path, seed: int = 0, tokenizer: Tokenizer | None = None) -> Path:
    """Write `family`'s tiny model as an HF directory pacer and transformers both load: config.json, safetensors,
    tokenizer.json and a tokenizer_config.json naming its special tokens. With a real `tokenizer` (a family's own),
    the model takes its vocabulary size and special tokens."""
    if tokenizer is not None:
        model = hf_model(family, seed, vocab_size=tokenizer.vocab_size, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
        model.save_pretrained(directory)
        tokenizer.save(directory)
        return directory
    model = hf_model(family, seed)
    model.save_pretrained(directory)
    tokenizer = byte_tokenizer()
    tokenizer.save(str(directory / "tokenizer.json"))
    bos, eos = (tokenizer.id_to_token(i) for i in (_COMMON["bos_token_id"], _COMMON["eos_token_id"]))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos}
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory
