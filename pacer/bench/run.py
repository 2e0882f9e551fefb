"""One benchmark run: workload -> load client -> summary -> terminal table and JSON report."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from pacer.bench.client import ClientConfig, LoadClient
from pacer.bench.metrics import SLO, RequestRecord, Summary, summarize
from pacer.bench.workload import WorkloadConfig, build_workload
from pacer.model.weights import load_tokenizer, resolve_model_path


def run_bench(workload: WorkloadConfig, client: ClientConfig, slo: SLO, tokenizer_model: str | None,
              out: Path | None) -> Summary:
    """Build the workload with the target model's tokenizer, run it, print and save the report."""
    requests = build_workload(workload, load_tokenizer(resolve_model_path(tokenizer_model)))
    closed_loop = workload.arrival == "concurrency"
    offered_rate = None if closed_loop else _offered_rate(requests)
    counts = {"ok": 0, "rejected": 0, "failed": 0}
    with tqdm(total=len(requests), desc="bench", unit="req") as bar:
        def progress(record: RequestRecord) -> None:
            counts[record.status] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)

        load = LoadClient(client, on_record=progress)
        start = time.perf_counter()
        records = asyncio.run(load.run(requests, workload.concurrency if closed_loop else None))
        duration_s = time.perf_counter() - start
    summary = summarize(records, slo, duration_s, offered_rate)
    print(format_summary(summary))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        report = {"workload": asdict(workload), "client": asdict(client) | {"api_key": None, "model": load.model},
                  "ignore_eos_honoured": load.ignore_eos, "slo": asdict(slo), "summary": summary.to_json(),
                  "requests": [asdict(r) for r in records]}
        out.write_text(json.dumps(report, indent=1, default=_json_default))
        print(f"report: {out}")
    return summary


def _offered_rate(requests: list) -> float | None:
    times = [r.arrival_s for r in requests if r.arrival_s is not None]
    if len(times) < 2 or max(times) <= min(times):
        return None
    return (len(times) - 1) / (max(times) - min(times))


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"cannot serialise {type(value).__name__}")


def format_summary(summary: Summary) -> str:
    """A terminal table: latency percentiles in ms, then counts, throughput, attainment, goodput."""
    data = summary.to_json()
    lines = ["| metric | p50 | p90 | p95 | p99 | max | mean |", "|---|---|---|---|---|---|---|"]
    for name, key in (("TTFT (ms)", "ttft_s"), ("TBT (ms)", "tbt_s"), ("TPOT (ms)", "tpot_s"), ("E2E (ms)", "e2e_s"),
                      ("normalized latency (ms/token)", "normalized_latency_s"),
                      ("scheduling delay (ms)", "scheduling_delay_s")):
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


def _ms(seconds: float | None) -> str:
    return "" if seconds is None or not math.isfinite(seconds) else f"{seconds * 1e3:.1f}"


def _plain(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
