"""Capacity: the highest arrival rate at which a server still meets a latency condition, by binary search.

Two conditions from the papers, named for what they check (not for the paper: `sarathi` is a scheduler):
- `p99_tbt` (Sarathi-Serve, OSDI'24): P99 TBT <= the TBT SLO and median scheduling delay <= 2 s.
  The client cannot see when a prefill starts, so until the server reports it, TTFT (which
  includes the scheduling delay) stands in: a conservative reading that can only lower capacity.
- `attainment` (DistServe, OSDI'24): at least 90 % of requests meet both the TTFT and TBT SLOs.
Each trial runs the whole workload at one rate; latency only grows with load, so the condition is
taken as monotone in the rate and the search keeps [highest rate that met it, lowest that did not].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from pacer.bench.metrics import SLOTargets, Summary

CONDITIONS = ("p99_tbt", "attainment")
MAX_SCHEDULING_DELAY_S = 2.0  # Sarathi-Serve's median scheduling-delay bound
MIN_ATTAINMENT = 0.9  # DistServe's attainment bar


@dataclass(frozen=True)
class Trial:
    rate: float
    met: bool
    summary: Summary


@dataclass
class CapacityResult:
    capacity: float  # the highest rate that met the condition (0 if even the lowest did not)
    condition: str
    trials: list[Trial] = field(default_factory=list)

    def curve(self) -> list[tuple[float, float, float]]:
        """(rate, goodput, attainment) per trial, by rate: the data of the goodput-vs-rate plot."""
        return sorted((t.rate, t.summary.goodput, t.summary.slo_attainment) for t in self.trials)


def meets(summary: Summary, condition: str, slo: SLOTargets) -> bool:
    """Does one trial's summary satisfy the capacity condition?"""
    if condition == "p99_tbt":
        if slo.tbt_s is None:
            raise ValueError("the p99_tbt condition needs a TBT SLO (--slo-tbt-ms)")
        delay = summary.scheduling_delay_s.get("p50")
        if delay is None or not math.isfinite(delay):
            delay = summary.ttft_s.get("p50")
        p99_tbt = summary.tbt_s.get("p99")
        ok = summary.num_completed > 0 and summary.num_failed == 0 and summary.num_rejected == 0
        return bool(ok and p99_tbt is not None and p99_tbt <= slo.tbt_s and delay is not None
                    and delay <= MAX_SCHEDULING_DELAY_S)
    if condition == "attainment":
        if slo.ttft_s is None and slo.tbt_s is None:
            raise ValueError("the attainment condition needs a TTFT or TBT SLO")
        return bool(summary.slo_attainment >= MIN_ATTAINMENT)
    raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")


def search_capacity(trial: Callable[[float], Summary], condition: str, slo: SLOTargets, low: float, high: float,
                    tolerance: float = 0.05, max_trials: int = 12,
                    on_trial: Callable[[Trial], None] | None = None) -> CapacityResult:
    """Binary search on the rate between `low` and `high` (doubling `high` while it still meets).

    Stops when the bracket is within `tolerance` (relative) or after `max_trials` trials.
    """
    if not 0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
    result = CapacityResult(0.0, condition)

    def run(rate: float) -> bool:
        summary = trial(rate)
        outcome = Trial(rate, meets(summary, condition, slo), summary)
        result.trials.append(outcome)
        if on_trial is not None:
            on_trial(outcome)
        return outcome.met

    if not run(low):
        return result  # capacity is below the lowest rate tried
    good, bad = low, None
    while bad is None and len(result.trials) < max_trials:
        if run(high):
            good, high = high, high * 2
        else:
            bad = high
    while bad is not None and bad / good - 1 > tolerance and len(result.trials) < max_trials:
        middle = (good + bad) / 2
        if run(middle):
            good = middle
        else:
            bad = middle
    result.capacity = good
    return result
