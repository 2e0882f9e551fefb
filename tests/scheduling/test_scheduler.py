"""Scheduler behaviour per policy: add, schedule, assert. No model, no torch."""

from __future__ import annotations

import pytest

from pacer.latency.model import BatchShape
from pacer.request import FinishReason, Request, RequestStatus
from pacer.scheduling import SCHEDULERS, SchedulerOutput, scheduler_class
from tests.scheduling.helpers import EOS, make_request, make_scheduler, step


def test_registry_lists_policies_and_rejects_unknown():
    assert {"fcfs", "orca", "sarathi"} <= set(SCHEDULERS)
    with pytest.raises(ValueError, match="known: fcfs, orca"):
        scheduler_class("nope")


def test_a_plans_batch_shape_sums_its_chunks_and_decodes():
    decode = Request("d", list(range(10)))
    decode.num_computed_tokens = 9  # 1 token left: a decode at context 10
    chunk = Request("p", list(range(40)))
    chunk.num_computed_tokens = 8
    plan = SchedulerOutput()
    plan.add(decode, 1)
    plan.add(chunk, 16)
    expected = BatchShape(num_prefill_tokens=16, prefill_attention=16 * (8 + 17 / 2), prefill_context=8,
                          num_decodes=1, decode_context=10)
    assert plan.shape == plan.recount_shape() == expected and expected.num_tokens == 17


def test_sarathi_chunks_prompt_to_budget_and_decodes_go_first():
    s = make_scheduler("sarathi", budget=16)
    s.add(make_request("a", 4, max_tokens=10))
    plan, _ = step(s)
    assert plan.num_scheduled_tokens == {"a": 4}  # whole short prompt, one token sampled
    s.add(make_request("b", 40))
    plan, _ = step(s)
    assert [r.request_id for r in plan.requests] == ["a", "b"]
    assert plan.num_scheduled_tokens == {"a": 1, "b": 15}  # decode first, then a chunk filling the budget
    plan, _ = step(s)
    assert plan.num_scheduled_tokens == {"a": 1, "b": 15}
    plan, _ = step(s)
    assert plan.num_scheduled_tokens == {"a": 1, "b": 10}  # the last chunk, which samples
    assert s.requests["b"].num_output_tokens == 1


def test_fcfs_runs_whole_prompts_and_pauses_decodes():
    s = make_scheduler("fcfs", budget=None)
    s.add(make_request("a", 4, max_tokens=10))
    step(s)
    s.add(make_request("b", 40))
    plan, _ = step(s)
    assert plan.num_scheduled_tokens == {"b": 40}  # prefill only: a's decode stalls
    plan, _ = step(s)
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}


def test_orca_mixes_whole_prompts_with_decodes_under_batch_cap():
    s = make_scheduler("orca", budget=None, max_num_seqs=2)
    s.add(make_request("a", 4, max_tokens=10))
    step(s)
    s.add(make_request("b", 40))
    s.add(make_request("c", 3))
    plan, _ = step(s)
    assert plan.num_scheduled_tokens == {"a": 1, "b": 40}  # c waits: batch cap of 2
    assert [r.request_id for r in s.waiting] == ["c"]


def test_non_chunking_policy_never_splits_a_prompt():
    s = make_scheduler("orca", budget=16)
    s.add(make_request("a", 10))
    s.add(make_request("b", 10))
    plan, _ = step(s)
    assert plan.num_scheduled_tokens == {"a": 10}  # b does not fit the rest of the budget whole


def test_stops_on_eos_max_tokens_and_stop_token_ids():
    s = make_scheduler()
    s.add(make_request("eos", 3, max_tokens=10))
    _, finished = step(s, token=EOS)
    assert [r.finish_reason for r in finished] == [FinishReason.STOP]
    s.add(make_request("ignore", 3, max_tokens=2, ignore_eos=True))
    step(s, token=EOS)
    _, finished = step(s, token=EOS)
    assert finished[0].finish_reason is FinishReason.LENGTH and finished[0].num_output_tokens == 2
    s.add(make_request("stopid", 3, max_tokens=10, stop_token_ids=[7]))
    _, finished = step(s, token=7)
    assert finished[0].finish_reason is FinishReason.STOP
    assert s.kv.num_free_blocks == s.kv.num_blocks and not s.has_unfinished


def test_context_length_ends_a_request_without_max_tokens():
    s = make_scheduler(max_model_len=8)
    s.add(make_request("a", 5, max_tokens=None))
    outputs = 0
    while s.has_unfinished:
        _, finished = step(s)
        outputs += 1
    assert finished[0].finish_reason is FinishReason.LENGTH and finished[0].num_tokens == 8


