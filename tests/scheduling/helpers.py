"""Build a real scheduler on a small block pool and feed it fabricated model outputs."""

from __future__ import annotations

from collections.abc import Callable

from pacer.config import SchedulerConfig
from pacer.kv import KVCacheManager
from pacer.latency.model import LatencyModel, LinearLatencyModel
from pacer.request import Request, SamplingParams
from pacer.scheduling import ModelOutput, Scheduler, SchedulerOutput, scheduler_class

EOS = 2


def make_scheduler(policy: str = "sarathi", num_blocks: int = 64, block_size: int = 4, budget: int | None = 16,
                   max_num_seqs: int = 8, max_model_len: int = 256, latency: LatencyModel | None = None,
                   drop_expired: bool = False, prefix_caching: bool = False) -> Scheduler:
    config = SchedulerConfig(scheduler=policy, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             drop_expired=drop_expired)
    return scheduler_class(policy)(config, KVCacheManager(num_blocks, block_size, prefix_caching), max_model_len,
                                   eos_token_id=EOS, latency=latency)


def curved() -> LinearLatencyModel:
    """10 ms + 0.5 ms a token + a hinge at 64 tokens + attention and decode-context terms, so chunk sizes vary with
    the decodes beside them."""
    return LinearLatencyModel([0.010, 0.0005, 0.0003, 0.0002, 1e-7, 0.0, 2e-7], (64,))


def make_request(rid: str, prompt_len: int, max_tokens: int = 4, arrival_s: float = 0.0, **sampling) -> Request:
    return Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(max_tokens=max_tokens, **sampling),
                   arrival_s=arrival_s)


Accept = Callable[[Request, list[int]], int]  # how many of a verify row's drafts the fake model accepts


def fake_output(plan: SchedulerOutput, token: int = 7, accept: Accept | None = None) -> ModelOutput:
    """Every request that reaches its last token samples `token`; a verify row first accepts `accept(request,
    drafts)` of its drafts (none without `accept`)."""
    accepted = {}
    if accept is not None:
        requests = {r.request_id: r for r in plan.requests}
        accepted = {rid: drafts[:accept(requests[rid], drafts)] for rid, drafts in plan.draft_token_ids.items()}
    return ModelOutput({r.request_id: token for r in plan.requests if plan.samples(r)}, accepted_draft_ids=accepted)


def propose(scheduler: Scheduler, drafts: list[int]) -> None:
    """What the engine's drafter does before each plan: here, the same drafts for every running decode."""
    for r in scheduler.running:
        r.spec_token_ids = [] if r.is_prefilling else list(drafts)


def check_invariants(scheduler: Scheduler) -> None:
    kv = scheduler.kv
    holders = [b for r in scheduler.running for b in r.block_ids]  # a cached prefix block has several
    assert kv.pool.num_free + len(set(holders)) == kv.num_blocks, "leaked or double-counted KV blocks"
    assert all(kv.pool.ref_counts[b] == holders.count(b) for b in set(holders)), "a ref count is off"
    assert all(not r.block_ids for r in scheduler.waiting), "a waiting request holds blocks"
    assert len(scheduler.running) <= scheduler.max_num_seqs
    for r in scheduler.running:
        # exactly the blocks its computed tokens fill: none left reserved for a rejected draft
        assert len(r.block_ids) == kv.blocks_for(r.num_computed_tokens), f"request {r.request_id} holds extra KV"


def step(scheduler: Scheduler, now: float = 0.0, token: int = 7, drafts: list[int] | None = None,
         accept: Accept | None = None) -> tuple[SchedulerOutput, list[Request]]:
    """One iteration with fabricated outputs; with `drafts`, every running decode proposes them first."""
    if drafts:
        propose(scheduler, drafts)
    plan = scheduler.schedule(now)
    assert plan.total_num_scheduled_tokens <= scheduler.token_budget
    assert plan.total_num_scheduled_tokens == sum(plan.num_scheduled_tokens.values())
    assert plan.shape == plan.recount_shape(), "the plan's incremental batch shape drifted"
    for r in plan.requests:  # KV is reserved for every scheduled token, drafts included
        assert len(r.block_ids) * scheduler.kv.block_size >= r.num_computed_tokens + plan.num_scheduled_tokens[
            r.request_id]
    finished = scheduler.update(plan, fake_output(plan, token, accept), now)
    check_invariants(scheduler)
    return plan, finished
