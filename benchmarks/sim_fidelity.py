#!/usr/bin/env python3
"""Does `pacer sim` predict what `pacer serve` does? The same seeded workload through the real server (`pacer bench`)
and through the simulator with this machine's fitted profile, per scheduler and rate; prints sim / real ratios.

    .venv/bin/python benchmarks/sim_fidelity.py --rates 0.5,0.9 --schedulers sarathi,slo --out benchmarks/out/fidelity

The server runs with `--latency-profile PROFILE` (the profile the simulator uses) and a 2 GiB KV cache (2912
blocks of SmolLM2 in fp32), 2 threads. The simulator runs without noise and with `--noise` (the machine's jitter).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from pacer.bench.client import ClientConfig
from pacer.bench.metrics import SLOTargets, Summary
from pacer.bench.run import run_compare
from pacer.bench.servers import pacer_command
from pacer.bench.workload import WorkloadConfig
from pacer.config import SchedulerConfig
from pacer.sim.run import SimConfig, simulate

FIGURES = (("TTFT p50", lambda s: s.ttft_s["p50"]), ("TTFT p99", lambda s: s.ttft_s["p99"]),
           ("TBT p50", lambda s: s.tbt_s["p50"]), ("TBT p99", lambda s: s.tbt_s["p99"]),
           ("throughput", lambda s: s.output_token_throughput), ("goodput", lambda s: s.goodput))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", required=True, help="the `pacer profile` JSON of this machine")
    ap.add_argument("--rates", default="0.5,0.9")
    ap.add_argument("--schedulers", default="sarathi,slo")
    ap.add_argument("--num-requests", type=int, default=120)
    ap.add_argument("--kv-blocks", type=int, default=2912)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/fidelity"))
    args = ap.parse_args()
    slo = SLOTargets(ttft_s=3.0, tbt_s=0.5)
    base = WorkloadConfig(num_requests=args.num_requests, arrival="poisson", lengths="trace",
                          trace="benchmarks/data/azure2023_conv.csv", length_scale=0.25, max_model_len=2048)
    policies = args.schedulers.split(",")
    server = ["--dtype", "float32", "--threads", "2", "--kv-cache-memory", "2GiB", "--latency-profile", args.profile]
    rows = []
    for rate in (float(r) for r in args.rates.split(",")):
        workload = replace(base, rate=rate)
        configs = {p: pacer_command([*server, "--scheduler", p]) for p in policies}
        real = run_compare(workload, ClientConfig(), slo, None, args.out / f"real_{rate}.json", configs)
        for policy in policies:
            scheduler = SchedulerConfig(scheduler=policy)
            for noise in (0.0, args.noise):
                sim = SimConfig(profile=args.profile, kv_blocks=args.kv_blocks, noise=noise)
                summary = simulate(workload, sim, scheduler, slo).summary(slo)
                rows.append((rate, policy, noise, real[policy], summary))
    lines = ["| rate | policy | sim noise | " + " | ".join(f"{name} real / sim" for name, _ in FIGURES) + " |",
             "|---" * (3 + len(FIGURES)) + "|"]
    report = []
    for rate, policy, noise, real_s, sim_s in rows:
        cells = [_pair(get(real_s), get(sim_s), name) for name, get in FIGURES]
        lines.append(f"| {rate} | {policy} | {noise} | " + " | ".join(cells) + " |")
        report.append({"rate": rate, "policy": policy, "noise": noise, "real": _figures(real_s), "sim": _figures(sim_s)})
    print("\n".join(lines))
    (args.out / "fidelity.json").write_text(json.dumps(report, indent=1))
    return 0


def _figures(summary: Summary) -> dict[str, float]:
    return {name: get(summary) for name, get in FIGURES}


def _pair(real: float, sim: float, name: str) -> str:
    scale = 1e3 if name.startswith("T") else 1
    error = sim / real - 1 if real else float("nan")
    return f"{real * scale:.3g} / {sim * scale:.3g} ({error:+.0%})"


if __name__ == "__main__":
    raise SystemExit(main())
