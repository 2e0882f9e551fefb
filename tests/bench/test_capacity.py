"""Capacity search on a stub server whose capacity is known: records made so that latency grows with the rate."""

from __future__ import annotations

import pytest

from pacer.bench.capacity import meets, search_capacity
from pacer.bench.metrics import RequestRecord, SLOTargets, summarize

SLO_ = SLOTargets(ttft_s=1.0, tbt_s=0.1)


def stub_trial(capacity: float, calls: list[float] | None = None):
    """A server whose every gap is 0.05 s below `capacity` and 0.2 s above; TTFT 0.5 s / 3 s likewise."""
    def trial(rate: float):
        if calls is not None:
            calls.append(rate)
        gap, ttft = (0.05, 0.5) if rate <= capacity else (0.2, 3.0)
        records = []
        for i in range(20):
            sent = i / rate
            times = [sent + ttft + k * gap for k in range(10)]
            records.append(RequestRecord(i, 16, 10, sent, sent, times, times[-1], 10))
        return summarize(records, SLO_, duration_s=20 / rate, offered_rate=rate)
    return trial


@pytest.mark.parametrize("condition", ["p99_tbt", "attainment"])
@pytest.mark.parametrize("capacity", [0.7, 3.7, 11.0])
def test_search_finds_a_known_capacity_within_tolerance(condition, capacity):
    result = search_capacity(stub_trial(capacity), condition, SLO_, low=0.5, high=2.0, tolerance=0.05,
                             max_trials=20)
    assert capacity / 1.05 <= result.capacity <= capacity
    assert all(t.met == (t.rate <= capacity) for t in result.trials)
    rates = [rate for rate, _, _ in result.curve()]
    assert rates == sorted(rates)


def test_below_the_lowest_rate_the_capacity_is_zero():
    calls: list[float] = []
    result = search_capacity(stub_trial(0.1, calls), "attainment", SLO_, low=0.5, high=2.0)
    assert result.capacity == 0 and calls == [0.5]


def test_the_trial_budget_is_respected():
    calls: list[float] = []
    search_capacity(stub_trial(1000.0, calls), "p99_tbt", SLO_, low=1, high=2, max_trials=5)
    assert len(calls) == 5


def test_conditions_need_their_slos_and_a_known_name():
    summary = stub_trial(1.0)(0.5)
    with pytest.raises(ValueError, match="TBT SLO"):
        meets(summary, "p99_tbt", SLOTargets(ttft_s=1.0))
    with pytest.raises(ValueError, match="condition must be"):
        meets(summary, "sarathi", SLO_)  # a scheduler, not a condition
    with pytest.raises(ValueError, match="low < high"):
        search_capacity(stub_trial(1.0), "p99_tbt", SLO_, low=2, high=1)
