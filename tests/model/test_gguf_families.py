"""GGUFs of each Llama-like family, written from its tiny HF directory as llama.cpp's converter writes them
(tests/gguf_writer.py), load to the config and tensors pacer loads from that directory: exactly in F32, and in a
block type exactly to gguf.quants' round trip of the HF tensor (q/k permutation undone only where the converter did
it). Architectures and RoPE scalings pacer does not implement are refused, by name (block types: test_dequant.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.numpy import load_file

from pacer.model.config import LlamaConfig
from pacer.model.gguf_file import read_gguf
from pacer.model.quant import QuantizedTensor
from pacer.model.weights import Checkpoint, load_checkpoint
from tests.families import FAMILIES, save_family
from tests.gguf_writer import write_gguf

# What gguf.quants can write; the K-quants are tested on random blocks (test_dequant.py).
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Checkpoint]:
    """A family's HF directory and pacer's load of it, the reference its GGUF must match."""
    directory = save_family(request.param, tmp_path_factory.mktemp(request.param))
    return directory, load_checkpoint(directory)


def as_converted(config: LlamaConfig) -> LlamaConfig:
    """`config` as llama.cpp's converter writes it into a GGUF: eps in fp32, Mistral as `llama` and without its
    sliding window (convert_hf_to_gguf writes neither)."""
    if config.architecture == "mistral":
        config = replace(config, architecture="llama", sliding_window=None)
    return replace(config, rms_norm_eps=float(np.float32(config.rms_norm_eps)))


def assert_same_config(loaded: LlamaConfig, expected: LlamaConfig) -> None:
    """Equal, RoPE factors to fp32 rounding (the GGUF stores them in fp32)."""
    assert replace(loaded, rope_freq_factors=None) == replace(expected, rope_freq_factors=None)
    assert (loaded.rope_freq_factors is None) == (expected.rope_freq_factors is None)
    if expected.rope_freq_factors is not None:
        np.testing.assert_allclose(loaded.rope_freq_factors, expected.rope_freq_factors, rtol=1e-6)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_gguf_loads_to_the_hf_config_and_tensors(family: tuple[Path, Checkpoint], tmp_path: Path, qtype: Q) -> None:
    directory, reference = family
    checkpoint = load_checkpoint(write_gguf(directory, tmp_path / "model.gguf", qtype))
    assert_same_config(checkpoint.config, as_converted(reference.config))
    assert checkpoint.weights.keys() == reference.weights.keys()
    for name, tensor in checkpoint.weights.items():
        # 2-D tensors went through the type, 1-D ones stay F32; dequantize(quantize(.)) is blockwise along rows, so
        # it commutes with the converter's row permutation: any mismatch is a permutation not undone.
        hf = reference.weights[name].numpy()
        expected = dequantize(quantize(hf, qtype), qtype).reshape(hf.shape) if hf.ndim == 2 else hf
        assert tensor.dtype == torch.float32
        assert np.array_equal(tensor.numpy().view(np.int32), expected.view(np.int32)), f"{name} ({qtype.name})"


def test_kept_blocks_are_unpermuted_like_values(family: tuple[Path, Checkpoint], tmp_path: Path) -> None:
    path = write_gguf(family[0], tmp_path / "model.gguf", Q.Q8_0)
    values, blocks = load_checkpoint(path).weights, load_checkpoint(path, quantization="auto").weights
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert isinstance(blocks[name], QuantizedTensor)
        assert torch.equal(blocks[name].dequantize(), values[name])


def test_gguf_tokenizer_encodes_like_the_hf_directory(family: tuple[Path, Checkpoint], tmp_path: Path) -> None:
    tokenizer = read_gguf(write_gguf(family[0], tmp_path / "model.gguf"), torch.float32)[2]
    reference = family[1].tokenizer
    text = "Hello, wörld! 123\n\ttabs  and  spaces"
    assert tokenizer.encode(text) == reference.encode(text)
    assert (tokenizer.bos_token, tokenizer.eos_token) == (reference.bos_token, reference.eos_token)


# ---- metadata the converter writes for some models only ------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family("qwen2", tmp_path_factory.mktemp("qwen2"))


def _with_config(hf_dir: Path, directory: Path, **changes: object) -> Path:
    """A copy of `hf_dir` whose config.json has `changes` (`rope_parameters` merged into its own)."""
    directory.mkdir()
    for file in hf_dir.iterdir():
        (directory / file.name).write_bytes(file.read_bytes())
    raw = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    raw |= {**changes, "rope_parameters": {**raw["rope_parameters"], **changes.get("rope_parameters", {})}}
    (directory / "config.json").write_text(json.dumps(raw), encoding="utf-8")
    return directory


def test_llama_architecture_biases_are_unpermuted_with_their_rows(qwen2_dir: Path, tmp_path: Path) -> None:
    """The converter permutes q/k biases with their rows under the llama architecture (LlamaModel takes any
    q/k/v-biased checkpoint that calls itself llama): Qwen2's weights, written as llama, must come back as they were."""
    hf_dir = _with_config(qwen2_dir, tmp_path / "as-llama", model_type="llama")
    config, weights, _ = read_gguf(write_gguf(hf_dir, tmp_path / "model.gguf"), torch.float32)
    assert (config.architecture, config.attention_bias) == ("llama", True)
    for name, tensor in load_file(hf_dir / "model.safetensors").items():
        assert torch.equal(weights[name], torch.from_numpy(tensor)), name


def test_linear_rope_scaling_divides_every_frequency_by_its_factor(qwen2_dir: Path, tmp_path: Path) -> None:
    hf_dir = _with_config(qwen2_dir, tmp_path / "linear", rope_parameters={"rope_type": "linear", "factor": 4.0})
    config = read_gguf(write_gguf(hf_dir, tmp_path / "model.gguf"), torch.float32)[0]
    assert config.rope_freq_factors == (4.0,) * (config.head_dim // 2)


def test_sliding_window_metadata_is_read(qwen2_dir: Path, tmp_path: Path) -> None:
    path = write_gguf(qwen2_dir, tmp_path / "model.gguf", metadata={"attention.sliding_window": 128})
    assert read_gguf(path, torch.float32)[0].sliding_window == 128


# ---- refused, by name ----------------------------------------------------------------------------------------------


def test_yarn_rope_scaling_is_refused_by_name(qwen2_dir: Path, tmp_path: Path) -> None:
    hf_dir = _with_config(qwen2_dir, tmp_path / "yarn", rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    with pytest.raises(ValueError, match="'yarn'"):
        read_gguf(write_gguf(hf_dir, tmp_path / "model.gguf"), torch.float32)


def test_unknown_architecture_is_refused_by_name(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(tmp_path / "model.gguf", "gemma2")
    for write in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file,
                  writer.close):
        write()
    with pytest.raises(ValueError, match="'gemma2'"):
        read_gguf(tmp_path / "model.gguf", torch.float32)

