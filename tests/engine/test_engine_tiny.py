"""The real engine (scheduler + runner + model) on a tiny random-weight Llama: batching must not
change what a request generates, whatever the policy, budget, block size or KV pressure."""

from __future__ import annotations

import random

import pytest
import torch

from pacer.request import FinishReason, Request, SamplingParams
from tests.tiny import TINY, tiny_engine, tiny_model


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, TINY.vocab_size) for _ in range(rng.randint(1, 40))] for _ in range(n)]


def run(engine, token_lists, params: SamplingParams, stagger: int = 0) -> dict[str, list[int]]:
    """Add requests (one more every `stagger` steps, or all at once) and step to completion."""
    pending = [Request(str(i), p, params) for i, p in enumerate(token_lists)]
    out: dict[str, list[int]] = {r.request_id: [] for r in pending}
    steps = 0
    while pending or engine.has_unfinished:
        if pending and (stagger == 0 or steps % stagger == 0):
            for r in pending if stagger == 0 else pending[:1]:
                engine.add_request(r)
            pending = [] if stagger == 0 else pending[1:]
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        steps += 1
        assert steps < 10_000
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    return out


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def alone(model) -> dict[str, list[int]]:
    """Each request run by itself, whole prompt in one iteration."""
    result = {}
    for i, p in enumerate(prompts(10)):
        result[str(i)] = run(tiny_engine("orca", budget=512, model=model), [p], GREEDY)["0"]
    return result


