"""Build a real Engine from an EngineConfig: checkpoint -> model runner + KV pool -> scheduler."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from pacer.config import EngineConfig
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.engine.profile import resolve_latency_model, warm_up
from pacer.kv import KVCacheManager
from pacer.model.quant import resolve_quantization
from pacer.model.runner import ModelRunner, resolve_dtype
from pacer.model.tokenizer import Tokenizer
from pacer.model.weights import load_checkpoint, resolve_model_path
from pacer.scheduling import scheduler_class
from pacer.speculation.drafter import NgramDrafter

logger = logging.getLogger(__name__)


def profile_key(path: Path, runner: ModelRunner, device: str) -> dict[str, object]:
    """What a latency profile is valid for: the model file and its family, dtype, quantization, device, torch's thread
    count and the kernels (a profile measured with slower kernels overstates every iteration)."""
    size = path.stat().st_size if path.is_file() else "dir"
    return {"model": f"{path.name}-{size}", "family": runner.model.config.architecture, "dtype": str(runner.dtype).removeprefix("torch."),
            "quantization": runner.quantization, "device": device, "threads": torch.get_num_threads(),
            "kernels": runner.kernels}


def build_engine(config: EngineConfig) -> tuple[Engine, Tokenizer]:
    policy = scheduler_class(config.scheduler.scheduler)  # fail on a bad name before loading anything
    start = time.perf_counter()
    path = resolve_model_path(config.model.model)
    dtype = resolve_dtype(config.model.dtype, config.model.device)
    quantization = resolve_quantization(config.model.quantization, config.model.device, dtype)
    checkpoint = load_checkpoint(path, dtype, quantization)
    runner = ModelRunner.load(checkpoint, config.model, config.cache)
    limit = checkpoint.config.max_context_len
    capped = limit < checkpoint.config.max_position_embeddings
    if capped:
        logger.info("contexts capped at the model's sliding window, %d tokens (of %d positions)", limit,
                    checkpoint.config.max_position_embeddings)
    max_model_len = config.scheduler.max_model_len or limit
    if max_model_len > limit:
        window = " (its sliding window: pacer attends to whole contexts, so serves none longer)" if capped else ""
        raise ValueError(f"max_model_len {max_model_len} exceeds the model's context of {limit} tokens{window}")
    runner.capture_decode_graphs(config.scheduler.max_num_seqs, max_model_len)
    kv = KVCacheManager(runner.num_blocks, config.cache.block_size, config.cache.prefix_caching)
    logger.info("loaded %s in %.1f s (%s, %s): weights %.1f MB in memory, quantization %s", path.name,
                time.perf_counter() - start, runner.dtype, config.model.device, runner.weight_bytes / 1e6,
                runner.quantization)
    warm_up(runner, kv, checkpoint.config.vocab_size)
    key = profile_key(path, runner, config.model.device)
    speculative = config.speculative
    # drafts are sized by predicted goodput, so speculation wants a latency model as the `slo` policy does
    latency = resolve_latency_model(config.latency.latency_profile, runner, kv, checkpoint.config.vocab_size,
                                    max_model_len, key,
                                    required=policy.needs_latency_model or speculative.speculation != "off")
    scheduler = policy(config.scheduler, kv, max_model_len, eos_token_id=checkpoint.tokenizer.eos_token_id,
                       latency=latency)
    logger.info("scheduler %s, token budget %d, latency model %s", config.scheduler.scheduler,
                scheduler.token_budget, "on" if latency else "off")
    drafter = NgramDrafter(speculative.num_speculative_tokens) if speculative.speculation == "ngram" else None
    if drafter is not None:
        logger.info("speculative decoding: n-gram drafts of up to %d tokens", speculative.num_speculative_tokens)
    return Engine(scheduler, runner, Detokenizer(checkpoint.tokenizer), drafter=drafter), checkpoint.tokenizer
