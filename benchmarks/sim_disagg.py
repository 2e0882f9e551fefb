"""`pacer sim`: prefill/decode disaggregation (DistServe) against colocated serving on the same GPUs
(benchmarks/log/2026-11-26-sim-disaggregation.md).

Yi-34B TP2 on A100s (Sarathi-Serve's measurements), 4 replicas = 8 GPUs in every configuration, the `slo` scheduler
and router, TTFT 5 s. For each length mix and P99 TBT SLO: the capacity (DistServe's condition: >= 90 % of requests
meet both SLOs) of 4 colocated replicas and of P prefill + (4 - P) decode replicas, the KV moving at --gbps.

    .venv/bin/python benchmarks/sim_disagg.py --out benchmarks/out/sim_disagg
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from pacer.bench.metrics import SLOTargets
from pacer.bench.workload import WorkloadConfig
from pacer.config import SchedulerConfig
from pacer.sim.run import SimConfig, run_sim_capacity

PROFILE = "benchmarks/data/profiles/sarathi-a100"
TRACES = "benchmarks/data"
MIXES = {  # name -> workload fields
    "chat+documents": {"lengths": "mix", "length_mix": "0.9:64-1024:32-512,0.1:6144-7936:64-256"},
    "arxiv (prompt-heavy)": {"lengths": "trace", "trace": f"{TRACES}/arxiv_4k_llama2_lengths.csv",
                             "trace_sample": True},
    "sharegpt": {"lengths": "trace", "trace": f"{TRACES}/sharegpt_8k_llama2_lengths.csv", "trace_sample": True},
    "output-heavy": {"lengths": "mix", "length_mix": "1:64-512:256-1024"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/sim_disagg"))
    parser.add_argument("--mixes", default=",".join(MIXES))
    parser.add_argument("--tbt-ms", default="100,200,1000", help="P99 TBT SLOs")
    parser.add_argument("--prefill", default="0,1,2,3", help="prefill replicas of the 4 to try (0: colocated)")
    parser.add_argument("--gbps", type=float, default=100.0, help="KV transfer bandwidth, Gbit/s")
    parser.add_argument("--per-replica", type=int, default=300, help="requests per replica in each trial")
    parser.add_argument("--tolerance", type=float, default=0.03)
    parser.add_argument("--max-num-seqs", type=int, default=128, help="batch slots of every replica")
    parser.add_argument("--tbt-stat", choices=("p99", "mean"), default="p99",
                        help="a request meets the TBT SLO by its P99 gap (pacer's SLO) or its mean gap (TPOT, "
                             "DistServe's), in which the hand-over's one long gap is averaged out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scheduler = SchedulerConfig(scheduler="slo", max_num_seqs=args.max_num_seqs)
    colocated = SimConfig(profile=PROFILE, replicas=4, router="slo")
    configs = {f"{p}P{4 - p}D" if p else "colocated": replace(colocated, prefill_replicas=p, kv_transfer_gbps=args.gbps)
               for p in map(int, args.prefill.split(","))}
    results = []
    for mix in args.mixes.split(","):
        workload = WorkloadConfig(num_requests=4 * args.per_replica, max_model_len=8192, **MIXES[mix])
        for tbt_ms in map(float, args.tbt_ms.split(",")):
            slo = SLOTargets(ttft_s=5.0, tbt_s=tbt_ms / 1e3, tbt_stat=args.tbt_stat)
            capacities = {}
            for name, sim in configs.items():
                out = args.out / f"{mix.split()[0]}_{args.tbt_stat}{tbt_ms:g}_seqs{args.max_num_seqs}_{name}.json"
                capacities[name] = run_sim_capacity(workload, sim, scheduler, slo, out, "attainment", 0.25, 8.0,
                                                    args.tolerance, 12).capacity
            results.append({"mix": mix, "tbt_ms": tbt_ms, "tbt_stat": args.tbt_stat, "capacity": capacities})
            print(json.dumps(results[-1]), flush=True)
    (args.out / f"disagg_{args.tbt_stat}_seqs{args.max_num_seqs}.json").write_text(json.dumps(
        {"gbps": args.gbps, "scheduler": asdict(scheduler), "results": results}, indent=1) + "\n")
    print(table(results))


def table(results: list[dict]) -> str:
    names = list(results[0]["capacity"])
    disaggregated = [n for n in names if n != "colocated"]
    compare = "colocated" in names and bool(disaggregated)
    lines = ["| mix | TBT SLO | " + " | ".join(f"{n} (req/s)" for n in names)
             + (" | best disaggregated / colocated |" if compare else " |"), "|" + "---|" * (len(names) + 2 + compare)]
    for r in results:
        cap = r["capacity"]
        row = f"| {r['mix']} | {r['tbt_stat']} {r['tbt_ms']:g} ms | " + " | ".join(f"{cap[n]:.3g}" for n in names) + " |"
        if compare:
            best = max(disaggregated, key=cap.__getitem__)
            row += f" {cap[best] / cap['colocated']:.2f}x ({best}) |" if cap["colocated"] else " - |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
