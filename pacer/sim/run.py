"""`pacer sim run`, `capacity` and `compare`: the workload of `pacer bench`, simulated, with the same summary,
JSON report and plots, so that a bench run and a sim run compare line by line."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pacer.bench.capacity import CapacityResult, search_capacity
from pacer.bench.metrics import RequestRecord, SLOTargets, Summary, records_json, summarize
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
from pacer.bench.workload import WorkloadConfig, conversation_turns, request_timings, shared_prefixes
from pacer.config import SPECULATION_METHODS, ReplicasConfig, SchedulerConfig, router_field
from pacer.engine.detokenizer import Detokenizer
from pacer.engine.engine import Engine
from pacer.kv import KVCacheManager
from pacer.request import SLO
from pacer.scheduling import scheduler_class
from pacer.scheduling.router import ROUTERS, router_class
from pacer.sim.disagg import DecodePool, KVTransfer
from pacer.sim.executor import SimDrafter, SimExecutor, load_residuals
from pacer.sim.gpu import load_sim_profile, model_shape
from pacer.sim.simulator import SimRequest, Simulator, VirtualClock


def _help(text: str, **extra: object) -> dict[str, object]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class SimConfig(ReplicasConfig):
    """What is simulated: the replicas and their router (as `pacer serve` has them), the latency profile, the KV
    cache."""

    # round_robin, not serve's slo: the sim's default stays the policy-free baseline it has always had (its runs
    # compare against it); `--router slo` simulates what `pacer serve` does by default
    router: str = router_field("round_robin")
    profile: str | None = field(default=None, metadata=_help(
        "latency profile: a JSON written by `pacer profile`, Sarathi-Serve's A100 directory "
        "(benchmarks/data/profiles/sarathi-a100: Yi-34B, TP2) or a DistServe coefficient JSON "
        "(benchmarks/data/profiles/distserve-a100/*.json, with --gpu-model and --tensor-parallel)"))
    gpu_model: str = field(default="facebook/opt-13b", metadata=_help("model of a DistServe profile"))
    tensor_parallel: int = field(default=1, metadata=_help("tensor-parallel degree of a DistServe profile"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_help(
        "GPU profiles: fraction of GPU memory for weights + KV (vLLM's), which sizes the KV cache"))
    kv_blocks: int | None = field(default=None, metadata=_help(
        "KV blocks per replica (default: what the GPU profile leaves; required with a `pacer profile` JSON)"))
    block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    noise: float = field(default=0.0, metadata=_help(
        "coefficient of variation of each iteration's time around the prediction (0: exactly as predicted)"))
    residuals: str | None = field(default=None, metadata=_help(
        "real iterations measured against this profile (benchmarks/latency_error.py --out): each simulated "
        "iteration is scaled by their measured/predicted ratios in recorded order, per regime, from a seeded offset"))
    kv_transfer_gbps: float = field(default=100.0, metadata=_help(
        "with --prefill-replicas: Gbit/s from a prefill replica to a decode replica; a prompt's KV takes "
        "prompt tokens x the model's KV bytes per token / this"))
    prefix_caching: bool = field(default=True, metadata=_help(
        "as `pacer serve`: a request that starts finds the KV of the prompt head it shares with earlier ones (the "
        "workload's system prompt, a trace's shared blocks) cached, and prefills only the rest"))
    speculation: str = field(default="off", metadata=_help(
        "speculative decoding as `pacer serve --speculation` has it, with synthetic drafts: every decode proposes "
        "--num-speculative-tokens drafts, the scheduler sizes its verify row, and the drafts are accepted at "
        "--spec-acceptance-rate", choices=SPECULATION_METHODS))
    num_speculative_tokens: int = field(default=4, metadata=_help("with --speculation: drafts each decode proposes"))
    spec_acceptance_rate: float = field(default=0.7, metadata=_help(
        "with --speculation: the mean chance a draft is accepted, given the ones before it were (each request "
        "draws its own around it)"))
    send_ttft_slo: bool = field(default=True, metadata=_help(
        "send each request's TTFT SLO with it, as `pacer bench` does: admission control and the router's fallback "
        "act on it; --no-send-ttft-slo sends only the TBT SLO, and the TTFT SLO only judges the run (what a "
        "router achieves without admission control)"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_blocks is not None and self.kv_blocks < 1:
            raise ValueError(f"kv_blocks must be at least 1, got {self.kv_blocks}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {self.block_size}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")
        if self.speculation not in SPECULATION_METHODS:
            raise ValueError(f"speculation must be one of {', '.join(SPECULATION_METHODS)}, got {self.speculation!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be at least 1, got {self.num_speculative_tokens}")
        if not 0 <= self.spec_acceptance_rate <= 1:
            raise ValueError(f"spec_acceptance_rate must be in [0, 1], got {self.spec_acceptance_rate}")
        if not self.kv_transfer_gbps > 0:
            raise ValueError(f"kv_transfer_gbps must be positive, got {self.kv_transfer_gbps}")
        router_class(self.router)


ROUTER_CHOICES = sorted(ROUTERS)


def build_simulator(sim: SimConfig, scheduler: SchedulerConfig, max_model_len: int, seed: int = 0) -> Simulator:
    """`sim.replicas` engines, each the real scheduler over its own KV pool with a SimExecutor, on one clock."""
    if sim.profile is None:
        raise ValueError("pacer sim needs --profile")
    policy = scheduler_class(scheduler.scheduler)
    latency, capacity_tokens = load_sim_profile(sim.profile, sim.gpu_model, sim.tensor_parallel,
                                                sim.gpu_memory_utilization)
    num_blocks = sim.kv_blocks or (capacity_tokens // sim.block_size if capacity_tokens else None)
    if not num_blocks:
        raise ValueError(f"{sim.profile} does not say how much KV cache there is: give --kv-blocks")
    residuals = load_residuals(sim.residuals) if sim.residuals else None
    clock = VirtualClock()
    engines = []
    for i in range(sim.replicas):
        kv = KVCacheManager(num_blocks, sim.block_size, sim.prefix_caching)
        limit = scheduler.max_model_len or max_model_len
        speculating = sim.speculation != "off"
        executor = SimExecutor(latency.fresh(), noise=sim.noise, seed=seed + i, residuals=residuals,
                               acceptance_rate=sim.spec_acceptance_rate if speculating else 0.0)
        drafter = SimDrafter(sim.num_speculative_tokens) if speculating else None
        engines.append(Engine(policy(scheduler, kv, limit, latency=latency.fresh()), executor, Detokenizer(None),
                              clock=clock, drafter=drafter))
    if not sim.prefill_replicas:
        return Simulator(engines, clock, router_class(sim.router)())
    transfer = KVTransfer(model_shape(latency).kv_bytes_per_token, sim.kv_transfer_gbps * 1e9 / 8)
    return Simulator(engines[:sim.prefill_replicas], clock, router_class(sim.router)(),
                     DecodePool(engines[sim.prefill_replicas:], transfer))


def sim_requests(workload: WorkloadConfig, slo: SLOTargets, send_ttft_slo: bool = True) -> list[SimRequest]:
    """The bench workload's requests (same seed, same times and lengths), carrying the run's SLO as `pacer bench`
    sends it (less its TTFT part unless `send_ttft_slo`)."""
    slos = {None: slo} | {c.name: slo.of(c.name) for c in slo.classes}
    request_slos = {name: SLO(ttft_s=s.ttft_s if send_ttft_slo else None,
                                     tbt_s=s.tbt_s if s.tbt_stat == "p99" else None,
                                     tpot_s=s.tbt_s if s.tbt_stat == "mean" else None)
                    for name, s in slos.items()}
    return [SimRequest(i, arrival, prompt, output, request_slos[slo_class], slo_class, prefix, turn, think_s)
            for i, ((arrival, prompt, output, slo_class), prefix, (turn, think_s))
            in enumerate(zip(request_timings(workload), shared_prefixes(workload), conversation_turns(workload)))]


@dataclass
class SimRun:
    records: list[RequestRecord]
    duration_s: float  # virtual: from the first arrival to the last request's end
    offered_rate: float | None
    wall_s: float
    num_iterations: int
    # speculative decoding, over every replica: drafts verified and accepted
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def summary(self, slo: SLOTargets) -> Summary:
        return summarize(self.records, slo, self.duration_s, self.offered_rate)

    def info(self) -> dict[str, object]:
        """For the report: virtual-time facts only, so the same seed gives a byte-identical report."""
        info: dict[str, object] = {"num_iterations": self.num_iterations, "duration_s": self.duration_s}
        if self.num_draft_tokens:
            info |= {"num_draft_tokens": self.num_draft_tokens, "num_accepted_tokens": self.num_accepted_tokens}
        return info

    def speed(self) -> str:
        speedup = self.duration_s / self.wall_s if self.wall_s else math.inf
        drafts = (f", {self.num_accepted_tokens} of {self.num_draft_tokens} drafts accepted"
                  if self.num_draft_tokens else "")
        return (f"simulated {self.duration_s:.1f} s in {self.wall_s:.2f} s ({speedup:.0f}x real time), "
                f"{self.num_iterations} iterations{drafts}")


def simulate(workload: WorkloadConfig, sim: SimConfig, scheduler: SchedulerConfig, slo: SLOTargets) -> SimRun:
    requests = sim_requests(workload, slo, sim.send_ttft_slo)
    simulator = build_simulator(sim, scheduler, workload.max_model_len, workload.seed)
    start = time.perf_counter()
    closed_loop = workload.arrival == "concurrency"
    records = simulator.run(requests, workload.concurrency if closed_loop else None)
    wall = time.perf_counter() - start
    duration = max((r.finished_s for r in records if r.finished_s is not None), default=0.0)
    offered = None if closed_loop else offered_rate(requests)
    schedulers = [r.engine.scheduler for r in simulator.all_replicas]
    return SimRun(records, duration, offered, wall, sum(r.num_iterations for r in simulator.all_replicas),
                  sum(s.num_draft_tokens for s in schedulers), sum(s.num_accepted_tokens for s in schedulers))


def run_sim(workload: WorkloadConfig, sim: SimConfig, scheduler: SchedulerConfig, slo: SLOTargets, out: Path | None,
            plots_dir: Path | None = None) -> Summary:
    run = simulate(workload, sim, scheduler, slo)
    summary = run.summary(slo)
    print(format_summary(summary))
    print(run.speed())
    if out is not None:
        save_report(out, {"workload": asdict(workload), "sim": _sim_json(sim, scheduler) | run.info(),
                          "slo": asdict(slo), "summary": summary.to_json(), "requests": records_json(run.records)})
    if plots_dir is not None:
        print_plot_paths(plot_run(run.records, slo, plots_dir, title=f"sim: {workload_title(workload)}"))
    return summary


def run_sim_capacity(workload: WorkloadConfig, sim: SimConfig, scheduler: SchedulerConfig, slo: SLOTargets,
                     out: Path | None, condition: str, low: float, high: float, tolerance: float, max_trials: int,
                     plots_dir: Path | None = None) -> CapacityResult:
    if workload.arrival not in ("poisson", "gamma"):
        raise ValueError(f"capacity search needs --arrival poisson or gamma, got {workload.arrival!r}")
    runs: dict[float, SimRun] = {}

    def trial(rate: float) -> Summary:
        runs[rate] = simulate(replace(workload, rate=rate), sim, scheduler, slo)
        return runs[rate].summary(slo)

    result = search_capacity(trial, condition, slo, low, high, tolerance, max_trials,
                             on_trial=lambda t: print(format_trial(t, condition)))
    print(f"capacity ({condition}): {result.capacity:.4g} req/s after {len(result.trials)} trials")
    save_report(out, {"workload": asdict(workload), "sim": _sim_json(sim, scheduler), "slo": asdict(slo),
                      "condition": condition, "capacity": result.capacity, "curve": result.curve(),
                      "trials": [{"rate": t.rate, "met": t.met, "summary": t.summary.to_json()} | runs[t.rate].info()
                                 for t in result.trials]})
    if plots_dir is not None:
        print_plot_paths([plot_capacity({scheduler.scheduler: result.curve()}, plots_dir / "capacity.png",
                                        title=f"sim capacity ({condition}): {result.capacity:.3g} req/s")])
    return result


def run_sim_compare(workload: WorkloadConfig, configs: dict[str, tuple[SimConfig, SchedulerConfig]], slo: SLOTargets,
                    out: Path | None, plots_dir: Path | None = None) -> dict[str, Summary]:
    """Each named configuration on the identical workload, side by side (as `pacer bench compare`)."""
    runs = {}
    for name, (sim, scheduler) in configs.items():
        runs[name] = simulate(workload, sim, scheduler, slo)
        print(f"{name}: {runs[name].speed()}")
    summaries = {name: run.summary(slo) for name, run in runs.items()}
    print(format_compare(summaries))
    save_report(out, {"workload": asdict(workload), "slo": asdict(slo),
                      "configs": {name: _sim_json(*config) for name, config in configs.items()},
                      "runs": {name: {"sim": run.info(), "summary": summaries[name].to_json(),
                                      "requests": records_json(run.records)} for name, run in runs.items()}})
    if plots_dir is not None:
        print_plot_paths(plot_compare({name: run.records for name, run in runs.items()}, slo, plots_dir,
                                      title=f"sim: {workload_title(workload)}"))
    return summaries


def _sim_json(sim: SimConfig, scheduler: SchedulerConfig) -> dict[str, object]:
    return asdict(sim) | {"scheduler": asdict(scheduler)}
