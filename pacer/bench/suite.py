"""`pacer bench suite`: the pre-registered benchmark suite. One TOML file names every workload, rate, SLO, seed
and server configuration; this module runs all of it against each server in turn and writes the raw records, a
JSON report and the markdown tables the README quotes.

Headline figures are capacities: the highest rate of the workload's ladder at which >= `attainment_bar` of all
requests (refusals and failures count as misses) meet every SLO, that rate and every lower one, per repeat. A
ratio between two servers is claimed only where their repeats' ranges do not overlap; otherwise "level".
"""

from __future__ import annotations

import gzip
import json
import math
import os
import statistics
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from pacer.bench.client import ClientConfig
from pacer.bench.metrics import RequestRecord, SLOTargets, Summary, parse_slo_classes, records_json, summarize
from pacer.bench.run import run_workload
from pacer.bench.servers import server_process
from pacer.bench.trace import read_trace
from pacer.bench.workload import TokenizerLike, WorkloadConfig, build_workload

_WORKLOAD_FIELDS = {f.name for f in fields(WorkloadConfig)} - {"rate", "num_requests", "seed", "time_scale"}
SLO_KINDS = ("tpot", "tbt")  # the decode SLO a run is judged by: mean gap per request, or its p99 gap


@dataclass(frozen=True)
class SuiteSLO:
    """The SLOs every request is judged by (a workload with SLO classes uses its classes' instead)."""

    ttft_ms: float
    tpot_ms: float  # the common decode SLO: a request's mean time per output token
    tbt_ms: float  # the strict variant: a request's p99 gap between tokens

    def judged(self, kind: str, classes: str | None = None) -> SLOTargets:
        classes_ = parse_slo_classes(classes)
        if kind == "tpot":
            return SLOTargets(self.ttft_ms / 1e3, self.tpot_ms / 1e3, "mean", classes_)
        return SLOTargets(self.ttft_ms / 1e3, self.tbt_ms / 1e3, "p99", classes_)


@dataclass(frozen=True)
class ServerSpec:
    """A server command; `{port}`, `{python}` (this interpreter) and `{peers}` ($PACER_PEERS, default
    /work/peers) are filled in. `requires` names a file that must exist (a peer's venv), else the server is
    skipped and the report says so. Servers sharing a `group` are one peer's settings: its best is reported."""

    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    requires: str | None = None
    group: str | None = None

    def resolved(self, text: str) -> str:
        return text.replace("{python}", sys.executable).replace("{peers}", os.environ.get("PACER_PEERS", "/work/peers"))

    @property
    def missing(self) -> str | None:
        path = self.resolved(self.requires) if self.requires else None
        return path if path is not None and not Path(path).exists() else None


@dataclass(frozen=True)
class WorkloadSpec:
    """One workload: WorkloadConfig fields, and the ladder of offered rates it is run at. Trace arrivals are
    time-scaled to each rate (the trace's own rate over the requests used / the rate)."""

    name: str
    rates: tuple[float, ...]
    config: WorkloadConfig
    kinds: tuple[str, ...] = SLO_KINDS

    def at(self, rate: float, num_requests: int, seed: int) -> WorkloadConfig:
        config = replace(self.config, rate=rate, num_requests=num_requests, seed=seed)
        if config.arrival != "trace":
            return config
        records = read_trace(config.trace, config.trace_format)[:num_requests]
        span_s = records[-1].timestamp_s - records[0].timestamp_s
        if not span_s > 0:
            raise ValueError(f"workload {self.name}: the first {num_requests} records of {config.trace} arrive at "
                             "once, so no time scale gives a rate; use poisson arrivals with its lengths")
        return replace(config, time_scale=(num_requests - 1) / span_s / rate)


