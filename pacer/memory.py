"""Bound the per-shape caches of oneDNN, which pacer's prepacked CPU projections use, so a server's memory levels off.

oneDNN keeps every primitive it builds in an LRU cache, and ideep (torch's wrapper around it) keeps its own; both
default to 1,024 entries and key an entry by the input's shape. A serving batch has a new row count at almost every
iteration (decodes plus a prefill chunk of any length), so each projection shape adds entries of ~200-300 KB each,
in each cache, until both hold 1,024: hundreds of MiB that grow for as long as new batch sizes keep coming, which
looked like a leak in issue 35's soak (benchmarks/log/2026-12-06-soak.md).
"""

from __future__ import annotations

import os

# Entries per cache. The decode batches that recur every iteration stay hot in the LRU (a few sizes per projection
# shape); a prefill chunk of a rare length is rebuilt, a small cost beside the chunk's own GEMM.
SHAPE_CACHE_CAPACITY = 128
_CAPACITY_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's


def bound_shape_caches(capacity: int = SHAPE_CACHE_CAPACITY) -> dict[str, str]:
    """Set both caches' capacity, unless the environment already does (the operator's value wins). Both libraries
    read it when they first build a primitive, so call this before the process's first oneDNN operation. Returns
    the capacities in force."""
    for name in _CAPACITY_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in _CAPACITY_VARIABLES}
