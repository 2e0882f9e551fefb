"""Speculation in the simulator: synthetic drafts, accepted as a seeded Bernoulli chain, sized by the real
scheduler's goodput policy."""

from __future__ import annotations

import json
import statistics

import pytest

from pacer.cli import main
from pacer.config import SchedulerConfig
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.latency.model import LinearLatencyModel
from pacer.scheduling import scheduler_class
from pacer.sim.executor import SimDrafter, SimExecutor
from pacer.sim.simulator import SimRequest, Simulator, VirtualClock
from tests.sim.test_sim_cli import WORKLOAD


def memory_bound() -> LinearLatencyModel:
    """20 ms of weight reads + 0.5 ms a token: at small batch a draft costs 2.5 % of an iteration."""
    return LinearLatencyModel([0.020, 0.0005, 0.0, 0.0, 0.0, 0.0], ())


def run(acceptance: float | None, policy: str = "sarathi", num_requests: int = 2):
    """Requests one at a time (low load), with speculation (at that acceptance rate) or without."""
    clock, latency = VirtualClock(), memory_bound()
    scheduler = scheduler_class(policy)(SchedulerConfig(scheduler=policy), KVCacheManager(256, 16, False), 4096,
                                        latency=latency.fresh())
    executor = SimExecutor(latency.fresh(), seed=3, acceptance_rate=acceptance or 0.0)
    drafter = SimDrafter(4) if acceptance is not None else None
    engine = Engine(scheduler, executor, Detokenizer(None), clock=clock, drafter=drafter)
    records = Simulator([engine], clock).run([SimRequest(i, 2.0 * i, 64, 100) for i in range(num_requests)])
    assert all(len(r.token_times_s) == 100 for r in records)
    tpot = statistics.mean((r.token_times_s[-1] - r.token_times_s[0]) / 99 for r in records)
    return tpot, scheduler


@pytest.mark.parametrize("policy", ["sarathi", "slo"])
def test_good_drafts_cut_the_tpot_at_low_load(policy):
    off, _ = run(None, policy)
    on, scheduler = run(0.8, policy)
    assert on < 0.5 * off
    assert scheduler.num_accepted_tokens > 0.4 * scheduler.num_draft_tokens  # 0.59 expected of rows of 4 at 0.8


def test_once_it_has_learnt_that_nothing_is_accepted_it_sends_almost_no_drafts():
    off, _ = run(None)
    on, scheduler = run(0.0)
    assert scheduler.num_accepted_tokens == 0
    # ~20 rows of one draft to learn it (each judges one draft), then a probe of one draft every ~5 tokens
    # (acceptance.py: ~0.5 % of the decode time)
    assert scheduler.num_draft_tokens < 0.5 * 2 * 100
    assert on < 1.02 * off


def test_the_acceptance_chain_is_seeded():
    assert run(0.6)[0] == run(0.6)[0]


def test_sim_flags_turn_speculation_on(tmp_path, capsys):
    profile = tmp_path / "profile.json"
    memory_bound().save(profile)
    out = tmp_path / "compare.json"
    assert main(["sim", "compare", "--profile", str(profile), *WORKLOAD, "--rate", "0.5", "--config", "off=",
                 "--config", "spec=--speculation ngram --num-speculative-tokens 3 --spec-acceptance-rate 0.9",
                 "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert "num_draft_tokens" not in runs["off"]["sim"] and runs["spec"]["sim"]["num_accepted_tokens"] > 0
    assert runs["spec"]["summary"]["tpot_s"]["p50"] < runs["off"]["summary"]["tpot_s"]["p50"]
    assert "drafts accepted" in capsys.readouterr().out
