#!/usr/bin/env python3
"""Were admission's refusals right? Each seed of a workload is simulated twice: as deployed, and with every
request admission would refuse admitted anyway (the router's pick, or the replica it would have preferred).
For each such request the second run tells what TTFT it would have got against what admission predicted; and it
tells what admitting them costs the others. Also prints, from the deployed run, how each admitted request's
actual TTFT compares with its prediction before the margin (the latency model's margin is the planner's guess at
how far that can be off).

    .venv/bin/python benchmarks/sim_refusals.py --profile PROFILE.json --kv-blocks 2912 \\
        --residuals benchmarks/out/latency_error_4.json --rate 0.7 \\
        --slo-classes interactive:0.3:2500:500,batch:0.7:20000:1000

Runs in seconds: it is the simulator, on this CPU's profile with replayed measured residuals.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from pacer.bench.metrics import SLOTargets, meets_slo, parse_slo_classes, request_metrics
from pacer.bench.workload import WorkloadConfig
from pacer.config import SchedulerConfig
from pacer.scheduling.admission import QueueTimes, SLOUnattainable
from pacer.sim import simulator
from pacer.sim.run import SimConfig, sim_requests, simulate


@dataclass
class Seen:
    """What dispatch decided, per request id: the prediction with and without the margin, refused or not."""

    predicted_s: dict[str, float]
    raw_s: dict[str, float]
    refused: set[str]


DISPATCH = simulator.dispatch


def watching(seen: Seen, admit_refused: bool):
    """`dispatch`, recording its prediction for the chosen replica, and (admit_refused) admitting what it refuses."""

    def wrapped(request, replicas, router, now):
        try:
            index = DISPATCH(request, replicas, router, now)
        except SLOUnattainable:
            seen.refused.add(request.request_id)
            if not admit_refused:
                raise
            times = [replica.predicted_ttft_s(request) for replica in replicas]
            index = min(range(len(replicas)), key=lambda i: times[i])
        scheduler = replicas[index].engine.scheduler
        snapshot = scheduler.snapshot()
        if snapshot is not None:
            times = QueueTimes.of(snapshot, scheduler.latency)  # what the replica predicted from
            seen.predicted_s[request.request_id] = predicted = times.ttft_s(request)
            seen.raw_s[request.request_id] = predicted / times.scale
        return index

    return wrapped


def run(workload: WorkloadConfig, sim: SimConfig, slo: SLOTargets, admit_refused: bool):
    seen = Seen({}, {}, set())
    simulator.dispatch = watching(seen, admit_refused)
    try:
        result = simulate(workload, sim, SchedulerConfig(scheduler="slo"), slo)
    finally:
        simulator.dispatch = DISPATCH
    return result, seen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True)
    ap.add_argument("--kv-blocks", type=int, required=True)
    ap.add_argument("--residuals", default=None)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--trace", default="benchmarks/data/azure2023_conv.csv")
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--slo-ttft-ms", type=float, default=3000)
    ap.add_argument("--slo-tbt-ms", type=float, default=500)
    ap.add_argument("--slo-classes", default=None)
    args = ap.parse_args()

    slo = SLOTargets(args.slo_ttft_ms / 1e3, args.slo_tbt_ms / 1e3, classes=parse_slo_classes(args.slo_classes))
    sim = SimConfig(profile=args.profile, kv_blocks=args.kv_blocks, residuals=args.residuals)
    ratios, rows, costs = [], [], []
    for seed in range(args.seeds):
        workload = WorkloadConfig(num_requests=args.num_requests, arrival="poisson", rate=args.rate, lengths="trace",
                                  trace=args.trace, length_scale=args.length_scale, max_model_len=2048, seed=seed,
                                  slo_classes=args.slo_classes)
        requests = sim_requests(workload, slo)
        deployed, seen = run(workload, sim, slo, admit_refused=False)
        for i, record in enumerate(deployed.records):
            if record.status == "ok" and str(i) in seen.raw_s:
                ratios.append(request_metrics(record).ttft_s / seen.raw_s[str(i)])
        forced, forced_seen = run(workload, sim, slo, admit_refused=True)
        for rid in sorted(seen.refused, key=int):
            record, request = forced.records[int(rid)], requests[int(rid)]
            limit = slo.of(request.slo_class).ttft_s
            rows.append((seed, request.num_prompt_tokens, request.slo_class, forced_seen.predicted_s.get(rid),
                         request_metrics(record).ttft_s, limit))
        others = [i for i in range(len(requests)) if str(i) not in seen.refused]
        met = [sum(1 for i in others if _met(result.records[i], slo)) for result in (deployed, forced)]
        costs.append((seed, len(seen.refused), *met, len(others)))

    print("refused requests, admitted anyway: seed, prompt tokens, class, predicted TTFT there (s), TTFT got (s), SLO (s)")
    for seed, tokens, slo_class, predicted, got, limit in rows:
        verdict = "would have met" if got is not None and got <= limit else "would have missed"
        got_text = f"{got:.2f}" if got is not None else "-"
        print(f"  {seed} {tokens:5d} {slo_class or '-':12s} {predicted:.2f} {got_text} {limit:.2f}  {verdict}")
    met = sum(1 for *_, got, limit in rows if got is not None and got <= limit)
    print(f"{met} of {len(rows)} refused requests would have met their TTFT SLO")
    print("the other requests meeting both SLOs, as deployed -> with the refused admitted (seed: refused, counts)")
    for seed, refused, before, after, total in costs:
        print(f"  {seed}: {refused} refused, {before} -> {after} of {total}")
    if ratios:
        quantiles = np.quantile(ratios, [0.5, 0.9, 0.95, 0.99])
        print("admitted requests, deployed: actual TTFT / predicted before the margin, p50 p90 p95 p99:",
              " ".join(f"{q:.2f}" for q in quantiles))
    return 0


def _met(record, slo: SLOTargets) -> bool:
    """Both SLOs of the request's class, as the run's summary judges them."""
    return record.status == "ok" and all(meets_slo(request_metrics(record), slo.of(record.slo_class)))


if __name__ == "__main__":
    raise SystemExit(main())
