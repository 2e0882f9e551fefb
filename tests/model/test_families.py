"""Every Llama-like family pacer serves against transformers on the same tiny random weights (tests/families.py):
fp32 logits of a mixed batch (decodes, and prompts prefilled in chunks between them) and greedy ids through the engine,
loaded from the safetensors directory and from an F32 GGUF of it (tests/gguf_writer.py, laid out as llama.cpp's converter
lays it out), on the plain model and on the runner's default projections (oneDNN-prepacked where it packs); the config.json
variants and refusals; the sliding window's cap; the export's round trip through transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pacer.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from pacer.engine.builder import build_engine
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.model.attention import AttentionMetadata, allocate_kv_cache
from pacer.model.llama import LlamaModel, RotaryEmbedding, block_formats, fuse_projections
from pacer.model.quant import QuantizedLinear, QuantizedTensor
from pacer.model.runner import ModelRunner
from pacer.model.weights import Checkpoint, export_safetensors, load_checkpoint
from pacer.request import Request, SamplingParams
from pacer.scheduling import scheduler_class
from tests.families import FAMILIES, save_family
from tests.gguf_writer import write_gguf

BLOCK_SIZE = 4
NUM_BLOCKS = 32
# Tokens each request gets per step, decodes (1) first in the batch as the runner lays them out: "a" is prefilled in
# three chunks while "b" decodes, "c" starts mid-way.
STEPS = [{"a": 6, "b": 9}, {"a": 5, "b": 1, "c": 7}, {"a": 3, "b": 1, "c": 1}, {"a": 1, "c": 1}]
LENGTHS = {r: sum(step.get(r, 0) for step in STEPS) for r in "abc"}
SEQUENCES = {r: torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(i)).tolist()
             for i, (r, n) in enumerate(LENGTHS.items())}
TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def hf(family_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def checkpoint(family_dir: Path) -> Checkpoint:
    return load_checkpoint(family_dir)


@pytest.fixture(scope="module", params=["safetensors", "gguf"])
def loaded(request: pytest.FixtureRequest, family_dir: Path, checkpoint: Checkpoint,
           tmp_path_factory: pytest.TempPathFactory) -> Checkpoint:
    """The family from either file; the GGUF is F32, so its tensors are the directory's exactly."""
    if request.param == "safetensors":
        return checkpoint
    return load_checkpoint(write_gguf(family_dir, tmp_path_factory.mktemp("gguf") / "model.gguf"))


def plain_runner(checkpoint: Checkpoint) -> ModelRunner:
    """The model as LlamaModel builds it: fp32 nn.Linear projections (or GGUF blocks), no prepacking."""
    config = checkpoint.config
    weights = fuse_projections(checkpoint.weights, config)
    model = LlamaModel(config, block_formats(weights))
    model.load_weights(weights)
    cache = allocate_kv_cache(config.num_layers, NUM_BLOCKS, BLOCK_SIZE, config.num_kv_heads, config.head_dim,
                              torch.float32, "cpu")
    return ModelRunner(model.eval(), cache, BLOCK_SIZE, torch.device("cpu"))


@pytest.fixture(scope="module", params=["plain", "default"])
def runner(request: pytest.FixtureRequest, loaded: Checkpoint) -> ModelRunner:
    if request.param == "plain":
        return plain_runner(loaded)
    return ModelRunner.load(loaded, ModelConfig(dtype="float32"),
                            CacheConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE, prefix_caching=False))


