"""The report `pacer bench` and `pacer sim` both print and save: terminal tables, the JSON file, the plots' paths,
so that a bench run and a sim run compare line by line."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pacer.bench.capacity import Trial
from pacer.bench.metrics import Summary
from pacer.bench.workload import WorkloadConfig


def format_summary(summary: Summary) -> str:
    """A terminal table: latency percentiles in ms, then counts, throughput, attainment, goodput."""
    data = summary.to_json()
    lines = ["| metric | p50 | p90 | p95 | p99 | max | mean |", "|---|---|---|---|---|---|---|"]
    for name, key in (("TTFT (ms)", "ttft_s"), ("TBT (ms)", "tbt_s"), ("TPOT (ms)", "tpot_s"), ("E2E (ms)", "e2e_s"),
                      ("normalized latency (ms/token)", "normalized_latency_s"),
                      ("scheduling delay (ms)", "scheduling_delay_s"), ("429 answered in (ms)", "rejection_latency_s")):
        stats = data.get(key) or {}
        if all(v is None for v in stats.values()):
            continue
        cells = [_ms(stats.get(q)) for q in ("p50", "p90", "p95", "p99", "max", "mean")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"{key}: {_plain(value)}")
    return "\n".join(lines)


def format_trial(t: Trial, condition: str) -> str:
    """One line per capacity trial (bench and sim); the scheduling delay where the server reports it."""
    s = t.summary
    delay = _ms(s.scheduling_delay_s.get("p50"))
    return (f"rate {t.rate:.4g} req/s: {'meets' if t.met else 'misses'} {condition} | goodput {s.goodput:.4g} "
            f"req/s, attainment {s.slo_attainment:.1%}, P99 TBT {_ms(s.tbt_s.get('p99'))} ms, "
            f"TTFT p50 {_ms(s.ttft_s.get('p50'))} ms" + (f", scheduling delay p50 {delay} ms" if delay else "")
            + f", rejected {s.num_rejected}, failed {s.num_failed}")


def format_compare(summaries: dict[str, Summary]) -> str:
    """One column per configuration, one row per figure."""
    rows = [("output tok/s", lambda s: f"{s.output_token_throughput:.1f}"),
            ("requests ok / rejected / failed", lambda s: f"{s.num_completed} / {s.num_rejected} / {s.num_failed}")]
    for label, key in (("TTFT", "ttft_s"), ("TBT", "tbt_s"), ("TPOT", "tpot_s"), ("E2E", "e2e_s")):
        for q in ("p50", "p99"):
            rows.append((f"{label} {q} (ms)", lambda s, key=key, q=q: _ms(getattr(s, key).get(q))))
    rows += [("429 answered in, p99 (ms)", lambda s: _ms(s.rejection_latency_s.get("p99"))),
             ("SLO attainment", lambda s: f"{s.slo_attainment:.1%}"),
             ("attainment of accepted", lambda s: f"{s.accepted_attainment:.1%}"),
             *((f"attainment: {c.name}", lambda s, c=c: f"{s.attainment_by_class[c.name]:.1%}")
               for c in next(iter(summaries.values())).slo.classes),
             ("goodput (req/s)", lambda s: f"{s.goodput:.3g}"),
             ("token counts off usage", lambda s: str(s.num_token_count_mismatch))]
    names = list(summaries)
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(cell(summaries[n]) for n in names) + " |" for label, cell in rows]
    return "\n".join(lines)


def workload_title(workload: WorkloadConfig) -> str:
    """The plots' title: how many requests, how they arrive, how long they are."""
    rate = f" at {workload.rate:g} req/s" if workload.arrival in ("poisson", "gamma") else ""
    return f"{workload.num_requests} requests, {workload.arrival}{rate}, lengths {workload.lengths}"


def print_plot_paths(paths: list[Path]) -> None:
    for path in paths:
        print(f"plot: {path}")


def save_report(out: Path | None, report: dict) -> None:
    """Write the JSON report (non-finite floats as null), if there is somewhere to write it."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=_json_default))
    print(f"report: {out}")


def offered_rate(requests: list) -> float | None:
    """Requests/s: arrivals over their window, times the requests each brings (its conversation's turns)."""
    times = [r.arrival_s for r in requests if r.arrival_s is not None]
    if len(times) < 2 or max(times) <= min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times)) * len(requests) / len(times)


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


def _ms(seconds: float | None) -> str:
    return "" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.1f}"


def _plain(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
