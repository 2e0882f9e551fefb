"""Time the real executor over a grid of batch shapes and fit a `LinearLatencyModel` (`pacer profile`).

The grid covers what a serving iteration holds: prefill chunks at several earlier contexts, decode
batches at several contexts, and decodes mixed with a chunk. Each shape runs `repeats` times and
the median counts; the time is the executor's own `elapsed_s`, the same figure the engine feeds
back online, so the profile and the online correction measure one thing.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pacer.config import ModelConfig
from pacer.engine.engine import Engine
from pacer.engine.executor import Executor
from pacer.kv import KVCacheManager
from pacer.latency.model import BatchShape, LinearLatencyModel
from pacer.request import Request, SamplingParams
from pacer.scheduling import SchedulerOutput

logger = logging.getLogger(__name__)

# One batch: (tokens this iteration, tokens already cached) per request.
Batch = list[tuple[int, int]]
KNOTS = (2, 16, 64)  # hinges in total batch tokens (batch 1 is a GEMV); see `latency.model._features`


@dataclass(frozen=True)
class ProfileGrid:
    chunks: tuple[int, ...] = (16, 32, 64, 128, 256, 512)
    chunk_contexts: tuple[int, ...] = (0, 512, 1536)
    decode_batches: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    decode_contexts: tuple[int, ...] = (128, 512, 1536)
    # (decodes, chunk): serving mixes mostly a few decodes with one chunk
    mixed: tuple[tuple[int, int], ...] = ((1, 64), (1, 256), (2, 128), (4, 64), (4, 256), (16, 128), (16, 512), (32, 32))
    mixed_context: int = 256
    repeats: int = 5

    def batches(self, max_tokens: int, max_model_len: int) -> list[Batch]:
        """Every batch of the grid, contexts cut to fit the model's context; those the KV cache
        (`max_tokens`) cannot hold are left out."""
        def fit(n: int, ctx: int) -> tuple[int, int]:
            return n, max(0, min(ctx, max_model_len - n))

        out: list[Batch] = []
        out += [[fit(n, ctx)] for ctx in self.chunk_contexts for n in self.chunks if n <= max_model_len]
        out += [[fit(1, ctx)] * b for ctx in self.decode_contexts for b in self.decode_batches]
        out += [[fit(1, self.mixed_context)] * d + [fit(n, self.mixed_context)] for d, n in self.mixed
                if n <= max_model_len]
        return [b for b in out if sum(n + ctx for n, ctx in b) <= max_tokens]


QUICK_GRID = ProfileGrid(chunks=(16, 64, 256, 512), chunk_contexts=(0, 1024), decode_batches=(1, 2, 4, 16, 48),
                         decode_contexts=(128, 1024), mixed=((1, 128), (4, 128), (16, 256)), repeats=3)


def time_batch(executor: Executor, kv: KVCacheManager, batch: Batch, vocab_size: int) -> float:
    """The executor's time for one plan holding `batch`; its KV blocks are freed afterwards."""
    requests = []
    for i, (n, ctx) in enumerate(batch):
        request = Request(f"profile-{i}", [(7 * i + j) % vocab_size for j in range(ctx + n)],
                          SamplingParams(max_tokens=1, temperature=0))
        kv.allocate(request, ctx + n)
        request.num_computed_tokens = ctx
        requests.append(request)
    plan = SchedulerOutput(requests=requests, num_scheduled_tokens={r.request_id: n for r, (n, _) in
                                                                      zip(requests, batch)},
                           total_num_scheduled_tokens=sum(n for n, _ in batch))
    plan.shape = _shape(batch)
    try:
        return executor.execute(plan).elapsed_s
    finally:
        for request in requests:
            kv.free(request)


def warm_up(executor: Executor, kv: KVCacheManager, vocab_size: int) -> None:
    """Run a prefill chunk and a decode batch once, so that the first served iteration is not the one that
    allocates and builds (it took up to 2x its predicted time). A slow first iteration would also sit in the
    latency model's error window and inflate its planning margin for hundreds of iterations after."""
    for batch in ([(64, 0)], [(1, 64)] * 4):
        if sum(n + ctx for n, ctx in batch) <= kv.capacity_tokens:
            time_batch(executor, kv, batch, vocab_size)


