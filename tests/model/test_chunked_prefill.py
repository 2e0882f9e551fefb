"""Chunked prefill must give the logits of one-shot prefill (fp32), whatever the chunk and block size."""

from __future__ import annotations

import pytest
import torch

from pacer.model.attention import AttentionMetadata, allocate_kv_cache
from tests.tiny import TINY, tiny_model

PROMPT = [(7 * i + 3) % TINY.vocab_size for i in range(45)]


def logits_in_chunks(model, chunk: int, block_size: int) -> torch.Tensor:
    """Logits at every position when the prompt is prefilled `chunk` tokens at a time."""
    cache = allocate_kv_cache(TINY.num_layers, 64, block_size, TINY.num_kv_heads, TINY.head_dim, torch.float32, "cpu")
    blocks = list(range(63, 0, -2))[: -(-len(PROMPT) // block_size)]  # scattered, descending physical ids
    rows = []
    for start in range(0, len(PROMPT), chunk):
        n = min(chunk, len(PROMPT) - start)
        if n == 1:
            meta = AttentionMetadata.build(block_size, decode=[(blocks, start + 1)])
        else:
            meta = AttentionMetadata.build(block_size, prefill=[(blocks, start, n)])
        positions = torch.arange(start, start + n)
        rows.append(model(torch.tensor(PROMPT[start:start + n]), positions, cache, meta, torch.arange(n)))
    return torch.cat(rows)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("block_size", [4, 16, 5])
@pytest.mark.parametrize("chunk", [1, 3, 8, 16, 17])
def test_chunked_equals_one_shot(model, chunk, block_size):
    one_shot = logits_in_chunks(model, len(PROMPT), block_size)
    chunked = logits_in_chunks(model, chunk, block_size)
    assert (chunked - one_shot).abs().max().item() <= 1e-4