@pytest.mark.parametrize("prompt_len,max_tokens,match", [(300, 1, "context length"), (250, 10, "context length")])
def test_refuses_requests_longer_than_the_context(prompt_len, max_tokens, match):
    s = make_scheduler(max_model_len=256)
    with pytest.raises(ValueError, match=match):
        s.add(make_request("a", prompt_len, max_tokens=max_tokens))
    assert not s.has_unfinished


def test_refuses_requests_larger_than_the_kv_cache():
    s = make_scheduler(num_blocks=4, block_size=4)  # 16 tokens of KV
    with pytest.raises(ValueError, match="KV cache capacity of 16"):
        s.add(make_request("a", 15, max_tokens=2))
    s.add(make_request("b", 15, max_tokens=1))


def test_duplicate_request_id_is_refused():
    s = make_scheduler()
    s.add(make_request("a", 3))
    with pytest.raises(ValueError, match="already in use"):
        s.add(make_request("a", 3))


def test_preempts_newest_by_recompute_when_kv_runs_out():
    s = make_scheduler("sarathi", num_blocks=6, block_size=4, budget=64)  # 24 tokens of KV
    s.add(make_request("old", 8, max_tokens=12))
    s.add(make_request("new", 8, max_tokens=12))
    step(s)  # both prefilled: 2 + 2 blocks, 2 free
    for _ in range(8):
        plan, _ = step(s)
        if plan.preempted_ids:
            break
    assert plan.preempted_ids == ["new"]
    new = s.requests["new"]
    assert new.status is RequestStatus.WAITING and new.num_computed_tokens == 0 and new.num_preemptions == 1
    assert new.num_output_tokens > 0  # outputs are kept and recomputed later
    while s.has_unfinished:
        step(s)
    assert s.num_preemptions >= 1 and s.kv.num_free_blocks == s.kv.num_blocks


def test_abort_frees_blocks_and_is_reported_once_to_the_executor():
    s = make_scheduler()
    s.add(make_request("a", 10, max_tokens=50))
    s.add(make_request("b", 10, max_tokens=50))
    step(s)
    assert s.finish("a") is not None
    assert s.finish("a") is None  # unknown now: ignored
    plan, _ = step(s)
    assert plan.finished_ids == ["a"]
    plan, _ = step(s)
    assert plan.finished_ids == []
    s.finish("b")
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_scheduling_delay_is_stamped_at_first_chunk():
    s = make_scheduler(budget=4)
    s.add(make_request("a", 10))
    step(s, now=1.5)
    step(s, now=2.0)
    assert s.requests["a"].first_scheduled_s == 1.5


def test_a_cached_prefix_is_that_many_fewer_tokens_to_prefill():
    s = make_scheduler("sarathi", block_size=4, budget=64, prefix_caching=True)
    s.add(make_request("a", 18, max_tokens=1))  # tokens 10..27: four full blocks
    plan, finished = step(s)
    assert plan.num_scheduled_tokens == {"a": 18} and [r.request_id for r in finished] == ["a"]
    s.add(make_request("b", 22, max_tokens=2))  # the same 18 tokens and 4 more
    plan, _ = step(s, now=1.0)
    b = s.requests["b"]
    assert plan.num_scheduled_tokens == {"b": 6}  # 16 found (4 blocks), 6 computed
    assert b.num_cached_tokens == 16
    assert plan.shape.prefill_context == 16  # the latency model sees a chunk after 16 cached tokens


def test_a_prompt_cached_by_a_request_still_running_is_shared():
    s = make_scheduler("sarathi", block_size=4, budget=64, prefix_caching=True)
    s.add(make_request("a", 12, max_tokens=8))
    step(s)
    s.add(make_request("b", 13, max_tokens=2))
    plan, _ = step(s)
    a, b = s.requests["a"], s.requests["b"]
    assert plan.num_scheduled_tokens == {"a": 1, "b": 1}  # 12 of b's tokens found: its last is run like a decode
    assert b.block_ids[:3] == a.block_ids[:3] and all(s.kv.pool.ref_counts[x] == 2 for x in a.block_ids[:3])


def test_preemption_and_abort_leave_their_full_blocks_cached_and_leak_none():
    s = make_scheduler("sarathi", num_blocks=10, block_size=4, budget=64, prefix_caching=True)
    s.add(make_request("a", 16, max_tokens=16))
    s.add(make_request("b", 12, max_tokens=16))
    for _ in range(14):
        step(s)  # KV runs out: b, the newest, is preempted
    assert s.requests["b"].num_preemptions >= 1 and s.kv.pool.num_cached >= 4
    s.finish("a")
    while s.has_unfinished:
        step(s)
    assert s.kv.num_free_blocks == s.kv.num_blocks and s.kv.usage == 0
