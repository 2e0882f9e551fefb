"""What `pacer bench` reports: per-request TTFT, TBT, TPOT, E2E and fluidity-index, and the run's summary
(percentiles, SLO attainment, goodput), under the names and definitions of METRICS.md. Pure Python + numpy.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import Any

import numpy as np

STATUSES = ("ok", "rejected", "failed")
TBT_STATS = ("p99", "mean")


@dataclass
class RequestRecord:
    """What the client saw of one request; all times are seconds from the start of the run (perf_counter offsets)."""

    index: int
    num_prompt_tokens: int
    max_tokens: int
    scheduled_s: float | None  # when the workload said to send it (None in closed loop)
    sent_s: float | None = None  # when it was actually sent
    # Arrival time of every output token (a chunk carrying k tokens contributes k equal times).
    token_times_s: list[float] = field(default_factory=list)
    finished_s: float | None = None  # when the stream ended ([DONE] / response complete)
    output_tokens: int | None = None  # from the server's usage
    # tokens timestamped - the final usage's completion_tokens, where both are known and differ (a flag, not a
    # failure: a server that reports no per-chunk usage is counted by tokenizing its text, which may be off by one)
    token_count_error: int | None = None
    status: str = "ok"  # "ok" | "rejected" (HTTP 429, or 503: refused for load) | "failed"
    error_kind: str | None = None  # e.g. "http_4xx", "http_5xx", "network", "timeout", "malformed_sse", ...
    error: str | None = None
    retry_after_s: float | None = None
    server_scheduling_delay_s: float | None = None  # if the server reports it
    slo_class: str | None = None  # the request's SLO class, if the run has classes
    turn: int = 0  # its place in a multi-turn conversation (0: the first, or a single request)


def records_json(records: list[RequestRecord]) -> list[dict[str, Any]]:
    """The records as the JSON report holds them; shallow (dataclasses.asdict would deep-copy every token time)."""
    return [dict(vars(r)) for r in records]


@dataclass(frozen=True)
class SLOClass:
    """A class of requests with its own SLO (e.g. interactive and batch), drawn for a `share` of the requests."""

    name: str
    share: float
    ttft_s: float | None
    tbt_s: float | None


def parse_slo_classes(text: str | None) -> tuple[SLOClass, ...]:
    """'interactive:0.3:1000:200,batch:0.7:20000:1000' (NAME:SHARE:TTFT_MS:TBT_MS; '-' for no promise)."""
    if not text:
        return ()
    classes = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 4 or not parts[0]:
            raise ValueError(f"an SLO class is NAME:SHARE:TTFT_MS:TBT_MS, got {item!r}")
        try:
            share = float(parts[1])
            ttft, tbt = (None if v == "-" else float(v) / 1e3 for v in parts[2:])
        except ValueError:
            raise ValueError(f"an SLO class is NAME:SHARE:TTFT_MS:TBT_MS with numbers, got {item!r}") from None
        if not 0 < share <= 1 or any(v is not None and not v > 0 for v in (ttft, tbt)):
            raise ValueError(f"SLO class {item!r}: the share must be in (0, 1] and the SLOs positive")
        classes.append(SLOClass(parts[0], share, ttft, tbt))
    if len({c.name for c in classes}) != len(classes):
        raise ValueError(f"SLO class names repeat in {text!r}")
    if abs(sum(c.share for c in classes) - 1) > 1e-6:
        raise ValueError(f"SLO class shares must add up to 1, got {sum(c.share for c in classes):g}")
    return tuple(classes)


@dataclass(frozen=True)
class SLOTargets:
    """The latency promised to every request of a run, which its report judges each request against (what a request
    itself carries is `pacer.request.SLO`); None means no promise on that metric. With `classes`, a request of a
    class is promised that class's SLO instead (`of`).

    A request meets TBT if its P99 gap (`tbt_stat="p99"`) or its mean gap (`"mean"`, which is its TPOT) is
    <= tbt_s.
    """

    ttft_s: float | None = None
    tbt_s: float | None = None
    tbt_stat: str = "p99"
    classes: tuple[SLOClass, ...] = ()

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tbt_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"SLOTargets.{name} must be > 0 or None, got {value!r}")
        if self.tbt_stat not in TBT_STATS:
            raise ValueError(f"SLOTargets.tbt_stat must be one of {TBT_STATS}, got {self.tbt_stat!r}")

    def of(self, slo_class: str | None) -> SLOTargets:
        """The SLO of a request of this class (the run's own for None or an unknown class)."""
        for c in self.classes:
            if c.name == slo_class:
                return SLOTargets(c.ttft_s, c.tbt_s, self.tbt_stat)
        return self


@dataclass(frozen=True)
class RequestMetrics:
    """One request's latencies in seconds; None where the request has too few tokens to define one.

    tpot_s is also the request's mean TBT: (E2E - TTFT) / (n - 1) = (last - first token) / (n - 1).
    """

    ttft_s: float | None
    tbt_s: list[float]  # gaps between consecutive tokens; n - 1 of them
    tpot_s: float | None  # None with fewer than 2 tokens
    e2e_s: float | None  # send -> last token
    normalized_latency_s: float | None  # E2E / output tokens
    max_tbt_s: float | None
    p99_tbt_s: float | None


def request_metrics(record: RequestRecord) -> RequestMetrics:
    """Latencies from the client's timeline; output tokens = len(token_times_s), whatever usage says."""
    times = record.token_times_s
    n = len(times)
    gaps = [later - earlier for earlier, later in pairwise(times)]
    sent = record.sent_s
    ttft = times[0] - sent if n and sent is not None else None
    e2e = times[-1] - sent if n and sent is not None else None
    tpot = (times[-1] - times[0]) / (n - 1) if n >= 2 else None
    return RequestMetrics(
        ttft_s=ttft,
        tbt_s=gaps,
        tpot_s=tpot,
        e2e_s=e2e,
        normalized_latency_s=e2e / n if e2e is not None else None,
        max_tbt_s=max(gaps) if gaps else None,
        p99_tbt_s=float(np.percentile(gaps, 99)) if gaps else None,
    )


def meets_slo(metrics: RequestMetrics, slo: SLOTargets) -> tuple[bool, bool]:
    """(meets TTFT, meets TBT). A part the SLO leaves out is met; a request with no gaps meets TBT;
    a request with no first token does not meet a TTFT promise."""
    meets_ttft = slo.ttft_s is None or (metrics.ttft_s is not None and metrics.ttft_s <= slo.ttft_s)
    if slo.tbt_s is None or not metrics.tbt_s:
        return meets_ttft, True
    gap = metrics.p99_tbt_s if slo.tbt_stat == "p99" else metrics.tpot_s
    return meets_ttft, gap <= slo.tbt_s


def fluidity_index(record: RequestRecord, slo: SLOTargets, predicted_prefill_s: float = 0.0,
                   slack_s: float | None = None) -> float | None:
    """Etalon's fluidity-index (arXiv 2407.07000 §4; etalon/metrics/metric_utils.py): fraction of deadlines met.

    Our reading, which reproduces Etalon's `get_request_level_deadline_miss_rate` token for token:
    - At arrival (sent_s) the first token's deadline is sent_s + predicted_prefill_s + slack_s (slack_s defaults
      to slo.ttft_s). Every later token's deadline is the previous deadline + slo.tbt_s.
    - A token at or before its deadline meets it (one deadline met). Because the next deadline follows the
      previous *deadline*, not the token, an early token banks its slack for later ones, without limit.
    - A token after its deadline d misses d and every deadline d + k*tbt_s (k >= 1) up to its arrival t:
      1 + floor((t - d) / tbt_s) deadlines missed, none met. Later deadlines restart from it: the next token's
      deadline is t + tbt_s, with no banked slack.
    - index = met / (met + missed).
    An early stall finds little banked slack and misses more deadlines than the same stall late, unlike P99 TBT
    and TPOT, which cannot tell them apart. With neither slack_s nor slo.ttft_s the first token has no deadline
    (Etalon's should_ignore_first_token) and the schedule starts at it. None if slo.tbt_s is None, the request
    was never sent, or it has no tokens; 1.0 if it has no deadlines at all (one token, first one ignored).
    """
    times = record.token_times_s
    if slo.tbt_s is None or record.sent_s is None or not times:
        return None
    tbt = slo.tbt_s
    slack = slo.ttft_s if slack_s is None else slack_s
    if slack is None:
        anchor, times = times[0], times[1:]  # the next deadline is anchor + k * tbt
        k = 1
    else:
        anchor = record.sent_s + predicted_prefill_s + slack
        k = 0
    met = missed = 0
    for t in times:
        deadline = anchor + k * tbt  # from the anchor, so rounding does not accumulate over long requests
        if t <= deadline:
            met += 1
            k += 1
        else:
            missed += 1 + math.floor((t - deadline) / tbt)
            anchor, k = t, 1
    total = met + missed
    return met / total if total else 1.0


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 95, 99)) -> dict[str, float]:
    """{"p50": ..., "max": ..., "mean": ...} with numpy's default (linear) interpolation.

    Empty input gives NaN under every key, so report tables keep their columns (to_json turns NaN into None).
    """
    keys = [f"p{q:g}" for q in qs] + ["max", "mean"]
    if len(values) == 0:
        return dict.fromkeys(keys, math.nan)
    array = np.asarray(values, dtype=float)
    result = {f"p{q:g}": float(v) for q, v in zip(qs, np.percentile(array, list(qs)))}
    result["max"] = float(array.max())
    result["mean"] = float(array.mean())
    return result


