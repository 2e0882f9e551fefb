"""Speculative decoding on the real engine (tiny random-weight model): greedy output is the same with n-gram drafts
as without, whatever the policy, chunking, KV pressure or stop condition, and the KV comes back whole."""

from __future__ import annotations

import random

import pytest

from pacer.request import Request, SamplingParams
from tests.scheduling.helpers import curved
from tests.tiny import TINY, tiny_engine, tiny_model


def repetitive_prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a phrase, so drafts have something to continue (the tiny model loops, too)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        phrase = [rng.randrange(3, TINY.vocab_size) for _ in range(rng.randint(2, 6))]
        filler = [rng.randrange(3, TINY.vocab_size) for _ in range(rng.randint(0, 8))]
        prompts.append((phrase + filler) * rng.randint(1, 3) + phrase[:rng.randint(1, len(phrase))])
    return prompts


def run(engine, prompts, params: SamplingParams, stagger: int = 1,
        last_sizes: dict[str, int] | None = None) -> tuple[dict[str, list[int]], list[int]]:
    """Outputs per request, and [drafts, draft tokens, accepted tokens] over the run; `last_sizes` gets how many
    tokens each request's final output brought."""
    pending = [Request(str(i), p, params) for i, p in enumerate(prompts)]
    out: dict[str, list[int]] = {r.request_id: [] for r in pending}
    counts = [0, 0, 0]
    steps = 0
    while pending or engine.has_unfinished:
        if pending and steps % stagger == 0:
            engine.add_request(pending.pop(0))
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
            if o.finished and last_sizes is not None:
                last_sizes[o.request_id] = len(o.new_token_ids)
        stats = engine.last_iteration
        if stats is not None:
            counts = [counts[0] + stats.num_drafts, counts[1] + stats.num_draft_tokens,
                      counts[2] + stats.num_accepted_tokens]
        steps += 1
        assert steps < 5000
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks, "leaked KV blocks"
    return out, counts


GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model) -> dict[str, list[int]]:
    return run(tiny_engine("orca", budget=512, model=model), repetitive_prompts(8), GREEDY)[0]


@pytest.mark.parametrize(("policy", "budget"), [("fcfs", 128), ("orca", 128), ("sarathi", 16), ("sarathi", 128),
                                                ("slo", 16)])
def test_greedy_output_is_the_same_with_drafts(model, reference, policy, budget):
    engine = tiny_engine(policy, budget=budget, model=model, num_speculative_tokens=4,
                         latency=curved() if policy == "slo" else None)
    out, (num_drafts, num_draft_tokens, num_accepted) = run(engine, repetitive_prompts(8), GREEDY)
    assert out == reference
    assert num_drafts > 0 and 0 < num_accepted < num_draft_tokens  # some drafts accepted, some rejected


@pytest.mark.parametrize("block_size", [1, 4])
def test_preemption_with_drafts_changes_nothing(model, reference, block_size):
    engine = tiny_engine("sarathi", num_blocks=-(-100 // block_size), block_size=block_size, budget=24,
                         model=model, num_speculative_tokens=4, prefix_caching=True)
    out, (_, _, num_accepted) = run(engine, repetitive_prompts(8), GREEDY)
    assert out == reference
    assert engine.scheduler.num_preemptions > 0 and num_accepted > 0


def test_stops_inside_accepted_drafts(model, reference):
    """max_tokens and stop token ids cut the output where they would without drafts."""
    prompts = repetitive_prompts(8)
    for max_tokens in (2, 5, 11):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        out, _ = run(tiny_engine(model=model, num_speculative_tokens=4), prompts, params)
        assert out == {rid: ids[:max_tokens] for rid, ids in reference.items()}
    num_multi = 0
    for rid, ids in reference.items():
        # stop at the token after its longest run of one token (drafts continue runs), else at the last
        ends = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1] and ids.index(ids[i]) == i]
        stop = ids[max(ends, key=lambda i: run_length(ids, i))] if ends else ids[-1]
        params = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop], ignore_eos=True)
        last_sizes: dict[str, int] = {}
        out, _ = run(tiny_engine(model=model, num_speculative_tokens=4), [prompts[int(rid)]], params,
                     last_sizes=last_sizes)
        assert out["0"] == ids[:ids.index(stop) + 1]
        num_multi += last_sizes["0"] > 1
    assert num_multi > 0, "no stop came in a step with accepted drafts"


def run_length(ids: list[int], end: int) -> int:
    """How many equal tokens come just before ids[end]."""
    n = 1
    while end - n - 1 >= 0 and ids[end - n - 1] == ids[end - 1]:
        n += 1
    return n


def test_seeded_sampling_is_the_same_with_drafts(model):
    """Verification draws each position's token as decoding it alone would (model/verify.py), so a seed gives the
    same tokens with drafts as without, whatever the batch."""
    params = SamplingParams(max_tokens=32, temperature=0.2, top_p=0.95, seed=5, ignore_eos=True)
    off, _ = run(tiny_engine(model=model), repetitive_prompts(8), params)
    on, (_, num_draft_tokens, num_accepted) = run(tiny_engine(model=model, num_speculative_tokens=3),
                                                  repetitive_prompts(8), params)
    batched, _ = run(tiny_engine(model=model, num_speculative_tokens=3, budget=64), repetitive_prompts(8), params,
                     stagger=2)
    assert on == off == batched
    assert 0 < num_accepted < num_draft_tokens


def test_llm_takes_the_speculation_options(tiny_model_dir):
    from pacer import LLM, EngineConfig
    from pacer.config import SpeculativeConfig

    config = EngineConfig.from_kwargs(speculation="ngram", num_speculative_tokens=3)
    assert config.speculative == SpeculativeConfig("ngram", 3) and EngineConfig().speculative.speculation == "off"
    for bad in ({"speculation": "eagle"}, {"num_speculative_tokens": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SpeculativeConfig(**bad)
    prompts = [list(range(100, 108)) * 4, [7, 8, 9] * 6]
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outputs = {}
    for speculation in ("off", "ngram"):
        llm = LLM(str(tiny_model_dir), speculation=speculation, threads=1, num_blocks=64)
        assert (llm.engine.drafter is not None) == (speculation == "ngram")
        outputs[speculation] = [(o.token_ids, o.text) for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["ngram"] == outputs["off"]
