"""A served model's memory levels off however many batch sizes it sees: oneDNN's per-shape caches are bounded."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pacer.memory import SHAPE_CACHE_CAPACITY, bound_shape_caches

ROOT = Path(__file__).resolve().parents[1]
VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")

# In a fresh process (both caches are sized at their first use): load the tiny model as the server does, then run
# the packed LM head over 300 row counts, one batch size each, then over 300 more, and report how much glibc's heap
# grew over each half.
PROBE = """
import ctypes, json, torch
from pacer.config import CacheConfig, ModelConfig
from pacer.model import llama
from pacer.model.runner import ModelRunner
from tests.model.test_layers import tiny_checkpoint

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
torch.set_num_threads(1)
runner = ModelRunner.load(tiny_checkpoint(), ModelConfig(dtype="float32"), CacheConfig(num_blocks=8, block_size=4))
head = runner.model.lm_head
assert isinstance(head, llama.PackedLinear), type(head)
in_use = lambda: libc.mallinfo2().uordblks + libc.mallinfo2().hblkhd
with torch.inference_mode():
    head(torch.randn(1, head.in_features))
    sizes = [in_use()]
    for first in (2, 302):
        for rows in range(first, first + 300):
            head(torch.randn(rows, head.in_features))
        sizes.append(in_use())
print(json.dumps([(after - before) / 2**20 for before, after in zip(sizes, sizes[1:])]))
"""


def test_the_operators_capacity_wins(monkeypatch):
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert bound_shape_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(SHAPE_CACHE_CAPACITY),
                                    "LRU_CACHE_CAPACITY": "7"}


def _growth_mib(env: dict[str, str]) -> list[float]:
    result = subprocess.run([sys.executable, "-c", PROBE], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_a_loaded_model_stops_growing_with_new_batch_sizes():
    """600 batch sizes through one packed projection. With oneDNN's and ideep's default 1,024 entries a cache, the
    heap grew as much over the second 300 as over the first (~80 MiB each here): as a server's does for as long as
    new batch sizes come. Bounded, the caches are full within the first 300, and the next 300 add nothing."""
    try:
        has_mallinfo2 = hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")
    except OSError:  # not glibc
        has_mallinfo2 = False
    if not has_mallinfo2:
        pytest.skip("glibc's mallinfo2 (2.33+) measures the heap; this libc has none")
    import torch

    from pacer.model import llama

    if not llama.PackedLinear.available(torch.device("cpu"), torch.float32):
        pytest.skip("no oneDNN prepacked projections in this torch: nothing is cached per shape")
    first, more = _growth_mib({name: value for name, value in os.environ.items() if name not in VARIABLES})
    assert more < 8, (first, more)
