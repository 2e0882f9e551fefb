"""The simulator's loop: closed-form timings, simultaneous events, conservation, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pacer.bench.metrics import SLOTargets
from pacer.bench.trace import read_trace
from pacer.bench.workload import WorkloadConfig, shared_prefixes
from pacer.config import SchedulerConfig
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.latency.model import LinearLatencyModel
from pacer.request import SLO
from pacer.scheduling import SchedulerOutput, scheduler_class
from pacer.sim.executor import SimExecutor
from pacer.sim.run import SimConfig, run_sim
from pacer.sim.simulator import SimRequest, Simulator, VirtualClock
from pacer.speculation.drafter import NgramDrafter
from tests.scheduling.helpers import make_request

MOONCAKE = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "mooncake_conversation.jsonl"


def constant(seconds: float) -> LinearLatencyModel:
    """Every iteration takes `seconds`, whatever its shape."""
    return LinearLatencyModel([seconds, 0.0, 0.0, 0.0, 0.0, 0.0], ())


def linear() -> LinearLatencyModel:
    """10 ms + 1 ms per token."""
    return LinearLatencyModel([0.010, 0.001, 0.0, 0.0, 0.0, 0.0], ())


def simulator(latency: LinearLatencyModel, policy: str = "sarathi", replicas: int = 1, num_blocks: int = 256,
              prefix_caching: bool = False, drafts: int = 0, **config) -> Simulator:
    clock = VirtualClock()
    engines = []
    for _ in range(replicas):
        kv = KVCacheManager(num_blocks, 16, prefix_caching)
        scheduler = scheduler_class(policy)(SchedulerConfig(scheduler=policy, **config), kv, 4096,
                                            latency=latency.fresh())
        drafter = NgramDrafter(drafts) if drafts else None
        engines.append(Engine(scheduler, SimExecutor(latency.fresh()), Detokenizer(None), clock=clock,
                              drafter=drafter))
    return Simulator(engines, clock)


def test_drafts_beside_the_sim_executor_change_nothing_yet():
    """The SimExecutor accepts no draft (modelling acceptance is issue 37's next part): with n-gram drafts, verify
    rows run and are rejected, and every token comes when it did without them."""
    requests = [SimRequest(i, 0.05 * i, 8 + i, 12) for i in range(6)]
    plain = simulator(constant(0.1)).run(requests)
    drafted = simulator(constant(0.1), drafts=4)
    records = drafted.run(requests)
    assert [r.token_times_s for r in records] == [r.token_times_s for r in plain]
    kv = drafted.replicas[0].engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_blocks


def test_closed_form_constant_iterations():
    """0.1 s an iteration; r0 (arrives 0) prefills then decodes; r1 arrives at 0.25, mid-iteration, and joins
    the iteration planned at 0.3 beside r0's last decode."""
    sim = simulator(constant(0.1))
    records = sim.run([SimRequest(0, 0.0, 8, 4), SimRequest(1, 0.25, 8, 3)])
    assert [r.status for r in records] == ["ok", "ok"]
    assert records[0].token_times_s == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert records[1].token_times_s == pytest.approx([0.4, 0.5, 0.6])
    assert records[0].finished_s == pytest.approx(0.4) and records[1].finished_s == pytest.approx(0.6)
    assert records[1].server_scheduling_delay_s == pytest.approx(0.05)
    assert sim.replicas[0].num_iterations == 6
    assert sim.clock.now == pytest.approx(0.6)


def test_an_arrival_at_the_instant_an_iteration_ends_joins_the_next_iteration():
    sim = simulator(constant(0.1))
    records = sim.run([SimRequest(0, 0.0, 8, 3), SimRequest(1, 0.1, 8, 1)])
    assert records[1].token_times_s == pytest.approx([0.2])  # planned at 0.1 with r0's decode
    assert records[0].token_times_s == pytest.approx([0.1, 0.2, 0.3])


def test_simultaneous_arrivals_keep_their_order():
    sim = simulator(constant(0.1), policy="fcfs", max_num_batched_tokens=8)  # one 7-token prompt per iteration
    records = sim.run([SimRequest(i, 0.0, 7, 1) for i in range(3)])
    assert [r.token_times_s for r in records] == [pytest.approx([t]) for t in (0.1, 0.2, 0.3)]


def test_closed_loop_sends_the_next_request_when_one_ends():
    sim = simulator(constant(0.1))
    records = sim.run([SimRequest(i, None, 8, 2) for i in range(3)], concurrency=1)
    assert [r.sent_s for r in records] == pytest.approx([0.0, 0.2, 0.4])
    assert records[2].finished_s == pytest.approx(0.6)


def test_conservation_under_kv_pressure_rejections_and_expiry():
    """Every request ends exactly once, whatever happens to it, and no KV block leaks."""
    sim = simulator(linear(), policy="slo", num_blocks=24, drop_expired=True)
    slo = SLO(ttft_s=0.5, tbt_s=0.2)
    requests = [SimRequest(i, 0.01 * i, 40 + 7 * (i % 5), 30, slo) for i in range(60)]
    records = sim.run(requests)
    assert [r.index for r in records] == list(range(60))
    assert all(r.finished_s is not None for r in records)
    statuses = {r.status for r in records}
    assert "ok" in statuses and "rejected" in statuses
    for r in records:
        if r.status == "ok":
            assert len(r.token_times_s) == r.output_tokens == 30
        if r.status == "rejected":
            assert r.retry_after_s >= 1 and not r.token_times_s
    scheduler = sim.replicas[0].engine.scheduler
    assert scheduler.num_preemptions > 0  # 24 blocks of 16 tokens cannot hold the queue
    assert not scheduler.has_unfinished and scheduler.kv.num_free_blocks == scheduler.kv.num_blocks


def test_a_request_too_long_for_the_kv_cache_fails_alone():
    sim = simulator(constant(0.1), num_blocks=4)  # 64 tokens
    records = sim.run([SimRequest(0, 0.0, 100, 2), SimRequest(1, 0.0, 8, 2)])
    assert records[0].status == "failed" and records[0].error_kind == "http_4xx"
    assert records[1].status == "ok"


def test_replicas_share_the_clock_and_round_robin_spreads_the_load():
    sim = simulator(constant(0.1), replicas=2)
    records = sim.run([SimRequest(i, 0.0, 8, 2) for i in range(4)])
    assert all(r.finished_s == pytest.approx(0.2) for r in records)  # two requests per replica, in parallel
    assert [len(rep.engine.scheduler.requests) for rep in sim.replicas] == [0, 0]
    assert [rep.num_iterations for rep in sim.replicas] == [2, 2]


@pytest.fixture()
def profile(tmp_path):
    path = tmp_path / "profile.json"
    linear().save(path)
    return path


def test_same_seed_gives_a_byte_identical_report(profile, tmp_path):
    workload = WorkloadConfig(num_requests=50, rate=20.0, lengths="uniform", prompt_tokens=200, output_tokens=40)
    sim = SimConfig(profile=str(profile), kv_blocks=64, noise=0.1)
    slo = SLOTargets(ttft_s=1.0, tbt_s=0.1)
    outs = [tmp_path / "a.json", tmp_path / "b.json"]
    for out in outs:
        run_sim(workload, sim, SchedulerConfig(scheduler="slo"), slo, out)
    assert outs[0].read_bytes() == outs[1].read_bytes()
    report = json.loads(outs[0].read_text())
    assert report["summary"]["num_requests"] == 50 and len(report["requests"]) == 50


def test_residuals_replay_measured_errors_per_regime(tmp_path):
    from pacer.sim.executor import load_residuals

    path = tmp_path / "iterations.json"
    rows = [{"raw_predicted_s": 0.1, "elapsed_s": 0.2, "shape": {"num_prefill_tokens": 8}},
            {"raw_predicted_s": 0.1, "elapsed_s": 0.1, "shape": {"num_prefill_tokens": 0}}]
    path.write_text(json.dumps({"iterations": rows}))
    residuals = load_residuals(path)
    assert residuals == {"prefill": [2.0], "decode": [1.0]}
    clock = VirtualClock()
    scheduler = scheduler_class("sarathi")(SchedulerConfig(), KVCacheManager(64, 16), 4096)
    engine = Engine(scheduler, SimExecutor(constant(0.1), residuals=residuals), Detokenizer(None), clock=clock)
    (record,) = Simulator([engine], clock).run([SimRequest(0, 0.0, 8, 3)])
    assert record.token_times_s == pytest.approx([0.2, 0.3, 0.4])  # the prefill ran 2x its prediction
    path.write_text(json.dumps({"iterations": rows[:1]}))
    with pytest.raises(ValueError, match="with and without"):
        load_residuals(path)


def test_residuals_replay_in_recorded_order_so_slow_spells_last():
    """The machine's slow spells span many iterations (lag-1 autocorrelation 0.57 in serving), which the latency
    model's fast factor tracks; drawn at random they would be uncorrelated noise it cannot learn."""
    ratios = [1.0, 1.5, 2.0, 3.0, 0.9, 1.1]
    plan = SchedulerOutput()
    plan.add(make_request("r", 8), 1)  # a decode
    starts = set()
    for seed in range(8):
        executor = SimExecutor(constant(0.1), seed=seed, residuals={"prefill": [1.0], "decode": ratios})
        seen = [round(executor.execute(plan).elapsed_s / 0.1, 6) for _ in range(12)]
        start = ratios.index(seen[0])
        assert seen == [ratios[(start + i) % len(ratios)] for i in range(12)]  # in order, wrapping around
        starts.add(start)
    assert len(starts) > 1  # each seeded executor starts at its own offset


def test_a_shared_prompt_head_is_found_in_the_simulated_prefix_cache():
    """10 ms + 1 ms a token: the second request's 100-token prompt shares 64 tokens (4 blocks) with the first, so
    with prefix caching its prefill is 36 tokens (46 ms), not 100 (110 ms)."""
    head = tuple(range(10, 74))
    requests = [SimRequest(0, 0.0, 100, 1, prefix=head), SimRequest(1, 1.0, 100, 1, prefix=head)]
    for caching, ttft in ((False, 0.110), (True, 0.046)):
        records = simulator(linear(), prefix_caching=caching, max_num_batched_tokens=512).run(requests)
        assert records[1].token_times_s[0] - records[1].sent_s == pytest.approx(ttft)
    # prompts that share nothing find nothing: each has its own marker after the head
    assert SimRequest(0, 0.0, 8, 1).prompt_token_ids() != SimRequest(1, 0.0, 8, 1).prompt_token_ids()
    assert SimRequest(70000, 0.0, 8, 1).prompt_token_ids() != SimRequest(70000 - 65025, 0.0, 8, 1).prompt_token_ids()


def test_the_workloads_shared_heads_are_what_the_bench_prompts_share():
    """A system prompt: every request's head; a Mooncake trace: the blocks other requests also name."""
    system = shared_prefixes(WorkloadConfig(num_requests=4, lengths="fixed", prompt_tokens=50, system_prompt_tokens=30))
    assert all(len(h) == 30 for h in system) and len(set(system)) == 1
    trace = WorkloadConfig(num_requests=40, lengths="trace", trace=str(MOONCAKE), length_scale=0.05)
    heads, records = shared_prefixes(trace), read_trace(str(MOONCAKE))[:40]
    block = round(512 * 0.05)
    for head, record in zip(heads, records):
        named_elsewhere = [h for h in record.hash_ids if sum(h in r.hash_ids for r in records) > 1]
        assert len(head) <= len(named_elsewhere) * block
    second = next(i for i, r in enumerate(records[1:], 1) if r.hash_ids[0] == records[0].hash_ids[0])
    assert len(heads[0]) >= block and heads[0][:block] == heads[second][:block]  # one block, the same tokens


def test_a_conversations_later_turns_find_the_turns_before_in_the_prefix_cache():
    """10 ms + 1 ms a token, 16-token blocks. Turn 1 follows turn 0's answer after 0.5 s of thought; its prompt is
    turn 0's 40 prompt tokens, its 9 output tokens and 20 of its own: the 48 full-block tokens of that history
    are cached, so it prefills 21 tokens (31 ms), not 69 (79 ms). A refused turn ends its conversation."""
    requests = [SimRequest(0, 0.0, 40, 9), SimRequest(1, None, 20, 4, turn=1, think_s=0.5),
                SimRequest(2, 0.0, 5000, 4), SimRequest(3, None, 20, 4, turn=1, think_s=0.5)]
    for caching, ttft in ((False, 0.079), (True, 0.031)):
        records = simulator(linear(), prefix_caching=caching, max_num_batched_tokens=512).run(requests)
        first, later = records[0], records[1]
        assert later.sent_s == pytest.approx(first.finished_s + 0.5)
        assert later.num_prompt_tokens == 69 and later.turn == 1
        assert later.token_times_s[0] - later.sent_s == pytest.approx(ttft)
        assert [(r.status, r.error_kind) for r in records[2:]] == [("failed", "http_4xx"),
                                                                   ("rejected", "conversation_ended")]
    closed = simulator(linear(), max_num_batched_tokens=512).run(requests[:2] + [SimRequest(2, None, 8, 2)],
                                                                 concurrency=1)
    assert closed[2].sent_s == pytest.approx(closed[1].finished_s)  # one slot: the conversation held it to its end
