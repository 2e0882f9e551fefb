"""A replica's cached load figures are always what its engine's state gives now, and are computed once per change."""

from __future__ import annotations

import random

import pytest

from pacer.request import SLO, Request
from pacer.scheduling.admission import predict_ttft
from pacer.scheduling.router import router_class, with_hit
from pacer.sim.simulator import SimRequest
from tests.scheduling.helpers import curved
from tests.sim.test_simulator import simulator


class Checking:
    """The slo router, checking at every arrival that each replica's cached figures equal fresh ones."""

    def __init__(self) -> None:
        self.router = router_class("slo")()
        self.num_checked = 0

    def choose(self, request, replicas):
        for replica in replicas:
            scheduler = replica.engine.scheduler
            assert replica.num_outstanding_tokens == scheduler.num_outstanding_tokens
            planned = with_hit(request, replica.sent.cached_prompt_tokens(request))
            fresh = predict_ttft(scheduler.snapshot(), (), planned, scheduler.latency)
            assert replica.predicted_ttft_s(request) == fresh
            self.num_checked += 1
        return self.router.choose(request, replicas)


def test_cached_figures_follow_every_change_of_the_engine():
    sim = simulator(curved(), policy="slo", replicas=3, num_blocks=64)
    sim.router = checking = Checking()
    rng = random.Random(1)
    requests = [SimRequest(i, 0.02 * i, rng.randint(8, 300), rng.randint(1, 30),
                           SLO(ttft_s=rng.choice([0.3, 1.0]), tbt_s=0.1, priority=rng.choice([0, 1])))
                for i in range(120)]
    records = sim.run(requests)
    assert checking.num_checked == 3 * 120
    statuses = {r.status for r in records}
    assert "ok" in statuses and "rejected" in statuses  # the queues were long enough to refuse some


def test_figures_are_computed_once_per_change(monkeypatch):
    sim = simulator(curved(), policy="slo", replicas=1)
    replica = sim.replicas[0]
    scheduler = replica.engine.scheduler
    calls = []
    snapshot = scheduler.snapshot
    monkeypatch.setattr(scheduler, "snapshot", lambda: calls.append(1) or snapshot())
    probe = Request("p", [0] * 50, slo=SLO(ttft_s=1.0))
    first = replica.predicted_ttft_s(probe)
    assert replica.predicted_ttft_s(Request("p2", [0] * 50, slo=SLO(ttft_s=1.0))) == first
    assert len(calls) == 1
    replica.add_request(Request("r", [0] * 200, slo=SLO(ttft_s=1.0), arrival_s=0.0))
    assert replica.predicted_ttft_s(probe) > first and len(calls) == 2
    assert replica.num_outstanding_tokens == 200 + 16  # prompt + default max_tokens
    plan, _ = replica.begin_step()
    replica.predicted_ttft_s(probe)
    assert len(calls) == 3
    replica.end_step(plan, replica.engine.executor.execute(plan))
    assert replica.num_outstanding_tokens == scheduler.num_outstanding_tokens
    assert replica.predicted_ttft_s(probe) == pytest.approx(predict_ttft(snapshot(), (), probe, scheduler.latency))
    assert len(calls) == 4