@dataclass(frozen=True)
class Summary:
    """One run, as `pacer bench` reports it.

    Goodput is never read alone: rejecting or abandoning requests raises it, and delaying tokens can improve tail
    TBT (arXiv 2410.14257). So the summary always carries the rejected and failed fractions and the offered rate
    beside it, and attainment counts rejected and failed requests as missing their SLO (denominator: all
    requests). Latency percentiles, throughputs and the fluidity-index cover the requests that completed ok.
    """

    slo: SLOTargets
    num_requests: int
    num_completed: int  # status "ok"
    num_rejected: int  # HTTP 429 or 503
    num_failed: int
    num_failed_by_kind: dict[str, int]  # error_kind -> count ("unknown" when the client gave none)
    rejected_fraction: float  # of all requests
    failed_fraction: float
    duration_s: float
    offered_rate: float | None  # requests/s the workload asked for (None in closed loop)
    request_throughput: float  # completed requests/s
    output_token_throughput: float  # tokens/s
    total_token_throughput: float  # prompt + output tokens/s
    ttft_s: dict[str, float]  # per request
    tbt_s: dict[str, float]  # per token: every gap of every request, pooled
    tpot_s: dict[str, float]  # per request
    e2e_s: dict[str, float]
    normalized_latency_s: dict[str, float]
    scheduling_delay_s: dict[str, float]  # where the server reports it
    num_good: int  # completed ok and met every SLO
    slo_attainment: float  # num_good / num_requests
    accepted_attainment: float  # num_good / requests not rejected: did the server keep the promises it took?
    ttft_attainment: float
    tbt_attainment: float
    goodput: float  # open loop: slo_attainment x offered_rate; closed loop: good requests / duration_s
    mean_fluidity_index: float | None  # None without a TBT SLO
    rejection_latency_s: dict[str, float]  # send -> the 429 answer, per rejected request
    goodput_definition: str  # how goodput was computed for this run (open or closed loop)
    num_token_count_mismatch: int  # completed requests whose timestamped tokens differ from their usage
    attainment_by_class: dict[str, float] = field(default_factory=dict)  # SLO attainment within each SLO class
    # multi-turn: the TTFT of turns after the first, whose prompts open with the conversation so far
    ttft_later_turns_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A dict json.dumps accepts with allow_nan=False: NaN becomes None."""
        return _nan_to_none(asdict(self))


GOODPUT_OPEN_LOOP = "requests meeting every SLO / all requests x offered rate (the offered arrival window)"
GOODPUT_CLOSED_LOOP = "requests meeting every SLO / wall time of the run (closed loop)"


def summarize(records: list[RequestRecord], slo: SLOTargets, duration_s: float, offered_rate: float | None = None,
              predict_prefill_s: Callable[[int], float] | None = None) -> Summary:
    """Fold a run's records into its Summary; predict_prefill_s(num_prompt_tokens) feeds the fluidity-index.

    With an offered rate (open loop) goodput is attainment x offered rate (METRICS.md): a server that finishes
    late is charged once, in attainment, not again in a longer run. Closed loop has no offered rate: wall time."""
    if duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s!r}")
    for record in records:
        if record.status not in STATUSES:
            raise ValueError(f"request {record.index}: status {record.status!r} is not one of {STATUSES}")
    ok = [r for r in records if r.status == "ok"]
    failed = [r for r in records if r.status == "failed"]
    num_rejected = sum(r.status == "rejected" for r in records)
    metrics = [request_metrics(r) for r in ok]
    verdicts = [meets_slo(m, slo.of(r.slo_class)) for m, r in zip(metrics, ok)]
    num_good = sum(ttft and tbt for ttft, tbt in verdicts)
    output_tokens = sum(r.output_tokens if r.output_tokens is not None else len(r.token_times_s) for r in ok)
    prompt_tokens = sum(r.num_prompt_tokens for r in ok)
    fluidity = [fluidity_index(r, slo, predict_prefill_s(r.num_prompt_tokens) if predict_prefill_s else 0.0)
                for r in ok]
    fluidity = [f for f in fluidity if f is not None]
    return Summary(
        slo=slo,
        num_requests=len(records),
        num_completed=len(ok),
        num_rejected=num_rejected,
        num_failed=len(failed),
        num_failed_by_kind=dict(Counter(r.error_kind or "unknown" for r in failed)),
        rejected_fraction=_ratio(num_rejected, len(records)),
        failed_fraction=_ratio(len(failed), len(records)),
        duration_s=duration_s,
        offered_rate=offered_rate,
        request_throughput=_ratio(len(ok), duration_s),
        output_token_throughput=_ratio(output_tokens, duration_s),
        total_token_throughput=_ratio(output_tokens + prompt_tokens, duration_s),
        ttft_s=percentiles([m.ttft_s for m in metrics if m.ttft_s is not None]),
        tbt_s=percentiles([gap for m in metrics for gap in m.tbt_s]),
        tpot_s=percentiles([m.tpot_s for m in metrics if m.tpot_s is not None]),
        e2e_s=percentiles([m.e2e_s for m in metrics if m.e2e_s is not None]),
        normalized_latency_s=percentiles([m.normalized_latency_s for m in metrics
                                          if m.normalized_latency_s is not None]),
        scheduling_delay_s=percentiles([r.server_scheduling_delay_s for r in ok
                                        if r.server_scheduling_delay_s is not None]),
        num_good=num_good,
        slo_attainment=_ratio(num_good, len(records)),
        accepted_attainment=_ratio(num_good, len(records) - num_rejected),
        ttft_attainment=_ratio(sum(ttft for ttft, _ in verdicts), len(records)),
        tbt_attainment=_ratio(sum(tbt for _, tbt in verdicts), len(records)),
        goodput=(_ratio(num_good, len(records)) * offered_rate if offered_rate is not None
                 else _ratio(num_good, duration_s)),
        mean_fluidity_index=float(np.mean(fluidity)) if fluidity else None,
        rejection_latency_s=percentiles([r.finished_s - r.sent_s for r in records if r.status == "rejected"
                                         and r.finished_s is not None and r.sent_s is not None]),
        goodput_definition=GOODPUT_OPEN_LOOP if offered_rate is not None else GOODPUT_CLOSED_LOOP,
        num_token_count_mismatch=sum(bool(r.token_count_error) for r in ok),
        attainment_by_class=_attainment_by_class(records, ok, verdicts, slo),
        ttft_later_turns_s=percentiles([m.ttft_s for m, r in zip(metrics, ok) if r.turn and m.ttft_s is not None])
        if any(r.turn for r in records) else {},
    )


def _attainment_by_class(records: list[RequestRecord], ok: list[RequestRecord], verdicts: list[tuple[bool, bool]],
                         slo: SLOTargets) -> dict[str, float]:
    """Share of each class's requests (all of them, refused and failed included) that met the class's SLO."""
    good = Counter(r.slo_class for r, (ttft, tbt) in zip(ok, verdicts) if ttft and tbt)
    total = Counter(r.slo_class for r in records)
    return {c.name: _ratio(good[c.name], total[c.name]) for c in slo.classes}


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN for an empty run (no requests or no time) rather than a crash."""
    return numerator / denominator if denominator else math.nan


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _nan_to_none(item) for key, item in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