@dataclass(frozen=True)
class Suite:
    repeats: int
    # each run's arrival window: a run at rate r opens max(min_requests, r x window_s) conversations (a single
    # request is a conversation of one turn), so it sends that many times the workload's turns requests
    window_s: float
    min_requests: int
    attainment_bar: float
    seed: int
    tokenizer_model: str | None
    slo: SuiteSLO
    servers: dict[str, ServerSpec]
    workloads: dict[str, WorkloadSpec]

    def num_requests(self, rate: float, turns: int = 1) -> int:
        return max(self.min_requests, math.ceil(rate * self.window_s)) * turns

    def seed_of(self, workload: str, rate_index: int, repeat: int) -> int:
        """A seed per run, so no two runs send the same prompts (a prefix cache kept across runs gains nothing)."""
        return self.seed + 1000 * repeat + 100 * list(self.workloads).index(workload) + rate_index


def load_suite(path: str | Path) -> Suite:
    """Read and check a suite file; a mistake names its table and key."""
    data = tomllib.loads(Path(path).read_text())
    run, slo = data.get("suite", {}), data.get("slo", {})
    try:
        suite_slo = SuiteSLO(float(slo["ttft_ms"]), float(slo["tpot_ms"]), float(slo["tbt_ms"]))
    except KeyError as missing:
        raise ValueError(f"{path}: [slo] needs {missing}") from None
    servers = {}
    for name, spec in data.get("servers", {}).items():
        if not isinstance(spec.get("command"), list) or not spec["command"]:
            raise ValueError(f"{path}: [servers.{name}] needs a command (a list of strings)")
        servers[name] = ServerSpec(name, [str(a) for a in spec["command"]], {k: str(v) for k, v in
                                   spec.get("env", {}).items()}, spec.get("requires"), spec.get("group"))
    workloads = {}
    for name, spec in data.get("workloads", {}).items():
        spec = dict(spec)
        if "trace" in spec:  # relative to the suite file, so the suite runs from any directory
            spec["trace"] = str(Path(path).parent / spec["trace"])
        rates = tuple(float(r) for r in spec.pop("rates", ()))
        kinds = tuple(spec.pop("slo_kinds", SLO_KINDS))
        unknown = set(spec) - _WORKLOAD_FIELDS
        if not rates or unknown or not set(kinds) <= set(SLO_KINDS):
            raise ValueError(f"{path}: [workloads.{name}] needs rates, slo_kinds among {SLO_KINDS}, and "
                             f"WorkloadConfig fields only (unknown: {sorted(unknown)})")
        workloads[name] = WorkloadSpec(name, rates, WorkloadConfig(**spec), kinds)
    if not servers or not workloads:
        raise ValueError(f"{path}: a suite needs at least one [servers.NAME] and one [workloads.NAME]")
    return Suite(int(run.get("repeats", 3)), float(run.get("window_s", 30)), int(run.get("min_requests", 10)),
                 float(run.get("attainment_bar", 0.9)), int(run.get("seed", 0)), run.get("tokenizer_model"),
                 suite_slo, servers, workloads)


@dataclass
class RunResult:
    """One run of one workload at one rate on one server: its summaries under each SLO kind."""

    server: str
    workload: str
    rate: float
    repeat: int
    seed: int
    summaries: dict[str, Summary]  # SLO kind -> summary
    prefix_cache_hit_rate: float | None = None  # the server's own count, where it exports one

    def attainment(self, kind: str) -> float:
        return self.summaries[kind].slo_attainment

    def to_json(self) -> dict:
        return {"server": self.server, "workload": self.workload, "rate": self.rate, "repeat": self.repeat,
                "seed": self.seed, "prefix_cache_hit_rate": self.prefix_cache_hit_rate,
                "summaries": {k: s.to_json() for k, s in self.summaries.items()}}


