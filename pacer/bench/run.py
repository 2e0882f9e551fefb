"""`pacer bench run`, `capacity` and `compare`: workload -> load client -> summary -> terminal table and JSON report."""

from __future__ import annotations

import shlex
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from pacer.bench.capacity import CapacityResult, search_capacity
from pacer.bench.client import ClientConfig, LoadClient, run_loop
from pacer.bench.metrics import RequestRecord, SLOTargets, Summary, meets_slo, records_json, request_metrics, summarize
from pacer.bench.plots import plot_capacity, plot_compare, plot_run
from pacer.bench.report import (
    format_compare,
    format_summary,
    format_trial,
    offered_rate,
    print_plot_paths,
    save_report,
    workload_title,
)
from pacer.bench.servers import http_get, server_process
from pacer.bench.workload import BenchRequest, TokenizerLike, WorkloadConfig, build_workload
from pacer.heap import freeze_startup_heap
from pacer.model.weights import load_tokenizer, resolve_model_path


def run_bench(workload: WorkloadConfig, client: ClientConfig, slo: SLOTargets, tokenizer_model: str | None,
              out: Path | None, plots_dir: Path | None = None) -> Summary:
    """Build the workload with the target model's tokenizer, run it, print and save the report."""
    tokenizer = load_tokenizer(resolve_model_path(tokenizer_model))
    run = run_workload(build_workload(workload, tokenizer), workload, client, slo, tokenizer)
    summary = summarize(run.records, slo, run.duration_s, run.offered_rate)
    print(format_summary(summary))
    if run.prefix_cache_hit_rate is not None:
        print(f"prefix cache hit rate (the server's /metrics): {run.prefix_cache_hit_rate:.1%}")
    save_report(out, {"workload": asdict(workload), "client": run.client_json, "slo": asdict(slo),
                      "summary": summary.to_json(), "prefix_cache_hit_rate": run.prefix_cache_hit_rate,
                      "requests": records_json(run.records)})
    if plots_dir is not None:
        print_plot_paths(plot_run(run.records, slo, plots_dir, title=workload_title(workload)))
    return summary


def run_capacity(workload: WorkloadConfig, client: ClientConfig, slo: SLOTargets, tokenizer_model: str | None,
                 out: Path | None, condition: str, low: float, high: float, tolerance: float,
                 max_trials: int, plots_dir: Path | None = None) -> CapacityResult:
    """Binary-search the arrival rate (capacity.py), one full workload run per trial."""
    if workload.arrival not in ("poisson", "gamma"):
        raise ValueError(f"capacity search needs --arrival poisson or gamma, got {workload.arrival!r}")
    tokenizer = load_tokenizer(resolve_model_path(tokenizer_model))
    runs: dict[float, WorkloadRun] = {}

    def trial(rate: float) -> Summary:
        config = replace(workload, rate=rate)
        runs[rate] = run_workload(build_workload(config, tokenizer), config, client, slo, tokenizer)
        return summarize(runs[rate].records, slo, runs[rate].duration_s, runs[rate].offered_rate)

    result = search_capacity(trial, condition, slo, low, high, tolerance, max_trials,
                             on_trial=lambda t: print(format_trial(t, condition)))
    print(f"capacity ({condition}): {result.capacity:.3g} req/s after {len(result.trials)} trials")
    save_report(out, {"workload": asdict(workload), "client": next(iter(runs.values())).client_json, "slo": asdict(slo),
                      "condition": condition, "capacity": result.capacity, "curve": result.curve(),
                      "trials": [{"rate": t.rate, "met": t.met, "summary": t.summary.to_json(),
                                  "requests": records_json(runs[t.rate].records)} for t in result.trials]})
    if plots_dir is not None:
        print_plot_paths([plot_capacity({client.base_url: result.curve()}, plots_dir / "capacity.png",
                                        title=f"capacity ({condition}): {result.capacity:.3g} req/s")])
    return result


