"""pacer bench metrics on hand-made timelines; times are binary fractions so most expectations are exact."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pacer.bench.metrics import (
    RequestRecord,
    SLOTargets,
    fluidity_index,
    meets_slo,
    parse_slo_classes,
    percentiles,
    request_metrics,
    summarize,
)


def record(index: int = 0, sent_s: float | None = 0.0, token_times_s: list[float] | None = None, status: str = "ok",
           error_kind: str | None = None, num_prompt_tokens: int = 8, **kwargs) -> RequestRecord:
    times = list(token_times_s or [])
    finished = times[-1] if times and status == "ok" else None
    return RequestRecord(index=index, num_prompt_tokens=num_prompt_tokens, max_tokens=max(len(times), 1),
                         scheduled_s=sent_s, sent_s=sent_s, token_times_s=times, finished_s=finished,
                         status=status, error_kind=error_kind, **kwargs)


def stream(sent_s: float, ttft_s: float, gaps: list[float]) -> list[float]:
    """Token times from a TTFT and the gaps after it."""
    times = [sent_s + ttft_s]
    for gap in gaps:
        times.append(times[-1] + gap)
    return times


def test_simple_request():
    m = request_metrics(record(sent_s=1.0, token_times_s=[1.5, 1.75, 2.0, 2.5]))
    assert m.ttft_s == 0.5
    assert m.tbt_s == [0.25, 0.25, 0.5]
    assert m.e2e_s == 1.5
    assert m.tpot_s == pytest.approx((1.5 - 0.5) / 3)
    assert m.normalized_latency_s == 1.5 / 4
    assert m.max_tbt_s == 0.5
    assert m.p99_tbt_s == pytest.approx(0.25 + 0.98 * 0.25)  # linear: index 0.99 * 2 = 1.98


def test_one_token_request():
    m = request_metrics(record(sent_s=0.0, token_times_s=[0.5]))
    assert (m.ttft_s, m.e2e_s, m.normalized_latency_s) == (0.5, 0.5, 0.5)
    assert m.tbt_s == [] and m.tpot_s is None and m.max_tbt_s is None and m.p99_tbt_s is None
    assert meets_slo(m, SLOTargets(ttft_s=1.0, tbt_s=0.001)) == (True, True)  # no gaps: TBT is met
    assert meets_slo(m, SLOTargets(ttft_s=0.25)) == (False, True)


def test_no_tokens_misses_ttft_only_if_promised():
    m = request_metrics(record(token_times_s=[]))
    assert m.ttft_s is None and m.e2e_s is None and m.normalized_latency_s is None
    assert meets_slo(m, SLOTargets(ttft_s=1.0, tbt_s=0.1)) == (False, True)
    assert meets_slo(m, SLOTargets()) == (True, True)


def test_stall_p99_versus_mean_verdicts():
    # 10 gaps: nine of 125 ms and one 1 s stall. Mean 212.5 ms meets a 250 ms SLO, P99 (~921 ms) does not.
    m = request_metrics(record(token_times_s=stream(0.0, 0.25, [0.125] * 9 + [1.0])))
    assert m.tpot_s == pytest.approx(0.2125)
    assert m.p99_tbt_s == pytest.approx(0.125 + 0.91 * 0.875)  # index 0.99 * 9 = 8.91
    assert m.max_tbt_s == 1.0
    assert meets_slo(m, SLOTargets(tbt_s=0.25, tbt_stat="mean")) == (True, True)
    assert meets_slo(m, SLOTargets(tbt_s=0.25, tbt_stat="p99")) == (True, False)
    # The other way round: one 100 s stall among 200 gaps leaves P99 at 125 ms but the mean at ~622 ms.
    m = request_metrics(record(token_times_s=stream(0.0, 0.25, [0.125] * 200 + [100.0])))
    assert m.p99_tbt_s == 0.125
    assert m.tpot_s == pytest.approx((200 * 0.125 + 100.0) / 201)
    assert meets_slo(m, SLOTargets(tbt_s=0.25, tbt_stat="p99")) == (True, True)
    assert meets_slo(m, SLOTargets(tbt_s=0.25, tbt_stat="mean")) == (True, False)


def test_slo_validation():
    with pytest.raises(ValueError, match="tbt_stat"):
        SLOTargets(tbt_s=0.1, tbt_stat="p50")
    with pytest.raises(ValueError, match="ttft_s"):
        SLOTargets(ttft_s=0.0)


def test_attainment_and_goodput_count_rejected_and_failed():
    slo = SLOTargets(ttft_s=1.0, tbt_s=0.25)
    good = [record(i, sent_s=float(i), token_times_s=stream(float(i), 0.5, [0.125] * 3)) for i in range(5)]
    late_first = record(5, token_times_s=stream(0.0, 2.0, [0.125] * 3))  # misses TTFT only
    stalled = record(6, token_times_s=stream(0.0, 0.5, [1.0, 1.0, 1.0]))  # misses TBT only
    rejected = [record(7 + i, token_times_s=[], status="rejected", error_kind="http_429", retry_after_s=1.0)
                for i in range(2)]
    # Failed mid-stream after on-time tokens: still not good, and not in the latency percentiles.
    failed = record(9, token_times_s=stream(0.0, 0.5, [0.125]), status="failed", error_kind="network")
    records = good + [late_first, stalled] + rejected + [failed]
    s = summarize(records, slo, duration_s=2.0, offered_rate=5.0)
    assert (s.num_requests, s.num_completed, s.num_rejected, s.num_failed) == (10, 7, 2, 1)
    assert s.num_failed_by_kind == {"network": 1}
    assert (s.rejected_fraction, s.failed_fraction) == (0.2, 0.1)
    assert s.num_good == 5
    assert s.slo_attainment == 0.5  # 5 of all 10 requests, not of the 7 completed
    assert s.ttft_attainment == 0.6  # the 5 good + the stalled one
    assert s.tbt_attainment == 0.6  # the 5 good + the late-first one
    assert s.goodput == 2.5  # attainment x offered rate: the arrival window's, not the run's length
    assert "offered rate" in s.goodput_definition
    late = summarize(records, slo, duration_s=8.0, offered_rate=5.0)  # the same requests, the last one later
    assert late.goodput == s.goodput and late.request_throughput == s.request_throughput / 4
    closed = summarize(records, slo, duration_s=2.0)  # closed loop: no offered rate, so wall time
    assert closed.goodput == 2.5 and "wall time" in closed.goodput_definition
    assert s.request_throughput == 3.5
    assert s.output_token_throughput == 7 * 4 / 2.0
    assert s.total_token_throughput == (7 * 4 + 7 * 8) / 2.0
    assert s.offered_rate == 5.0 and s.duration_s == 2.0
    assert s.ttft_s["max"] == 2.0 and s.ttft_s["p50"] == 0.5


def test_percentiles_match_numpy():
    values = np.random.default_rng(0).exponential(0.05, size=257).tolist()
    p = percentiles(values)
    assert list(p) == ["p50", "p90", "p95", "p99", "max", "mean"]
    for q in (50, 90, 95, 99):
        assert p[f"p{q}"] == np.percentile(values, q)
    assert p["max"] == max(values) and p["mean"] == pytest.approx(np.mean(values))
    assert list(percentiles(values, qs=(99.9,))) == ["p99.9", "max", "mean"]
    assert all(math.isnan(v) for v in percentiles([]).values())


def test_tbt_pools_every_token_of_every_request():
    # One request with a single 1 s gap, one with ten 125 ms gaps: per token the 125 ms gaps dominate.
    short = record(0, token_times_s=stream(0.0, 0.5, [1.0]))
    long = record(1, token_times_s=stream(0.0, 0.5, [0.125] * 10))
    s = summarize([short, long], SLOTargets(), duration_s=1.0)
    assert s.tbt_s["p50"] == 0.125
    assert s.tbt_s["mean"] == pytest.approx((1.0 + 10 * 0.125) / 11)
    assert s.tbt_s["max"] == 1.0
    assert s.tpot_s["p50"] == pytest.approx((1.0 + 0.125) / 2)  # per request: each weighs the same


def test_fluidity_all_on_time():
    r = record(token_times_s=stream(0.0, 0.25, [0.125] * 10))
    assert fluidity_index(r, SLOTargets(ttft_s=0.25, tbt_s=0.125)) == 1.0


def test_fluidity_early_stall_costs_more_than_late_stall():
    slo = SLOTargets(ttft_s=0.25, tbt_s=0.125)
    # Same gaps, same order statistics: 8 gaps of 62.5 ms and one 875 ms stall, early or late.
    early = record(token_times_s=stream(0.0, 0.25, [0.0625, 0.875] + [0.0625] * 8))
    late = record(token_times_s=stream(0.0, 0.25, [0.0625] * 9 + [0.875]))
    m_early, m_late = request_metrics(early), request_metrics(late)
    assert m_early.p99_tbt_s == m_late.p99_tbt_s and m_early.tpot_s == m_late.tpot_s
    # Early: 62.5 ms banked, so the stall is 875 - 62.5 - 125 = 687.5 ms late: 1 + floor(5.5) = 6 missed.
    assert fluidity_index(early, slo) == 10 / 16
    # Late: 9 * 62.5 ms banked, the stall is 875 - 562.5 - 125 = 187.5 ms late: 1 + floor(1.5) = 2 missed.
    assert fluidity_index(late, slo) == 10 / 12
    assert fluidity_index(early, slo) < fluidity_index(late, slo)


def test_fluidity_deadlines_restart_after_a_late_token():
    slo = SLOTargets(tbt_s=0.125)
    # First token 1 s late past predicted prefill + slack -> misses 1 + floor(1 / 0.125) = 9; the rest are on
    # time relative to it.
    r = record(token_times_s=stream(0.0, 1.5, [0.125] * 4))
    assert fluidity_index(r, slo, predicted_prefill_s=0.25, slack_s=0.25) == 4 / 13
    # No TTFT promise and no slack: the schedule starts at the first token, which has no deadline.
    assert fluidity_index(r, slo) == 1.0
    assert fluidity_index(r, SLOTargets(ttft_s=1.0)) is None  # no TBT SLO
    assert fluidity_index(record(token_times_s=[]), slo) is None


def test_summarize_empty():
    s = summarize([], SLOTargets(ttft_s=1.0, tbt_s=0.1), duration_s=0.0)
    assert s.num_requests == 0 and s.num_good == 0 and s.mean_fluidity_index is None
    assert math.isnan(s.slo_attainment) and math.isnan(s.goodput) and math.isnan(s.ttft_s["p99"])
    data = s.to_json()
    json.dumps(data, allow_nan=False)
    assert data["goodput"] is None and data["ttft_s"]["p50"] is None


def test_summary_to_json_and_fluidity_and_scheduling_delay():
    slo = SLOTargets(ttft_s=0.25, tbt_s=0.125)
    records = [record(0, token_times_s=stream(0.0, 0.25, [0.125] * 4), server_scheduling_delay_s=0.0625),
               record(1, token_times_s=stream(0.0, 0.25, [0.0625, 0.875] + [0.0625] * 8))]
    s = summarize(records, slo, duration_s=4.0, offered_rate=0.5)
    assert s.mean_fluidity_index == pytest.approx((1.0 + 10 / 16) / 2)
    assert s.scheduling_delay_s["p50"] == 0.0625
    data = json.loads(json.dumps(s.to_json(), allow_nan=False))
    assert data["slo"] == {"ttft_s": 0.25, "tbt_s": 0.125, "tbt_stat": "p99", "classes": []}
    assert data["offered_rate"] == 0.5 and data["goodput"] == 0.25


def test_unknown_status_is_an_error():
    with pytest.raises(ValueError, match="request 3"):
        summarize([record(3, token_times_s=[1.0], status="timeout")], SLOTargets(), duration_s=1.0)


def test_slo_classes_parse_and_judge_each_request_by_its_class():
    classes = parse_slo_classes("interactive:0.3:1000:200, batch:0.7:20000:-")
    assert [(c.name, c.share, c.ttft_s, c.tbt_s) for c in classes] == [("interactive", 0.3, 1.0, 0.2),
                                                                         ("batch", 0.7, 20.0, None)]
    slo = SLOTargets(ttft_s=0.1, tbt_s=0.1, classes=classes)
    assert slo.of("batch") == SLOTargets(20.0, None) and slo.of(None) is slo
    records = [record(0, 0.0, stream(0.0, 2.0, [0.5]), slo_class="interactive"),  # TTFT 2 s > 1 s: missed
               record(1, 0.0, stream(0.0, 0.5, [0.1]), slo_class="interactive"),
               record(2, 0.0, stream(0.0, 2.0, [0.5]), slo_class="batch"),  # within the batch SLO
               record(3, 0.0, status="rejected", error_kind="http_429", slo_class="batch")]
    summary = summarize(records, slo, duration_s=10.0)
    assert summary.num_good == 2 and summary.attainment_by_class == {"interactive": 0.5, "batch": 0.5}
    for bad in ("a:1:x:1", "a:0.5:1:1", "a:1:1", "a:1:1:1,a:0:1:1", "a:1:-5:1"):
        with pytest.raises(ValueError):
            parse_slo_classes(bad)
