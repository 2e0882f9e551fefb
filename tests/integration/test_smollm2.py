"""SmolLM2-135M-Instruct end to end: greedy fp32 must reproduce transformers' ids exactly,
alone, inside a batch, with any token budget and under every policy, both on the file's Q4_1
blocks (the default) and on weights dequantized at load; bf16 and weights re-quantized at load
must stay within the reference's top-5 when teacher-forced."""

from __future__ import annotations

import pytest
import torch

from pacer import LLM, SamplingParams
from pacer.config import SchedulerConfig
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.model import cpu_kernels
from pacer.model.attention import AttentionMetadata
from pacer.model.gguf_file import GGUFFile
from pacer.model.weights import resolve_model_path
from pacer.request import FinishReason
from pacer.scheduling import scheduler_class
from tests.conftest import DEVICE
from tests.strict import kernel_ops

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


def test_the_default_computes_on_the_files_blocks_in_its_memory(llm):
    runner = llm.engine.executor
    if DEVICE != "cpu":
        pytest.skip("GGUF blocks are kept on a CPU only")
    assert runner.quantization == "Q4_1+Q8_0"
    file = GGUFFile(resolve_model_path(None))
    assert runner.weight_bytes <= 1.25 * sum(t.num_bytes for t in file.tensors.values())


def test_weights_dequantized_at_load_reproduce_the_reference(reference):
    llm = LLM(dtype="float32", quantization="none", kv_cache_memory="64MiB", device=DEVICE)
    assert llm.engine.executor.quantization == "none"
    for case in reference["cases"]:
        [result] = llm.chat(case["messages"], GREEDY32, use_tqdm=False)
        assert result.token_ids == case["generated_ids"]


def decoded_logits(model, ids: list[int], prompt_len: int, block_size: int, cache) -> torch.Tensor:
    """Logits at every position from the prompt's last on, the prompt prefilled in one chunk and each later token
    fed as a one-row decode step (the path a server's decodes take)."""
    blocks = list(range(-(-len(ids) // block_size)))
    device = model.embed_tokens.weight.device
    meta = AttentionMetadata.build(block_size, prefill=[(blocks, 0, prompt_len)], device=device)
    positions = torch.arange(prompt_len, device=device)
    rows = [model(torch.tensor(ids[:prompt_len], device=device), positions, cache, meta, positions[-1:]).clone()]
    for pos in range(prompt_len, len(ids)):
        meta = AttentionMetadata.build(block_size, decode=[(blocks, pos + 1)], device=device)
        position = torch.tensor([pos], device=device)
        rows.append(model(torch.tensor([ids[pos]], device=device), position, cache, meta,
                          torch.zeros(1, dtype=torch.long, device=device)).clone())
    return torch.cat(rows)


def assert_teacher_forced_top1_within_reference_top5(llm: LLM, reference, decode: bool = False) -> None:
    """Teacher-forced on the reference's ids, top-1 is within the reference's top-5 at every step; `decode`: each
    generated token goes through a one-row decode step rather than all of them through one prefill."""
    runner = llm.engine.executor
    for case in reference["cases"]:
        ids = case["prompt_ids"] + case["generated_ids"]
        if decode:
            logits = decoded_logits(runner.model, ids, len(case["prompt_ids"]), runner.block_size, runner.cache)
            logits = torch.cat([torch.zeros(len(case["prompt_ids"]) - 1, logits.shape[1]), logits])
        else:
            logits = full_logits(runner.model, ids, runner.block_size, runner.cache).clone()
        logits[:, reference["eos_token_id"]] = -torch.inf  # masked in the reference too (min_new_tokens)
        start = len(case["prompt_ids"]) - 1
        for step, top5 in enumerate(case["top5_per_step"]):
            assert int(logits[start + step].argmax()) in top5["ids"], f"step {step}"


def test_bfloat16_teacher_forced_top1_within_reference_top5(reference):
    assert_teacher_forced_top1_within_reference_top5(LLM(dtype="bfloat16", kv_cache_memory="64MiB", device=DEVICE),
                                                     reference)


@pytest.mark.skipif(DEVICE != "cpu", reason="int8 activations run on a CPU")
def test_int8_activations_teacher_forced_top1_within_reference_top5(reference):
    if not kernel_ops(cpu_kernels.quant_ops(), "int8 activations").int8_activations():
        pytest.skip("int8 activations need an AVX2 CPU")
    llm = LLM(dtype="float32", int8_activations=True, kv_cache_memory="64MiB")
    assert llm.engine.executor.quantization.endswith("-a8")
    assert_teacher_forced_top1_within_reference_top5(llm, reference, decode=True)  # int8 below 32 rows


@pytest.mark.skipif(DEVICE != "cpu", reason="load-time quantization runs on a CPU")
@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_at_load_teacher_forced_top1_within_reference_top5(reference, quantization):
    llm = LLM(dtype="float32", quantization=quantization, kv_cache_memory="64MiB")
    assert llm.engine.executor.quantization == {"int8": "Q8_0", "int4": "Q4_1+Q8_0"}[quantization]
    assert_teacher_forced_top1_within_reference_top5(llm, reference)