def run_suite(suite: Suite, out_dir: Path, tokenizer: TokenizerLike, servers: list[str] | None = None,
              workloads: list[str] | None = None, log: Callable[[str], None] = print) -> dict:
    """Run the suite: each server started once, then every repeat of every workload at every rate, in that order;
    raw records go to out_dir/records/SERVER.json.gz, the report to out_dir/report.json and tables.md. A server
    whose records are already in out_dir is not run again: the report reads them (delete them to measure again)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = servers or list(suite.servers)
    chosen = {name: suite.workloads[name] for name in (workloads or suite.workloads)}
    results: list[RunResult] = []
    skipped: dict[str, str] = {}
    started = time.time()
    for name in names:
        spec = suite.servers[name]
        kept = out_dir / "records" / f"{name}.json.gz"
        if kept.exists():
            results += [r for r in load_results(kept, suite) if r.workload in chosen]
            log(f"--- {name}: its records in {kept} are kept")
            continue
        if spec.missing:
            skipped[name] = f"not installed: {spec.missing}"
            log(f"--- {name}: skipped ({skipped[name]})")
            continue
        command = [spec.resolved(arg) for arg in spec.command]
        log(f"--- {name}: {' '.join(command)}")
        raw = []
        try:
            with server_process(command, out_dir / "logs" / f"{name}.log", env=spec.env) as server:
                for repeat in range(suite.repeats):
                    for workload in chosen.values():
                        for i, rate in enumerate(workload.rates):
                            result, records = _run_one(suite, workload, rate, i, repeat, server.url, tokenizer, name)
                            results.append(result)
                            raw.append(result.to_json() | {"requests": records})
                            log(_progress(result, suite))
        except RuntimeError as error:  # it did not start, or died: the other servers still run
            skipped[name] = f"failed after {len(raw)} runs: {str(error).splitlines()[0]}"
            log(f"--- {name}: {skipped[name]}")
            kept = kept.with_suffix("").with_suffix(".partial.json.gz")  # kept, but a resumed run measures it again
        kept.parent.mkdir(exist_ok=True)
        with gzip.open(kept, "wt") as f:
            json.dump(raw, f)
    report = make_report(suite, results, skipped, time.time() - started)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1))
    (out_dir / "tables.md").write_text(format_tables(report))
    log(format_tables(report))
    return report


def load_results(path: Path, suite: Suite) -> list[RunResult]:
    """A server's runs from its records, summarised again with the suite's definitions (a fresh run's, exactly)."""
    with gzip.open(path, "rt") as f:
        runs = json.load(f)
    results = []
    for run in runs:
        workload = suite.workloads[run["workload"]]
        records = [RequestRecord(**record) for record in run["requests"]]
        timing = next(iter(run["summaries"].values()))
        summaries = _summaries(suite, workload, records, timing["duration_s"], timing["offered_rate"])
        results.append(RunResult(run["server"], run["workload"], run["rate"], run["repeat"], run["seed"], summaries,
                                 run.get("prefix_cache_hit_rate")))
    return results


def _summaries(suite: Suite, workload: WorkloadSpec, records: list[RequestRecord], duration_s: float,
               offered_rate: float | None) -> dict[str, Summary]:
    """A run judged under each of the workload's SLO kinds."""
    return {kind: summarize(records, suite.slo.judged(kind, workload.config.slo_classes), duration_s, offered_rate)
            for kind in workload.kinds}


def _run_one(suite: Suite, workload: WorkloadSpec, rate: float, rate_index: int, repeat: int, url: str,
             tokenizer: TokenizerLike, server: str) -> tuple[RunResult, list[dict]]:
    seed = suite.seed_of(workload.name, rate_index, repeat)
    config = workload.at(rate, suite.num_requests(rate, workload.config.turns), seed)
    sent_slo = suite.slo.judged("tpot", config.slo_classes)  # what the client tells the server (x-slo-* headers)
    run = run_workload(build_workload(config, tokenizer), config, ClientConfig(base_url=url), sent_slo, tokenizer)
    summaries = _summaries(suite, workload, run.records, run.duration_s, run.offered_rate)
    result = RunResult(server, workload.name, rate, repeat, seed, summaries, run.prefix_cache_hit_rate)
    return result, records_json(run.records)


def _progress(r: RunResult, suite: Suite) -> str:
    s = next(iter(r.summaries.values()))
    kinds = ", ".join(f"{k} {v.slo_attainment:.0%}" for k, v in r.summaries.items())
    return (f"{r.server} {r.workload} rate {r.rate:g} repeat {r.repeat}: attainment {kinds}; "
            f"refused {s.num_rejected}, failed {s.num_failed} of {s.num_requests}; TTFT p50 "
            f"{s.ttft_s['p50'] * 1e3:.0f} ms, TPOT p50 {s.tpot_s['p50'] * 1e3:.0f} ms"
            + (f"; prefix cache hits {r.prefix_cache_hit_rate:.0%}" if r.prefix_cache_hit_rate is not None else ""))


# ---- the report ------------------------------------------------------------------------------------------------


def capacity(attainments: dict[float, float], bar: float) -> float:
    """The highest rate at which attainment >= bar there and at every lower rate; 0 if the lowest misses."""
    best = 0.0
    for rate in sorted(attainments):
        if not attainments[rate] >= bar:
            break
        best = rate
    return best


def compare(a: list[float], b: list[float]) -> str:
    """'1.50x' where a's whole range lies above or below b's, else 'level' (the spreads overlap)."""
    if min(a) > max(b) or max(a) < min(b):
        mid_b = statistics.median(b)
        return f"{statistics.median(a) / mid_b:.2f}x" if mid_b > 0 else "above (peer 0)"
    return "level"


def make_report(suite: Suite, results: list[RunResult], skipped: dict[str, str], elapsed_s: float) -> dict:
    """Per workload, SLO kind and server: attainment at each rate and capacity, per repeat and as median [range];
    each peer group's best member; pacer's configurations against the best peer."""
    report: dict = {"suite": _suite_json(suite), "skipped": skipped, "elapsed_s": elapsed_s,
                    "runs": [r.to_json() for r in results], "workloads": {}}
    for workload in suite.workloads.values():
        for kind in workload.kinds:
            per_server: dict[str, dict] = {}
            for server in dict.fromkeys(r.server for r in results if r.workload == workload.name):
                runs = [r for r in results if r.server == server and r.workload == workload.name]
                summaries = {rate: [r.summaries[kind] for r in runs if r.rate == rate] for rate in workload.rates}
                caps = [capacity({r.rate: r.attainment(kind) for r in runs if r.repeat == k}, suite.attainment_bar)
                        for k in sorted({r.repeat for r in runs})]
                per_server[server] = {"capacity": caps, "attainment": _per_rate(summaries, lambda s: s.slo_attainment),
                                      "refused": _per_rate(summaries, lambda s: s.num_rejected),
                                      "goodput": _per_rate(summaries, lambda s: s.goodput)}
                if workload.config.turns > 1:  # what a cached conversation saves: the later turns' TTFT
                    per_server[server]["ttft_later_turns_p50_s"] = _per_rate(
                        summaries, lambda s: s.ttft_later_turns_s.get("p50"))
            report["workloads"][f"{workload.name}/{kind}"] = {
                "servers": per_server, "best": _best_of_groups(suite, per_server),
                "rate_unit": "conv/s" if workload.config.turns > 1 else "req/s"}
    return report


def _per_rate(summaries: dict[float, list[Summary]], value: Callable[[Summary], object]) -> dict[str, list]:
    """A figure of each repeat's summary, per rate (as a JSON key)."""
    return {str(rate): [value(s) for s in runs] for rate, runs in summaries.items()}


def _best_of_groups(suite: Suite, per_server: dict[str, dict]) -> dict[str, str]:
    """group -> its member with the highest median capacity (then mean attainment over all rates)."""
    best: dict[str, str] = {}
    for name, data in per_server.items():
        group = suite.servers[name].group if name in suite.servers else None
        if group is None:
            continue
        if group not in best or _rank(data) > _rank(per_server[best[group]]):
            best[group] = name
    return best


def _rank(data: dict) -> tuple[float, float]:
    values = [v for vs in data["attainment"].values() for v in vs]
    return statistics.median(data["capacity"]), statistics.fmean(values) if values else 0.0


def _suite_json(suite: Suite) -> dict:
    return {"repeats": suite.repeats, "window_s": suite.window_s, "min_requests": suite.min_requests,
            "attainment_bar": suite.attainment_bar, "seed": suite.seed, "slo": asdict(suite.slo),
            "servers": {n: asdict(s) for n, s in suite.servers.items()},
            "workloads": {n: {"rates": list(w.rates), "kinds": list(w.kinds), "config": asdict(w.config)}
                          for n, w in suite.workloads.items()}}


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return ""
    mid = fmt.format(statistics.median(values))
    return mid if min(values) == max(values) else f"{mid} [{fmt.format(min(values))}-{fmt.format(max(values))}]"


def format_tables(report: dict) -> str:
    """One markdown table per workload and SLO kind: attainment per rate (median [min-max] of the repeats, refusals
    in parentheses), capacity, and each pacer configuration against the best peer."""
    suite = report["suite"]
    lines = [(f"SLOs: TTFT <= {suite['slo']['ttft_ms']:g} ms; TPOT (mean) <= {suite['slo']['tpot_ms']:g} ms, or "
              f"p99 TBT <= {suite['slo']['tbt_ms']:g} ms (the strict variant). Capacity: the highest rate with >= "
              f"{suite['attainment_bar']:.0%} of all requests meeting every SLO, there and below. "
              f"{suite['repeats']} repeats; median [min-max].")]
    for name, why in report["skipped"].items():
        lines.append(f"\n{name}: {why}")
    for key, table in report["workloads"].items():
        servers = table["servers"]
        if not servers:
            continue
        rates = next(iter(servers.values()))["attainment"].keys()
        unit = table.get("rate_unit", "req/s")
        lines += ["", f"### {key}", "",
                  "| server | " + " | ".join(f"{float(r):g} {unit}" for r in rates) + f" | capacity ({unit}) |",
                  "|---" * (len(rates) + 2) + "|"]
        for server, data in servers.items():
            cells = []
            for rate in rates:
                refused = data["refused"][rate]
                cell = _spread([100 * v for v in data["attainment"][rate]], "{:.0f}")
                cells.append(cell + (" %" if cell else "") + (f" ({_spread(refused, '{:.0f}')} refused)"
                                                              if any(refused) else ""))
            lines.append(f"| {server} | " + " | ".join(cells) + f" | {_spread(data['capacity'], '{:.3g}')} |")
        if any("ttft_later_turns_p50_s" in data for data in servers.values()):
            lines += ["", "TTFT p50 of the turns after a conversation's first (ms):", "",
                      "| server | " + " | ".join(f"{float(r):g} {unit}" for r in rates) + " |",
                      "|---" * (len(rates) + 1) + "|"]
            for server, data in servers.items():
                lines.append(f"| {server} | " + " | ".join(
                    _spread([1e3 * v for v in data["ttft_later_turns_p50_s"][rate] if v is not None], "{:.0f}")
                    for rate in rates) + " |")
        peers = [table["best"].get(group, group) for group in table["best"]]
        peers += [s for s in servers if s not in peers and not s.startswith("pacer")
                  and report["suite"]["servers"].get(s, {}).get("group") is None]
        for peer in peers:
            lines.append("")
            for server in (s for s in servers if s.startswith("pacer")):
                verdict = compare(servers[server]["capacity"], servers[peer]["capacity"])
                lines.append(f"- capacity, {server} against {peer}: {verdict}")
    return "\n".join(lines) + "\n"