def mixed_batch_logits(runner: ModelRunner) -> dict[str, torch.Tensor]:
    """Each request's logits at every position of SEQUENCES, computed in STEPS' batches over scattered blocks."""
    free = iter(range(NUM_BLOCKS - 1, 0, -1))
    blocks = {r: [next(free) for _ in range(-(-n // BLOCK_SIZE))] for r, n in LENGTHS.items()}
    done, rows = dict.fromkeys(LENGTHS, 0), {r: [] for r in LENGTHS}
    for step in STEPS:
        order = sorted(step, key=lambda r: step[r] != 1)
        ids, positions, decode, prefill = [], [], [], []
        for r in order:
            n, start = step[r], done[r]
            ids += SEQUENCES[r][start:start + n]
            positions += range(start, start + n)
            if n == 1:
                decode.append((blocks[r], start + 1))
            else:
                prefill.append((blocks[r], start, n))
        meta = AttentionMetadata.build(BLOCK_SIZE, decode, prefill)
        logits = runner.model(torch.tensor(ids), torch.tensor(positions), runner.cache, meta, torch.arange(len(ids)))
        for r, part in zip(order, logits.split([step[r] for r in order])):
            rows[r].append(part)
            done[r] += step[r]
    return {r: torch.cat(parts) for r, parts in rows.items()}


def hf_logits(hf: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_mixed_batch_logits_equal_transformers(runner: ModelRunner, hf: torch.nn.Module) -> None:
    for r, logits in mixed_batch_logits(runner).items():
        torch.testing.assert_close(logits, hf_logits(hf, SEQUENCES[r]), **TOL)


def test_greedy_ids_equal_transformers(runner: ModelRunner, hf: torch.nn.Module) -> None:
    """Through the engine with an 8-token budget: prompts prefilled in chunks beside the others' decodes."""
    config = SchedulerConfig(scheduler="sarathi", max_num_seqs=4, max_num_batched_tokens=8)
    kv = KVCacheManager(runner.num_blocks, BLOCK_SIZE)
    engine = Engine(scheduler_class("sarathi")(config, kv, runner.model.config.max_context_len), runner,
                    Detokenizer(None))
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = {}
    for r, ids in SEQUENCES.items():
        engine.add_request(Request(r, ids, greedy))
        out[r] = []
    while engine.has_unfinished:
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    for r, ids in SEQUENCES.items():
        expected = list(ids)
        for _ in range(6):
            expected.append(int(hf_logits(hf, expected)[-1].argmax()))
        assert out[r] == expected[len(ids):], r


def test_rope_tables_equal_transformers(checkpoint: Checkpoint, hf: torch.nn.Module) -> None:
    """Exactly: the llama family's `llama3` factors give transformers' inverse frequencies bit for bit."""
    positions = torch.arange(checkpoint.config.max_position_embeddings)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = hf.model.rotary_emb(x, positions[None])
    rope = LlamaModel(checkpoint.config).rope
    half = checkpoint.config.head_dim // 2
    assert torch.equal(rope.cos, cos[0, :, :half]) and torch.equal(rope.sin, sin[0, :, :half])


def test_blocks_compute_like_their_values(checkpoint: Checkpoint, family_dir: Path) -> None:
    """int8 at load: Q8_0 projections (biases added after the kernel) against fp32 ones holding the same values."""
    blocks = load_checkpoint(family_dir, quantization="int8")
    values = Checkpoint(blocks.config, {name: t.dequantize() if isinstance(t, QuantizedTensor) else t
                                        for name, t in blocks.weights.items()}, blocks.tokenizer)
    on_blocks = plain_runner(blocks)
    assert isinstance(on_blocks.model.layers[0].self_attn.qkv_proj, QuantizedLinear)
    expected = mixed_batch_logits(plain_runner(values))
    for r, logits in mixed_batch_logits(on_blocks).items():
        torch.testing.assert_close(logits, expected[r], **TOL)


def test_export_loads_in_transformers_as_the_original(checkpoint: Checkpoint, hf: torch.nn.Module,
                                                      tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    if checkpoint.config.rope_freq_factors is not None:  # llama: llama3 scaling has no config.json form from factors
        with pytest.raises(ValueError, match="RoPE frequency factors"):
            export_safetensors(checkpoint, tmp_path)
        assert not any(tmp_path.iterdir())
        return
    export_safetensors(checkpoint, tmp_path)
    assert load_checkpoint(tmp_path).config == checkpoint.config
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(exported) is type(hf)
    ids = SEQUENCES["a"]
    torch.testing.assert_close(hf_logits(exported, ids), hf_logits(hf, ids), rtol=0, atol=0)


# ---- config.json variants ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_family("llama", tmp_path_factory.mktemp("llama"))


def patched(source: Path, directory: Path, drop: tuple[str, ...] = (), **changes: object) -> Path:
    """A copy of the model directory `source` whose config.json lacks `drop` and has `changes`."""
    shutil.copytree(source, directory, dirs_exist_ok=True)
    raw = json.loads((source / "config.json").read_text())
    raw = {k: v for k, v in raw.items() if k not in drop} | changes
    (directory / "config.json").write_text(json.dumps(raw))
    return directory


LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 64}


@pytest.mark.parametrize("type_key", ["rope_type", "type"])
def test_llama31_hub_config_gives_the_rope_parameters_factors(llama_dir: Path, tmp_path: Path, type_key: str) -> None:
    """Hub config.json files of Llama 3.1 say top-level rope_theta and rope_scaling (older ones `type`)."""
    old = patched(llama_dir, tmp_path, drop=("rope_parameters",), rope_theta=500000.0,
                  rope_scaling=LLAMA31_SCALING | {type_key: "llama3"})
    config = load_checkpoint(old).config
    assert config == load_checkpoint(llama_dir).config
    assert config.rope_theta == 500000.0 and config.rope_freq_factors[0] == 1.0 and config.rope_freq_factors[-1] == 8.0


def test_linear_rope_scaling_equals_transformers(llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    directory = patched(llama_dir, tmp_path, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                              "rope_theta": 10000.0})
    config = load_checkpoint(directory).config
    assert config.rope_freq_factors == (4.0,) * (config.head_dim // 2)
    positions = torch.arange(config.max_position_embeddings)
    cos, _ = LlamaRotaryEmbedding(AutoConfig.from_pretrained(directory))(torch.zeros(1), positions[None])
    rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.max_position_embeddings, config.rope_freq_factors)
    assert torch.equal(rope.cos, cos[0, :, :config.head_dim // 2])


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gemma2"}, "model_type 'gemma2' is not supported; supported: llama, mistral, qwen2, qwen3"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "RoPE scaling 'yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "RoPE scaling 'dynamic'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_unsupported_configs_are_named(llama_dir: Path, tmp_path: Path, changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_checkpoint(patched(llama_dir, tmp_path, **changes))


@pytest.mark.parametrize("family,changes,window", [
    ("mistral", {"sliding_window": 64}, 64),
    ("mistral", {"sliding_window": None}, None),  # Mistral v0.2 on
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1}, 64),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 28}, None),  # no layer slides
    ("qwen2", {"use_sliding_window": False, "sliding_window": 64}, None),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 64, "layer_types": ["full_attention",
                                                                                 "sliding_attention"]}, 64),
])
def test_sliding_window_where_the_config_turns_it_on(tmp_path: Path, family: str, changes: dict,
                                                     window: int | None) -> None:
    source = save_family(family, tmp_path / "source")
    drop = ("layer_types",) if "layer_types" not in changes else ()
    config = load_checkpoint(patched(source, tmp_path / "patched", drop=drop, **changes)).config
    assert config.sliding_window == window
    assert config.max_context_len == (window or config.max_position_embeddings)


def test_sliding_window_caps_the_engine_context(tmp_path: Path) -> None:
    """pacer attends to whole contexts, so it serves none longer than the window, and says so."""
    directory = patched(save_family("mistral", tmp_path / "source"), tmp_path / "patched", sliding_window=64)
    options = {"model": str(directory), "dtype": "float32", "num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE,
               "latency_profile": "none"}
    engine, _ = build_engine(EngineConfig.from_kwargs(**options))
    assert engine.scheduler.max_model_len == 64
    with pytest.raises(ValueError, match="max_model_len 100 exceeds the model's context of 64 tokens .*sliding window"):
        build_engine(EngineConfig.from_kwargs(**options, max_model_len=100))
