"""A tiny random-weight model of the real architecture, and an engine around it (no tokenizer)."""

from __future__ import annotations

from dataclasses import replace

import torch

from pacer.config import SchedulerConfig
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.latency.model import LatencyModel
from pacer.model.attention import allocate_kv_cache
from pacer.model.config import LlamaConfig
from pacer.model.llama import LlamaModel
from pacer.model.runner import ModelRunner
from pacer.scheduling import Scheduler, SchedulerOutput, scheduler_class
from pacer.speculation.drafter import NgramDrafter
from pacer.speculation.length import DraftRow, draft_lengths

TINY = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
                   bos_token_id=1, eos_token_id=2)


def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> LlamaModel:
    torch.manual_seed(seed)
    model = LlamaModel(TINY).to(dtype)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than nn's default: sharper, more varied logits
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    model.rope.reset(None)
    return model.eval()


def tiny_runner(num_blocks: int = 64, block_size: int = 4, dtype: torch.dtype = torch.float32,
                model: LlamaModel | None = None) -> ModelRunner:
    model = model or tiny_model(dtype)
    dtype = model.embed_tokens.weight.dtype
    cache = allocate_kv_cache(TINY.num_layers, num_blocks, block_size, TINY.num_kv_heads, TINY.head_dim, dtype,
                              torch.device("cpu"))
    return ModelRunner(model, cache, block_size, torch.device("cpu"))


def tiny_engine(policy: str = "sarathi", num_blocks: int = 64, block_size: int = 4, budget: int | None = 16,
                max_num_seqs: int = 8, model: LlamaModel | None = None, prefix_caching: bool = False,
                num_speculative_tokens: int = 0, latency: LatencyModel | None = None) -> Engine:
    """With `num_speculative_tokens`, n-gram drafts of up to that many tokens (`--speculation ngram`)."""
    runner = tiny_runner(num_blocks, block_size, model=model)
    config = SchedulerConfig(scheduler=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    scheduler = scheduler_class(policy)(config, KVCacheManager(num_blocks, block_size, prefix_caching),
                                        TINY.max_position_embeddings, eos_token_id=TINY.eos_token_id,
                                        latency=latency)
    drafter = NgramDrafter(num_speculative_tokens) if num_speculative_tokens else None
    if drafter is not None and latency is None:
        scheduler.draft_lengths = lambda rows, plan, context: every_draft(scheduler, rows, plan)
    return Engine(scheduler, runner, Detokenizer(None), drafter=drafter)


def every_draft(scheduler: Scheduler, rows: list[DraftRow], plan: SchedulerOutput) -> list[int]:
    """Every draft that fits the budget, whatever the acceptance rate: these tests check that verification is exact,
    so they want verify rows at every step (the length policy has its own tests, in tests/speculation)."""
    budget = scheduler.token_budget - plan.total_num_scheduled_tokens
    return draft_lengths([replace(row, rate=1.0) for row in rows], plan.shape, 0, budget)
