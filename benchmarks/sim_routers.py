"""`pacer sim`: the routers at 8, 32 and 128 replicas on a skewed workload (benchmarks/log/2026-11-26-sim-routers.md
and 2026-11-27-sim-routers-reruns.md).

Yi-34B TP2 on A100s (Sarathi-Serve's measurements), the `slo` scheduler, a length mix of chat prompts and long
documents, TTFT 5 s and P99 TBT 0.2 s. For each mode: the capacity of one replica (DistServe's condition: >= 90 % of
requests meet both SLOs), then round_robin, least_tokens and slo at `--load` x N x that capacity, with the same number
of requests per replica at every N. Modes:
- promised: each request carries its TTFT SLO, as `pacer bench` sends it, so admission control refuses what no replica
  can serve in time and `dispatch` overrides a router whose choice would miss (pacer as deployed);
- routing: requests carry only their TBT SLO (`--no-send-ttft-slo`), judged by the same TTFT SLO: the routers alone.

    .venv/bin/python benchmarks/sim_routers.py --out benchmarks/out/sim_routers
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from pacer.bench.metrics import SLOTargets
from pacer.bench.workload import WorkloadConfig
from pacer.config import SchedulerConfig
from pacer.sim.run import SimConfig, SimRun, run_sim_capacity, simulate

PROFILE = "benchmarks/data/profiles/sarathi-a100"
CHAT, DOCUMENTS = "64-1024:32-512", "6144-7936:64-256"  # prompt:output tokens; 7936 + 256 = the 8192 context
ROUTERS = ("round_robin", "least_tokens", "slo")
MODES = {"promised": True, "routing": False}  # mode -> send_ttft_slo


def row(run: SimRun, slo: SLOTargets) -> dict[str, float]:
    """The figures of one run; chat TTFT is over the short prompts alone, which wait behind a document that lands
    on their replica."""
    summary = run.summary(slo)
    chat = [r.token_times_s[0] - r.sent_s for r in run.records
            if r.status == "ok" and r.token_times_s and r.num_prompt_tokens <= 1024]
    return {"goodput": summary.goodput, "attainment": summary.slo_attainment, "rejected": summary.num_rejected,
            "ttft_p50_s": summary.ttft_s["p50"], "ttft_p99_s": summary.ttft_s["p99"],
            "chat_ttft_p99_s": float(np.quantile(chat, 0.99)), "wall_s": run.wall_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/sim_routers"))
    parser.add_argument("--replicas", default="8,32,128")
    parser.add_argument("--seeds", default="0,1,2", help="workload seeds; median over them")
    parser.add_argument("--large-seeds", default="0", help="seeds at 128 replicas and more (a run takes minutes)")
    parser.add_argument("--per-replica", type=int, default=500, help="requests per replica (the run's length)")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of N x one replica's capacity")
    parser.add_argument("--documents", type=float, default=0.1, help="share of long-document prompts")
    parser.add_argument("--ttft-ms", type=float, default=5000)
    parser.add_argument("--modes", default="promised,routing")
    parser.add_argument("--routers", default=",".join(ROUTERS),
                        help="a subset, to rerun the one a change touched (its ratios then need round_robin's run)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    mix = f"{1 - args.documents:g}:{CHAT},{args.documents:g}:{DOCUMENTS}"
    slo = SLOTargets(ttft_s=args.ttft_ms / 1e3, tbt_s=0.2)
    scheduler = SchedulerConfig(scheduler="slo", max_num_seqs=128)
    base = WorkloadConfig(lengths="mix", length_mix=mix, max_model_len=8192)
    results: dict[str, object] = {"length_mix": mix, "slo": asdict(slo), "load": args.load}
    for mode in args.modes.split(","):
        sim = SimConfig(profile=PROFILE, send_ttft_slo=MODES[mode])
        capacity = run_sim_capacity(replace(base, num_requests=args.per_replica), sim, scheduler, slo,
                                    args.out / f"capacity_{mode}.json", "attainment", 0.5, 4.0, 0.02, 12).capacity
        runs: dict[str, dict[str, list[dict[str, float]]]] = {}
        for n in [int(x) for x in args.replicas.split(",")]:
            seeds = args.large_seeds if n >= 128 else args.seeds
            for seed in [int(x) for x in seeds.split(",")]:
                workload = replace(base, num_requests=args.per_replica * n, rate=args.load * n * capacity, seed=seed)
                for router in args.routers.split(","):
                    figures = row(simulate(workload, replace(sim, replicas=n, router=router), scheduler, slo), slo)
                    runs.setdefault(str(n), {}).setdefault(router, []).append(figures)
                    print(mode, n, seed, router, json.dumps({k: round(v, 3) for k, v in figures.items()}), flush=True)
        results[mode] = {"capacity_one_replica": capacity, "runs": runs}
        print(table(mode, capacity, args.load, runs))
    (args.out / "routers.json").write_text(json.dumps(results, indent=1) + "\n")


def table(mode: str, capacity: float, load: float, runs: dict[str, dict[str, list[dict[str, float]]]]) -> str:
    """Medians over seeds, and each router against round_robin."""
    lines = [f"\n{mode}: one replica's capacity {capacity:.3g} req/s; rate = {load:g} x N x that",
             ("| N | router | runs | goodput (req/s) | vs round_robin | attainment | rejected | TTFT p50 (s) "
              "| TTFT p99 (s) | vs round_robin | chat TTFT p99 (s) | wall (s) |"), "|" + "---|" * 12]
    for n, by_router in runs.items():
        med = {router: {k: statistics.median(r[k] for r in rows) for k in rows[0]} for router, rows in by_router.items()}
        rr = med.get("round_robin")
        for router, m in med.items():
            goodput_ratio = f"{m['goodput'] / rr['goodput']:.2f}x" if rr else "-"
            p99_ratio = f"{m['ttft_p99_s'] / rr['ttft_p99_s']:.2f}x" if rr else "-"
            lines.append(f"| {n} | {router} | {len(by_router[router])} | {m['goodput']:.2f} | {goodput_ratio} | "
                         f"{m['attainment']:.1%} | {m['rejected']:.0f} | {m['ttft_p50_s']:.2f} | "
                         f"{m['ttft_p99_s']:.2f} | {p99_ratio} | {m['chat_ttft_p99_s']:.2f} | {m['wall_s']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
