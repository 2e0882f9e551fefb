"""Speculative decoding in the plan: verify rows of 1 + k tokens, their KV, and folding accepted drafts back in."""

from __future__ import annotations

import pytest

from pacer.latency.model import LinearLatencyModel
from pacer.request import SLO, FinishReason
from pacer.scheduling import ModelOutput
from pacer.speculation.acceptance import AcceptanceRate
from pacer.speculation.length import MIN_ACCEPTANCE_WITHOUT_MODEL
from tests.scheduling.helpers import EOS, check_invariants, curved, make_request, make_scheduler, propose, step


def decoding(scheduler, *requests):
    """Add the requests and run their prompts (one iteration: they fit the budget)."""
    for r in requests:
        scheduler.add(r)
    step(scheduler)
    assert all(not r.is_prefilling for r in requests)


def test_a_decode_with_drafts_is_a_verify_row_that_samples():
    s = make_scheduler(block_size=4)
    r = make_request("a", 6, max_tokens=10)
    decoding(s, r)
    propose(s, [20, 21, 22])
    plan = s.schedule(0.0)
    assert plan.num_scheduled_tokens == {"a": 4}
    assert plan.draft_token_ids == {"a": [20, 21, 22]}
    assert plan.samples(r)
    assert plan.shape == plan.recount_shape() and plan.shape.num_decodes == 0  # a chunk of 4 after its 6
    assert len(r.block_ids) == s.kv.blocks_for(6 + 4)  # KV for the token and its three drafts


def test_accepted_drafts_join_and_the_rejected_ones_give_back_their_kv():
    s = make_scheduler(num_blocks=16, block_size=2)
    r = make_request("a", 5, max_tokens=10)
    decoding(s, r)  # 5 prompt tokens + 1 sampled, 5 computed
    propose(s, [20, 21, 22, 23])
    plan = s.schedule(0.0)
    assert len(r.block_ids) == 5  # slots for 10 tokens
    s.update(plan, ModelOutput({"a": 30}, accepted_draft_ids={"a": [20]}), 1.0)
    assert r.output_token_ids == [7, 20, 30]
    assert r.num_computed_tokens == 7  # its last token and the accepted draft, not the rejected ones
    assert len(r.block_ids) == 4 and s.kv.num_free_blocks == 12
    check_invariants(s)
    plan, _ = step(s)  # the next decode is an ordinary one (no drafts proposed)
    assert plan.num_scheduled_tokens == {"a": 1} and r.num_computed_tokens == 8


def test_drafts_never_take_a_decodes_place_in_the_budget():
    s = make_scheduler(budget=16, max_num_seqs=8)
    requests = [make_request(f"r{i}", 2, max_tokens=20) for i in range(6)]
    decoding(s, *requests)
    propose(s, [7, 7, 7, 7])
    plan = s.schedule(0.0)
    assert set(plan.num_scheduled_tokens) == {r.request_id for r in requests}  # every decode has its token
    assert plan.total_num_scheduled_tokens == 16  # the 10 left over went to drafts, in batch order
    assert sum(map(len, plan.draft_token_ids.values())) == 10


def test_drafts_take_only_free_kv_and_preempt_nobody():
    s = make_scheduler(num_blocks=4, block_size=4, budget=32)
    a, b = make_request("a", 6, max_tokens=8), make_request("b", 6, max_tokens=8)
    decoding(s, a, b)  # two blocks each: all four in use, each with 1 slot free after its 7 tokens
    propose(s, [1, 2, 3, 4])
    plan = s.schedule(0.0)
    assert plan.num_scheduled_tokens == {"a": 2, "b": 2} and not plan.preempted_ids
    assert plan.draft_token_ids == {"a": [1], "b": [1]}