@pytest.mark.parametrize("policy", ["fcfs", "orca", "sarathi"])
@pytest.mark.parametrize("budget", [16, 64, 512])
def test_batched_greedy_equals_alone(model, alone, policy, budget):
    if policy != "sarathi" and budget < 64:
        budget = 64  # whole prompts must fit a non-chunking budget
    out = run(tiny_engine(policy, budget=budget, model=model), prompts(10), GREEDY, stagger=2)
    assert out == alone


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_size_and_kv_pressure_do_not_change_outputs(model, alone, block_size):
    # A pool too small for all ten at once: requests get preempted and recomputed.
    num_blocks = -(-120 // block_size)
    engine = tiny_engine("sarathi", num_blocks=num_blocks, block_size=block_size, budget=32, model=model)
    assert run(engine, prompts(10), GREEDY) == alone
    assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_is_reproducible_and_batch_independent(model):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    p = prompts(4, seed=3)
    first = run(tiny_engine(model=model), p, params)
    again = run(tiny_engine(model=model, budget=8), p, params, stagger=1)
    assert first == again
    other = run(tiny_engine(model=model), p, SamplingParams(**{**params.__dict__, "seed": 99}))
    assert other != first


def test_abort_mid_generation_frees_blocks_and_keeps_others(model, alone):
    engine = tiny_engine(model=model)
    ps = prompts(10)
    for i, p in enumerate(ps[:3]):
        engine.add_request(Request(str(i), p, GREEDY))
    out = {str(i): [] for i in range(3)}
    aborted = None
    while engine.has_unfinished:
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        if aborted is None and out["1"]:
            aborted = engine.abort("1")
    assert aborted.finished and aborted.finish_reason is FinishReason.ABORT
    assert out["0"] == alone["0"] and out["2"] == alone["2"]
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks


def test_logprobs_are_returned_for_each_token(model):
    engine = tiny_engine(model=model)
    params = SamplingParams(max_tokens=3, temperature=0, logprobs=4, ignore_eos=True)
    engine.add_request(Request("a", prompts(1)[0], params))
    logprobs = []
    while engine.has_unfinished:
        for o in engine.step():
            logprobs += o.new_logprobs
            tokens = o.new_token_ids
            for lp, token in zip(o.new_logprobs, tokens):
                assert lp.top[0][0] == token  # greedy: the sampled token is the top one
                assert len(lp.top) == 4 and lp.logprob == pytest.approx(lp.top[0][1])
    assert len(logprobs) == 3


def test_bfloat16_runs():
    engine = tiny_engine(model=tiny_model(torch.bfloat16))
    out = run(engine, prompts(10), GREEDY)
    assert all(len(v) == 12 for v in out.values())


def test_a_request_prefilled_on_one_engine_decodes_on_another_with_the_same_ids(model, alone):
    """Disaggregated serving's hand-over: export_kv keeps the prompt's KV, adopt continues from it elsewhere."""
    prefill, decode = tiny_engine(model=model), tiny_engine(model=model)
    prompt = prompts(1)[0]
    first = Request("p", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), export_kv=True)
    prefill.add_request(first)
    while prefill.has_unfinished:
        prefill.step()
    payload = prefill.exported.pop("p")
    assert payload.num_tokens == len(prompt) and prefill.scheduler.kv.num_free_blocks == 64
    held = Request("held", [1] * 9)  # occupies the first blocks, so the request gets other block ids
    held.num_computed_tokens = 9
    decode.scheduler.kv.allocate(held, 0)
    request = Request("p", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    request.token_ids.append(first.output_token_ids[0])
    request.num_computed_tokens = len(prompt)
    decode.adopt(request, payload)
    assert request.block_ids[0] != 0
    outputs = []
    while decode.has_unfinished:
        outputs += decode.step()
    assert [t for o in outputs for t in o.new_token_ids] == alone["0"][1:]  # the first token came from prefill
    assert outputs[-1].num_output_tokens == 12
    decode.scheduler.kv.free(held)
    assert decode.scheduler.kv.num_free_blocks == 64


def test_a_hand_over_moves_only_the_blocks_the_decode_engine_lacks_and_recomputes_what_it_lost(model, alone):
    """The prompt's first blocks are cached on the decode engine (an earlier turn left them): the payload leaves
    them out and the decode engine takes them from its cache. If its cache lost them meanwhile, it recomputes what
    it lacks. Greedy ids are the same either way, and no block is left held."""
    prompt = prompts(1)[0]  # 25 tokens: 6 full 4-token blocks and a partial one
    prefill = tiny_engine(model=model)
    first = Request("p", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), export_kv=True)
    run_to_end(prefill, first)
    assert set(prefill.exported) == {"p"}
    payloads = {held: prefill.exported["p"].skip(held // 4) for held in (0, 20)}  # what take_exported gives
    assert prefill.take_exported("p", 20).first_block == 5 and not prefill.exported
    assert [p.k.shape[1] for p in payloads.values()] == [7, 2]

    def decode_with(payload, warm: bool) -> list[int]:
        decode = tiny_engine(model=model, prefix_caching=True)
        if warm:  # an earlier request with the same first 22 tokens leaves 5 full blocks in the cache
            run_to_end(decode, Request("earlier", prompt[:22], SamplingParams(max_tokens=1, ignore_eos=True)))
        request = Request("p", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        request.token_ids.append(first.output_token_ids[0])
        request.num_computed_tokens = len(prompt)
        decode.adopt(request, payload)
        outputs = []
        while decode.has_unfinished:
            outputs += decode.step()
        assert decode.scheduler.kv.num_free_blocks == 64 and not decode.scheduler.requests
        return [t for o in outputs for t in o.new_token_ids]

    expected = alone["0"][1:]  # the first token came from the prefill
    assert decode_with(payloads[0], warm=False) == expected
    assert decode_with(payloads[20], warm=True) == expected  # 5 blocks from its cache, 2 from the payload
    assert decode_with(payloads[20], warm=False) == expected  # the cache lost them: recomputed


def run_to_end(engine, request: Request) -> None:
    engine.add_request(request)
    while engine.has_unfinished:
        engine.step()


def _turns(engine, turns: list[tuple[int, list[int]]]) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Run requests given as (step to add it at, prompt); returns their outputs and cached prompt tokens."""
    requests = {str(i): Request(str(i), prompt, GREEDY) for i, (_, prompt) in enumerate(turns)}
    out: dict[str, list[int]] = {rid: [] for rid in requests}
    steps = 0
    while steps <= max(at for at, _ in turns) or engine.has_unfinished:
        for i, (at, _) in enumerate(turns):
            if at == steps:
                engine.add_request(requests[str(i)])
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        steps += 1
        assert steps < 10_000
    assert engine.scheduler.kv.num_free_blocks == engine.scheduler.kv.num_blocks
    return out, {rid: r.num_cached_tokens for rid, r in requests.items()}


@pytest.mark.parametrize("budget", [16, 512])
def test_greedy_with_prefix_caching_equals_without(model, budget):
    """A prefix fully cached, partly cached, cached by a request still running, and evicted between two turns."""
    rng = random.Random(3)
    system, other = [rng.randrange(3, TINY.vocab_size) for _ in range(21)], prompts(12, seed=5)
    turns = [(0, system + [5, 6]),
             (40, system + [5, 6]),  # fully cached: all but its last block found
             (80, system + [9, 9, 9, 9, 9]),  # partly: the system prompt's 5 full blocks found
             (120, system + [7] * 30), (122, system + [7] * 30 + [8]),  # cached by a request still running
             *((160 + 3 * i, p) for i, p in enumerate(other)),  # unrelated prompts fill the small pool
             (400, system + [5, 6])]  # evicted meanwhile: nothing found, same answer
    off, _ = _turns(tiny_engine("sarathi", num_blocks=40, budget=budget, model=model), turns)
    on, cached = _turns(tiny_engine("sarathi", num_blocks=40, budget=budget, model=model, prefix_caching=True), turns)
    assert on == off
    assert cached["0"] == 0 and cached["1"] == 20 and cached["2"] == 20 and cached["4"] >= 32
    assert cached[str(len(turns) - 1)] == 0, "the small pool should have evicted the first turns' blocks"


def test_a_second_turn_reuses_the_first_turns_prompt_and_answer(model):
    prompt = prompts(1, seed=11)[0] + [4] * 20
    first, _ = _turns(tiny_engine("sarathi", budget=64, model=model, prefix_caching=True), [(0, prompt)])
    second_prompt = prompt + first["0"] + [3, 4, 5]
    engine = tiny_engine("sarathi", budget=64, model=model, prefix_caching=True)
    on, cached = _turns(engine, [(0, prompt), (30, second_prompt)])
    off, _ = _turns(tiny_engine("sarathi", budget=64, model=model), [(0, prompt), (30, second_prompt)])
    assert on == off and on["0"] == first["0"]
    # the first turn's answer was computed as it was generated, so all but its last token's block is found
    assert cached["1"] >= (len(prompt) + len(first["0"]) - 1) // 4 * 4 - 4