def profile(executor: Executor, kv: KVCacheManager, vocab_size: int, max_model_len: int, grid: ProfileGrid,
            key: dict[str, Any], progress: Callable[[int, int], None] | None = None) -> LinearLatencyModel:
    """Time every batch of the grid and fit; the fit's error on the grid is in `fit_error`."""
    batches = grid.batches(kv.capacity_tokens, max_model_len)
    shapes = [_shape(batch) for batch in batches]
    # Rounds over the whole grid rather than repeats in a row: a slow spell of the machine then
    # lands on one sample of many shapes, and the median per shape drops it.
    runs: list[list[float]] = [[] for _ in batches]
    start = time.perf_counter()
    for round_ in range(grid.repeats):
        for i, batch in enumerate(batches):
            runs[i].append(time_batch(executor, kv, batch, vocab_size))
            if progress is not None:
                progress(round_ * len(batches) + i + 1, grid.repeats * len(batches))
    times = [statistics.median(r) for r in runs]
    model = LinearLatencyModel.fit(shapes, times, KNOTS, key)
    model.key["profile_s"] = round(time.perf_counter() - start, 1)
    model.key["num_shapes"] = len(batches)
    logger.info("latency profile: %d shapes in %.1f s, fit error p50 %.1f%% p90 %.1f%% max %.1f%%", len(batches),
                time.perf_counter() - start, 100 * model.fit_error["p50"], 100 * model.fit_error["p90"],
                100 * model.fit_error["max"])
    return model


def _shape(batch: Batch) -> BatchShape:
    shape = BatchShape()
    for n, ctx in batch:
        shape = shape.with_chunk(n, ctx)
    return shape


def default_profile_path(key: dict[str, Any]) -> Path:
    """~/.cache/pacer/profiles/<model>-<dtype>[-<quantization>]-<device>-t<threads>.json: one file per measured
    setup."""
    quantization = key.get("quantization", "none")
    dtype = key["dtype"] if quantization == "none" else f"{key['dtype']}-{quantization}"
    name = f"{key['model']}-{dtype}-{key['device']}-t{key['threads']}.json".replace("/", "_")
    return Path.home() / ".cache" / "pacer" / "profiles" / name


def resolve_latency_model(setting: str, executor: Executor, kv: KVCacheManager, vocab_size: int,
                          max_model_len: int, key: dict[str, Any], required: bool) -> LinearLatencyModel | None:
    """--latency-profile: a path loads that profile; `none` gives none (an error if the scheduler needs
    one); `auto` loads the cached profile for `key`, or measures QUICK_GRID and caches it if `required`
    (also when the cached one was measured on another setup, e.g. before an engine upgrade)."""
    if setting == "none":
        if required:
            raise ValueError("the slo scheduler and speculative decoding plan with a latency model: --latency-profile none is not "
                             "allowed with them")
        return None
    if setting != "auto":
        model = LinearLatencyModel.load(Path(setting))
        if any(model.key.get(k) != v for k, v in key.items() if k in model.key):
            logger.warning("latency profile %s was measured on %s, this engine is %s", setting, model.key, key)
        return model
    path = default_profile_path(key)
    if path.exists():
        cached = LinearLatencyModel.load(path)
        if all(cached.key.get(k) == v for k, v in key.items()):
            logger.info("latency profile: %s", path)
            return cached
        logger.info("cached latency profile %s was measured on %s: measuring again", path, cached.key)
    if not required:
        return None
    logger.info("no latency profile cached for %s: measuring one (run `pacer profile` to do it ahead)", key)
    model = profile(executor, kv, vocab_size, max_model_len, QUICK_GRID, dict(key))
    model.save(path)
    return model


def profile_engine(engine: Engine, model_config: ModelConfig, grid: ProfileGrid,
                   progress: Callable[[int, int], None] | None = None) -> LinearLatencyModel:
    """`profile` on a built engine's executor and KV pool (`pacer profile`)."""
    from pacer.engine.builder import profile_key
    from pacer.model.weights import resolve_model_path

    runner = engine.executor
    key = profile_key(resolve_model_path(model_config.model), runner, model_config.device)
    vocab = runner.model.embed_tokens.num_embeddings
    return profile(runner, engine.scheduler.kv, vocab, engine.scheduler.max_model_len, grid, key, progress)