def test_drafts_stop_at_max_tokens_and_the_context():
    s = make_scheduler(max_model_len=12)
    short = make_request("a", 4, max_tokens=3)  # after the first token, two more to go: one draft at most
    long = make_request("b", 8, max_tokens=None)  # 9 tokens of a context of 12: 12 - 9 = 3 drafts at most
    decoding(s, short, long)
    propose(s, [7, 7, 7, 7])
    plan = s.schedule(0.0)
    assert plan.draft_token_ids == {"a": [7], "b": [7, 7, 7]}
    s.update(plan, ModelOutput({"a": 7, "b": 7}, accepted_draft_ids={"a": [7], "b": [7, 7, 7]}), 1.0)
    assert short.num_output_tokens == 3 and short.finish_reason is FinishReason.LENGTH
    assert long.num_tokens == 12 and long.finish_reason is FinishReason.LENGTH


def test_an_eos_among_the_accepted_drafts_ends_the_request_there():
    s = make_scheduler()
    r, other = make_request("a", 4, max_tokens=10), make_request("b", 4, max_tokens=10, stop_token_ids=[21])
    decoding(s, r, other)
    propose(s, [20, EOS, 22])
    other.spec_token_ids = [20, 21, 22]
    plan = s.schedule(0.0)
    output = ModelOutput({"a": 30, "b": 30}, accepted_draft_ids={"a": [20, EOS, 22], "b": [20, 21]})
    finished = s.update(plan, output, 1.0)
    assert finished == [r, other]
    assert r.output_token_ids == [7, 20, EOS] and r.finish_reason is FinishReason.STOP
    assert other.output_token_ids == [7, 20, 21] and other.finish_reason is FinishReason.STOP
    assert s.kv.num_free_blocks == s.kv.num_blocks


def test_only_verified_tokens_reach_the_prefix_cache():
    s = make_scheduler(num_blocks=16, block_size=2, prefix_caching=True)
    r = make_request("a", 3, max_tokens=10)
    decoding(s, r)  # 4 tokens, 3 computed: one full block published
    propose(s, [50, 51, 52, 53])
    plan = s.schedule(0.0)
    s.update(plan, ModelOutput({"a": 60}, accepted_draft_ids={"a": [50]}), 1.0)  # 5 computed: two full blocks
    assert r.num_cached_blocks == 2 and s.kv.pool.num_cached == 2
    s.finish("a")
    again = make_request("b", 3, max_tokens=10)
    again.token_ids += [7, 50, 51, 52, 53]  # the drafts as if they were tokens: only [.., 7, 50] may be found
    assert s.kv.num_cached_tokens(again) == 4


def test_a_preempted_verify_row_leaves_the_plan_with_its_drafts():
    # (drafts come after every decode, so only a started prompt's chunk can preempt a verify row: called directly)
    s = make_scheduler()
    a, b = make_request("a", 4, max_tokens=10), make_request("b", 4, max_tokens=10)
    decoding(s, a, b)
    propose(s, [1, 2])
    plan = s.schedule(0.0)
    s._preempt(b, plan)
    assert plan.draft_token_ids == {"a": [1, 2]} and plan.num_scheduled_tokens == {"a": 3}
    assert plan.total_num_scheduled_tokens == 3 and plan.shape == plan.recount_shape()
    assert not b.block_ids and b in s.waiting


def test_the_slo_policy_drafts_only_within_the_tightest_slack():
    # curved(): a verify row of 1 + k tokens after 4 takes 11.0, 11.5, 12.0, 12.5 ms for k = 1..4 (a decode 10.7)
    for limit_s, expected in ((1.0, [1, 2, 3, 4]), (0.0118, [1, 2]), (0.0108, [])):
        s = make_scheduler("slo", latency=curved())
        r = make_request("a", 4, max_tokens=10)
        r.slo = SLO(tbt_s=limit_s * (1 + s.latency.margin(1)))  # the slack, less the model's error margin
        decoding(s, r)
        s.acceptance["a"] = AcceptanceRate(num_accepted=100, at_token=r.num_tokens)  # drafts all but certain
        propose(s, [1, 2, 3, 4])
        plan = s.schedule(r.last_token_s)
        assert plan.draft_token_ids.get("a", []) == expected, limit_s


