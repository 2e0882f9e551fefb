"""SmolLM2-135M-Instruct end to end: greedy fp32 must reproduce transformers' ids exactly,
alone, inside a batch, with any token budget and under every policy; bf16 must stay within the
reference's top-5 when teacher-forced."""

from __future__ import annotations

import pytest
import torch

from pacer import LLM, SamplingParams
from pacer.config import SchedulerConfig
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.model.attention import AttentionMetadata
from pacer.request import FinishReason
from pacer.scheduling import scheduler_class
from tests.conftest import DEVICE

pytestmark = pytest.mark.slow

# The reference was generated with transformers' min_new_tokens=32, which masks EOS: min_tokens.
GREEDY32 = SamplingParams(max_tokens=32, min_tokens=32, temperature=0)
OTHERS = ["Hi", "Write a haiku about the sea.", "List three prime numbers and explain why each is prime, briefly.",
          "What is 2+2?", "Translate 'good morning' into French, Spanish and German.", "Tell me a joke.",
          "Explain how a paged KV cache works in an inference server, step by step, for a beginner.", "Why?"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="256MiB", device=DEVICE)


def with_policy(llm: LLM, policy: str, budget: int | None) -> None:
    """Swap the scheduler of the loaded engine, keeping the model and its KV pool."""
    old = llm.engine
    config = SchedulerConfig(scheduler=policy, max_num_batched_tokens=budget, max_num_seqs=16)
    scheduler = scheduler_class(policy)(config, KVCacheManager(old.scheduler.kv.num_blocks, old.scheduler.kv.block_size),
                                        old.scheduler.max_model_len, eos_token_id=old.scheduler.eos_token_id)
    llm.engine = Engine(scheduler, old.executor, old.detokenizer)


def test_prompt_ids_match_the_reference(llm, reference):
    for case in reference["cases"]:
        text = llm.tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True)
        assert text == case["prompt_text"]
        assert llm.tokenizer.encode(text) == case["prompt_ids"]


@pytest.mark.parametrize("policy,budget", [("sarathi", 512), ("sarathi", 64), ("sarathi", 16), ("fcfs", None),
                                           ("orca", None)])
def test_greedy_reproduces_reference_inside_a_batch(llm, reference, policy, budget):
    with_policy(llm, policy, budget)
    cases = reference["cases"]
    conversations = [[{"role": "user", "content": text}] for text in OTHERS[:4]]
    conversations += [c["messages"] for c in cases] + [[{"role": "user", "content": t}] for t in OTHERS[4:]]
    params = [SamplingParams(max_tokens=8 + 5 * i, temperature=0, ignore_eos=True) for i in range(8)]
    params = params[:4] + [GREEDY32] * len(cases) + params[4:]
    results = llm.chat(conversations, params, use_tqdm=False)
    for case, result in zip(cases, results[4:4 + len(cases)]):
        assert result.prompt_token_ids == case["prompt_ids"]
        assert result.token_ids == case["generated_ids"]
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.scheduler.kv.num_blocks


def test_greedy_reproduces_reference_alone(llm, reference):
    with_policy(llm, "sarathi", None)
    for case in reference["cases"]:
        [result] = llm.chat(case["messages"], GREEDY32, use_tqdm=False)
        assert result.token_ids == case["generated_ids"]
        assert result.finish_reason is FinishReason.LENGTH


def test_stop_string_is_not_returned(llm, reference):
    with_policy(llm, "sarathi", None)
    case = reference["cases"][0]  # "The capital of France is Paris. ..."
    [result] = llm.chat(case["messages"], SamplingParams(max_tokens=32, temperature=0, stop=[" Paris"]),
                        use_tqdm=False)
    assert result.text == "The capital of France is"
    assert result.finish_reason is FinishReason.STOP


def test_too_long_prompt_is_refused_without_leaking(llm):
    with_policy(llm, "sarathi", None)
    limit = llm.engine.scheduler.max_request_tokens
    with pytest.raises(ValueError, match="exceed"):
        llm.generate([[5] * 10, [5] * (limit + 1)], SamplingParams(max_tokens=2), use_tqdm=False)
    assert not llm.engine.has_unfinished
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.scheduler.kv.num_blocks


def full_logits(model, ids: list[int], block_size: int, cache) -> torch.Tensor:
    """Logits at every position of one prompt run in a single prefill."""
    blocks = list(range(-(-len(ids) // block_size)))
    device = model.embed_tokens.weight.device
    meta = AttentionMetadata.build(block_size, prefill=[(blocks, 0, len(ids))], device=device)
    positions = torch.arange(len(ids), device=device)
    return model(torch.tensor(ids, device=device), positions, cache, meta, positions)


def test_bfloat16_teacher_forced_top1_within_reference_top5(reference):
    llm = LLM(dtype="bfloat16", kv_cache_memory="64MiB", device=DEVICE)
    runner = llm.engine.executor
    for case in reference["cases"]:
        ids = case["prompt_ids"] + case["generated_ids"]
        logits = full_logits(runner.model, ids, runner.block_size, runner.cache)
        logits = logits.clone()
        logits[:, reference["eos_token_id"]] = -torch.inf  # masked in the reference too (min_new_tokens)
        start = len(case["prompt_ids"]) - 1
        for step, top5 in enumerate(case["top5_per_step"]):
            assert int(logits[start + step].argmax()) in top5["ids"], f"step {step}"