def run_compare(workload: WorkloadConfig, client: ClientConfig, slo: SLOTargets, tokenizer_model: str | None,
                out: Path | None, configs: dict[str, list[str]], plots_dir: Path | None = None) -> dict[str, Summary]:
    """Start each server command in turn (`pacer_command` for pacer's own; any OpenAI-compatible server with
    `{port}` in its command), send it the identical workload, stop it; report side by side."""
    tokenizer = load_tokenizer(resolve_model_path(tokenizer_model))
    requests = build_workload(workload, tokenizer)
    # each server's log and final /metrics beside the report, named after it, so runs sharing a folder keep theirs
    logs = out.with_suffix("") if out is not None else Path(tempfile.mkdtemp(prefix="pacer-compare-")) / "compare"
    runs: dict[str, WorkloadRun] = {}
    summaries: dict[str, Summary] = {}
    for name, command in configs.items():
        print(f"--- {name}: {shlex.join(command)}")
        with server_process(command, Path(f"{logs}-{name}.log")) as server:
            runs[name] = run_workload(requests, workload, replace(client, base_url=server.url, model=None), slo,
                                      tokenizer)
            _save_metrics(server.url, Path(f"{logs}-{name}.metrics.txt"))
        summaries[name] = summarize(runs[name].records, slo, runs[name].duration_s, runs[name].offered_rate)
    print(format_compare(summaries))
    save_report(out, {"workload": asdict(workload), "slo": asdict(slo), "configs": configs,
                      "runs": {name: {"client": run.client_json, "summary": summaries[name].to_json(),
                                      "requests": records_json(run.records)} for name, run in runs.items()}})
    if plots_dir is not None:
        print_plot_paths(plot_compare({name: run.records for name, run in runs.items()}, slo, plots_dir,
                                      title=workload_title(workload)))
    return summaries


@dataclass
class WorkloadRun:
    records: list[RequestRecord]
    duration_s: float
    offered_rate: float | None
    client_json: dict
    prefix_cache_hit_rate: float | None = None  # from the server's /metrics over the run, where it counts them


def run_workload(requests: list[BenchRequest], workload: WorkloadConfig, client: ClientConfig,
                 slo: SLOTargets, tokenizer: TokenizerLike | None = None) -> WorkloadRun:
    """Send `requests` (open loop, or closed loop for arrival=concurrency) with a live progress bar:
    requests ended by outcome and the goodput so far (good requests / time elapsed). The tokenizer counts the
    tokens of a chunk that comes without usage."""
    closed_loop = workload.arrival == "concurrency"
    counts = {"ok": 0, "rejected": 0, "failed": 0}
    num_good = 0
    with tqdm(total=len(requests), desc="bench", unit="req") as bar:
        def progress(record: RequestRecord) -> None:
            nonlocal num_good
            counts[record.status] += 1
            if record.status == "ok" and all(meets_slo(request_metrics(record), slo.of(record.slo_class))):
                num_good += 1
            goodput = num_good / max(load.now(), 1e-9)
            bar.set_postfix(counts | {"goodput": f"{goodput:.2f}/s"}, refresh=False)
            bar.update(1)

        count = (lambda text: len(tokenizer.encode(text))) if tokenizer is not None else None
        load = LoadClient(client, on_record=progress, slo=slo, count_tokens=count)
        before = prefix_cache_counters(client)
        freeze_startup_heap()  # a full GC pass here would delay the tokens it timestamps
        start = time.perf_counter()
        records = run_loop(load.run(requests, workload.concurrency if closed_loop else None))
        duration_s = time.perf_counter() - start
        after = prefix_cache_counters(client)
    client_json = asdict(client) | {"api_key": None, "model": load.model, "ignore_eos_honoured": load.ignore_eos}
    hit_rate = None
    if before is not None and after is not None and after[0] > before[0]:
        hit_rate = (after[1] - before[1]) / (after[0] - before[0])
    return WorkloadRun(records, duration_s, None if closed_loop else offered_rate(requests), client_json, hit_rate)


def metric_totals(base_url: str, api_key: str | None = None) -> dict[str, float] | None:
    """The server's /metrics, each sample summed over its labels, by sample name (a counter's `_total`, a histogram's
    `_sum` and `_count`); None if it serves none that parse."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        status, text = http_get(base_url + "/metrics", timeout_s=10, headers=headers)
        if status != 200:
            return None
        totals: dict[str, float] = defaultdict(float)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                totals[sample.name] += sample.value
    except (OSError, ValueError):
        return None
    return dict(totals)


def prefix_cache_counters(client: ClientConfig) -> tuple[float, float] | None:
    """(tokens queried, tokens hit) from the server's /metrics under vLLM's names (pacer's and vLLM's servers
    both export them, with their own prefixes); None if it has none."""
    sums = {"prefix_cache_queries_total": 0.0, "prefix_cache_hits_total": 0.0}
    found = False
    for name, value in (metric_totals(client.base_url, client.api_key) or {}).items():
        short = name.rpartition(":")[2]
        if short in sums:
            sums[short] += value
            found = True
    return (sums["prefix_cache_queries_total"], sums["prefix_cache_hits_total"]) if found else None


def _save_metrics(url: str, path: Path) -> None:
    """Keep the server's own /metrics as the run left them (latency-model error, rejections, ...)."""
    try:
        path.write_text(http_get(url + "/metrics", timeout_s=10)[1])
    except OSError as error:
        path.write_text(f"# /metrics unavailable: {error!r}\n")
