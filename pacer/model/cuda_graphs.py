"""CUDA graphs of decode-only iterations.

On a GPU a decode step of a small model is about a thousand kernel launches, and each launch costs more than its
kernel, so the step takes the same time whatever the batch. A captured graph replays them all as one launch, as
vLLM, SGLang and gpt-fast do. Graphs have fixed shapes, so they are captured at start-up for padded batch sizes
and, since decode attention gathers each request's blocks, for bucketed block-table widths; a step runs the
smallest graph that holds it, or eagerly if none does. Padding rows write their KV into a block reserved for them
and attend to it alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch

from pacer.model.attention import AttentionMetadata, KVCache
from pacer.model.llama import LlamaModel

logger = logging.getLogger(__name__)

# Decode attention gathers each request's blocks into dense fp32 K and V (attention.py, `_decode_reference`), so a
# graph's memory grows with batch x width; graphs beyond this many gathered tokens are not captured (their steps,
# the largest, run eagerly, where launches matter least). SmolLM2: 2 x 400 MB of K and V at the limit.
MAX_GATHERED_TOKENS = 2**18


def _sizes(largest: int, smallest: tuple[int, ...]) -> list[int]:
    """`smallest`, then doubling, up to and including `largest`."""
    sizes = [s for s in smallest if s < largest]
    while sizes and sizes[-1] * 2 < largest:
        sizes.append(sizes[-1] * 2)
    return [*sizes, largest]


class DecodeGraphs:
    """One captured forward pass per (batch size, block-table width), sharing one memory pool and one set of static
    inputs; `run` copies a step's inputs in and replays. Every tensor a graph reads lives as long as this object:
    a graph holds addresses, not references."""

    def __init__(self, model: LlamaModel, cache: KVCache, block_size: int, max_batch: int, max_blocks: int,
                 null_block: int) -> None:
        self.block_size = block_size
        self.null_block = null_block
        self.batch_sizes = _sizes(max_batch, (1, 2, 4, 8))
        self.widths = _sizes(max_blocks, (4,))
        device = cache.k[0].device
        rows, cols = self.batch_sizes[-1], self.widths[-1]
        long, int32 = {"dtype": torch.long, "device": device}, {"dtype": torch.int32, "device": device}
        self._input_ids = torch.zeros(rows, **long)
        self._positions = torch.zeros(rows, **long)
        self._slots = torch.full((rows,), null_block * block_size, **long)
        self._tables = torch.full((rows, cols), null_block, **int32)
        self._context_lens = torch.ones(rows, **int32)
        self._rows = torch.arange(rows, **long)  # every row samples; a graph reads this memory at each replay
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        start = time.perf_counter()
        pool = None
        for width in reversed(self.widths):  # largest first: the pool is sized once, the rest fit in it
            for batch in reversed(self.batch_sizes):
                if batch * width * block_size > MAX_GATHERED_TOKENS:
                    continue
                graph, logits = self._capture(model, cache, batch, width, pool)
                pool = graph.pool()
                self._graphs[batch, width] = (graph, logits)
        logger.info("captured %d CUDA graphs of decode steps (batch up to %d, context up to %d tokens, at most %d "
                    "tokens gathered) in %.1f s", len(self._graphs), rows, cols * block_size, MAX_GATHERED_TOKENS,
                    time.perf_counter() - start)

    def _capture(self, model: LlamaModel, cache: KVCache, batch: int, width: int,
                 pool: object) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        meta = AttentionMetadata(self._slots[:batch], batch, self._tables[:batch, :width], self._context_lens[:batch],
                                 [])
        args = (self._input_ids[:batch], self._positions[:batch], cache, meta, self._rows[:batch])
        side = torch.cuda.Stream()  # warm up off the capturing stream, as torch's docs ask
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = model(*args)
        return graph, logits

    def run(self, input_ids: Sequence[int], positions: Sequence[int],
            decode: Sequence[tuple[Sequence[int], int]]) -> torch.Tensor | None:
        """Logits [len(decode), V] of a decode-only step (one token per request, each sampling), or None if no
        graph holds it. decode: (block_ids, context length including the new token) per request."""
        n, bs = len(decode), self.block_size
        batch = next((b for b in self.batch_sizes if b >= n), None)
        need = max(math.ceil(context / bs) for _, context in decode)
        width = next((w for w in self.widths if w >= need), None)
        if (batch, width) not in self._graphs:  # the smallest that holds it: no larger one was captured either
            return None
        pad, null = batch - n, self.null_block
        slots = [blocks[(c - 1) // bs] * bs + (c - 1) % bs for blocks, c in decode] + [null * bs] * pad
        tables = [list(blocks[:width]) + [null] * (width - len(blocks[:width])) for blocks, _ in decode]
        tables += [[null] * width] * pad
        self._input_ids[:batch].copy_(torch.tensor([*input_ids, *[0] * pad]))
        self._positions[:batch].copy_(torch.tensor([*positions, *[0] * pad]))
        self._slots[:batch].copy_(torch.tensor(slots))
        self._tables[:batch, :width].copy_(torch.tensor(tables, dtype=torch.int32))
        self._context_lens[:batch].copy_(torch.tensor([c for _, c in decode] + [1] * pad, dtype=torch.int32))
        graph, logits = self._graphs[batch, width]
        graph.replay()
        return logits[:n]