def memory_bound() -> LinearLatencyModel:
    """10 ms of weight reads + 0.1 ms a token, 0.3 ms more a token past 32: drafts are nearly free at small batch."""
    return LinearLatencyModel([0.010, 0.0001, 0.0003, 0.0, 0.0, 0.0, 0.0], (32,))


def test_update_learns_each_requests_acceptance_rate_from_its_verify_rows():
    s = make_scheduler(budget=64)
    good, bad = make_request("good", 4, max_tokens=60), make_request("bad", 4, max_tokens=60)
    decoding(s, good, bad)
    plans = [step(s, drafts=[7, 7, 7], accept=lambda r, d: len(d) if r is good else 0)[0] for _ in range(8)]
    assert s.acceptance_rate(good) > 0.8 and s.acceptance_rate(bad) < MIN_ACCEPTANCE_WITHOUT_MODEL
    # without a latency model, bad's drafts stop once its rate is clearly low: after five rejected rows
    assert [sorted(p.draft_token_ids) for p in plans] == [["bad", "good"]] * 5 + [["good"]] * 3
    assert s.num_accepted_tokens == 8 * 3 and s.num_draft_tokens == 8 * 3 + 5 * 3
    s.finish("good")
    assert "good" not in s.acceptance


@pytest.mark.parametrize("policy", ["sarathi", "slo"])
def test_the_goodput_length_follows_the_acceptance_rate_at_small_batch(policy):
    s = make_scheduler(policy, budget=64, latency=memory_bound())
    good, bad = make_request("good", 4, max_tokens=200), make_request("bad", 4, max_tokens=60)
    decoding(s, good, bad)
    plans = [step(s, drafts=[7, 7, 7, 7], accept=lambda r, d: len(d) if r is good else 0)[0] for _ in range(30)]
    good_k, bad_k = ([len(p.draft_token_ids.get(rid, [])) for p in plans] for rid in ("good", "bad"))
    assert good_k == [4] * 30
    # A draft costs 1 % of the iteration here: worth it while bad's rate is above ~5 %, which takes ~20 rows to
    # learn; then its estimate, fading back toward the prior, only lets through a probe of one draft now and then.
    assert bad_k[0] == 4 and max(bad_k[10:]) == 1 and sum(bad_k[-10:]) <= 4


def test_at_high_load_the_goodput_length_turns_itself_off():
    s = make_scheduler(budget=256, max_num_seqs=64, num_blocks=512, latency=memory_bound())
    requests = [make_request(f"r{i}", 2, max_tokens=40) for i in range(48)]
    for r in requests:
        s.add(r)
    step(s)
    for r in requests:
        s.acceptance[r.request_id] = AcceptanceRate(num_accepted=8, num_rejected=2, at_token=r.num_tokens)  # 3/4
    # 48 decodes take 19.6 ms, and a draft adds 0.4 ms: more than a 3/4 chance of a token is worth (19.6 / 48 ms)
    plan, _ = step(s, drafts=[7, 7, 7, 7], accept=lambda r, d: len(d))
    assert plan.num_scheduled_tokens == {r.request_id: 1 for r in requests} and not plan.draft_token_ids


@pytest.mark.parametrize("with_model", [False, True], ids=["no-latency-model", "goodput"])
def test_drafts_take_only_what_the_prompts_leave(with_model):
    s = make_scheduler(budget=16, latency=memory_bound() if with_model else None)
    a = make_request("a", 4, max_tokens=10)
    decoding(s, a)
    s.add(make_request("b", 13, max_tokens=4))
    propose(s, [1, 2, 3, 4])
    plan = s.schedule(0.0)
    assert plan.num_scheduled_tokens == {"a": 3, "b": 13} and plan.draft_token_ids == {"a": [1, 2]}
