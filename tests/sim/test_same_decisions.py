"""One scheduler, two executors: the same workload through the real model runner and through SimExecutor,
fed the times the runner measured, gives identical plans, one iteration after another."""

from __future__ import annotations

import pytest

from pacer.config import SchedulerConfig
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.latency.model import BatchShape, LinearLatencyModel
from pacer.request import SLO
from pacer.scheduling import ModelOutput, SchedulerOutput, scheduler_class
from pacer.sim.executor import SimExecutor
from pacer.sim.simulator import SimRequest, Simulator, VirtualClock
from tests.tiny import TINY, tiny_runner

NUM_BLOCKS, BLOCK_SIZE = 20, 4  # 80 tokens of KV: the queue below preempts, whatever the runner's timing


def decisions(plan: SchedulerOutput) -> tuple:
    return tuple((r.request_id, plan.num_scheduled_tokens[r.request_id]) for r in plan.requests), \
        tuple(plan.preempted_ids), tuple(r.request_id for r in plan.dropped)


class Recording:
    """The real runner, with a log of every plan it ran and the time it measured."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.plans: list[tuple] = []
        self.times: list[float] = []

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        result = self.runner.execute(plan)
        self.plans.append(decisions(plan))
        self.times.append(result.elapsed_s)
        return result


class Replay:
    """A latency 'model' that answers the measured times in order: what the SimExecutor is fed."""

    def __init__(self, times: list[float]) -> None:
        self.times = iter(times)

    def predict(self, shape: BatchShape) -> float:
        return next(self.times)


class Logged(SimExecutor):
    def __init__(self, latency) -> None:
        super().__init__(latency)
        self.plans: list[tuple] = []

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        self.plans.append(decisions(plan))
        return super().execute(plan)


def simulate(policy: str, executor, prefix_caching: bool = False, turns: int = 1) -> list:
    clock = VirtualClock()
    planning = LinearLatencyModel([1e-3, 5e-5, 0.0, 0.0, 0.0, 0.0], ())  # the scheduler's model, in both runs
    config = SchedulerConfig(scheduler=policy, max_num_seqs=6, max_num_batched_tokens=32, drop_expired=True)
    kv = KVCacheManager(NUM_BLOCKS, BLOCK_SIZE, prefix_caching)
    scheduler = scheduler_class(policy)(config, kv, TINY.max_position_embeddings, latency=planning)
    engine = Engine(scheduler, executor, Detokenizer(None), clock=clock)
    slo = SLO(ttft_s=0.05, tbt_s=0.004)
    # with prefix caching, as in a chat: a shared 8-token system prompt, and every third request a follow-up that
    # repeats the head of the one before it
    system = tuple(range(30, 38))
    heads = [system + ((40 + i // 3,) * 8 if i % 3 else ()) for i in range(24)] if prefix_caching else [()] * 24
    # with turns, conversations: turn k + 1 of one is sent 3 ms after turn k's answer, its prompt opening with it
    requests = [SimRequest(i, None if i % turns else 0.002 * i, 3 + i % 4 if i % turns else 10 + (7 * i) % 30, 6 + i % 5, slo,
                           prefix=() if i % turns else heads[i], turn=i % turns, think_s=0.003) for i in range(24)]
    records = Simulator([engine], clock).run(requests)
    assert scheduler.kv.num_free_blocks == NUM_BLOCKS
    return [(r.status, r.token_times_s) for r in records]


@pytest.mark.parametrize(("prefix_caching", "turns"), [(False, 1), (True, 1), (True, 3)])
@pytest.mark.parametrize("policy", ["sarathi", "slo"])
def test_simulator_and_runner_make_the_same_decisions(policy, prefix_caching, turns):
    runner = tiny_runner(NUM_BLOCKS, BLOCK_SIZE)
    simulate(policy, Recording(runner))  # warm-up: a first iteration can take 100 ms, and expire the whole queue
    real = Recording(runner)
    real_records = simulate(policy, real, prefix_caching, turns)
    sim = Logged(Replay(real.times))
    sim_records = simulate(policy, sim, prefix_caching, turns)
    assert len(real.plans) > 20
    assert sim.plans == real.plans
    assert sim_records == real_records  # same clock, so the same token times and outcomes
    if turns > 1:  # later turns ran, on the KV their conversations left
        assert sum(status == "ok" for i, (status, _) in enumerate(real_records) if i % turns) >= 8
    if policy == "slo" and turns == 1:
        assert any(preempted for _, preempted, _ in real.plans)
        assert {status for status, _ in real_records} >= {"ok"}
