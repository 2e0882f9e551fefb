#!/usr/bin/env python3
"""How well does the latency model predict iterations it was not fitted on? A held-out serving replay.

Replays a workload (the same flags as `pacer bench`: by default the scaled Azure conversation trace)
through a real engine in real time, in-process: requests join at their arrival times, the engine
steps as the server's engine thread would, and every iteration's batch shape, prediction (with the
online correction, as the scheduler saw it) and measured executor time are recorded. Reports
|measured - predicted| / measured at p50 / p90 / p99, for the corrected model and for the raw
profile alone, and writes every iteration to --out. Also prints what the replay served (TTFT, the gaps
between tokens, busy time), so two policies can be compared on the same iterations' evidence
(`--arrival poisson --rate R --slo-ttft-ms 0` is Sarathi-Serve's TBT-only condition).

    .venv/bin/python benchmarks/latency_error.py --scheduler slo --num-requests 100 --out benchmarks/out/latency_error.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from pacer.bench.workload import WorkloadConfig, build_workload
from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.request import SLO, Request, SamplingParams


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheduler", default="slo")
    ap.add_argument("--num-requests", type=int, default=100)
    ap.add_argument("--trace", default="benchmarks/data/azure2023_conv.csv")
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--time-scale", type=float, default=4.5)
    ap.add_argument("--arrival", default="trace", help="trace (the trace's own times) or poisson at --rate")
    ap.add_argument("--rate", type=float, default=1.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--slo-ttft-ms", type=float, default=3000, help="0: no TTFT SLO (Sarathi's condition)")
    ap.add_argument("--slo-tbt-ms", type=float, default=500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "auto"),
                    help="float32 as in the first runs; bfloat16 is what `auto` picks on a CPU with AVX-512 BF16")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    config = EngineConfig.from_kwargs(model=args.model, scheduler=args.scheduler, dtype=args.dtype, device=args.device,
                                      threads=args.threads, max_model_len=2048,
                                      max_num_batched_tokens=args.max_num_batched_tokens)
    engine, tokenizer = build_engine(config)
    latency = engine.scheduler.latency
    if latency is None:
        raise SystemExit("no latency profile: run `pacer profile` first")
    workload = WorkloadConfig(num_requests=args.num_requests, arrival=args.arrival, rate=args.rate, lengths="trace", trace=args.trace,
                              length_scale=args.length_scale, time_scale=args.time_scale, max_model_len=2048)
    slo = SLO(ttft_s=args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None, tbt_s=args.slo_tbt_ms / 1e3)
    pending = sorted(build_workload(workload, tokenizer), key=lambda r: r.arrival_s)
    rows = []
    arrivals: dict[str, float] = {}
    token_times: dict[str, list[float]] = {}
    start = engine.clock()
    while pending or engine.has_unfinished:
        now = engine.clock() - start
        while pending and pending[0].arrival_s <= now:
            b = pending.pop(0)
            arrivals[str(b.index)], token_times[str(b.index)] = b.arrival_s, []
            engine.add_request(Request(str(b.index), tokenizer.encode(b.prompt),
                                       SamplingParams(max_tokens=b.max_tokens, ignore_eos=True, temperature=0), slo))
        if not engine.has_unfinished:
            time.sleep(min(0.01, max(0.0, pending[0].arrival_s - now)))
            continue
        for output in engine.step():
            token_times[output.request_id] += [engine.clock() - start] * len(output.new_token_ids)
        stats = engine.last_iteration
        if stats is None or stats.predicted_s is None:
            continue
        rows.append({"predicted_s": stats.predicted_s, "raw_predicted_s": latency.predict_raw(stats.shape),
                     "elapsed_s": stats.elapsed_s, "shape": stats.shape._asdict()})
        engine.last_iteration = None
    for name, key in (("with online correction", "predicted_s"), ("profile alone", "raw_predicted_s")):
        errors = np.array([abs(r["elapsed_s"] - r[key]) / r["elapsed_s"] for r in rows])
        print(f"{len(rows)} iterations, {name}: |error| p50 {np.quantile(errors, 0.5):.1%}, "
              f"p90 {np.quantile(errors, 0.9):.1%}, p99 {np.quantile(errors, 0.99):.1%}")
    ttfts = [times[0] - arrivals[rid] for rid, times in token_times.items() if times]
    gaps = [b - a for times in token_times.values() for a, b in itertools.pairwise(times)]
    print(f"served: TTFT p50 {np.quantile(ttfts, 0.5):.2f} s, p99 {np.quantile(ttfts, 0.99):.2f} s; "
          f"TBT p50 {np.quantile(gaps, 0.5) * 1e3:.0f} ms, p99 {np.quantile(gaps, 0.99) * 1e3:.0f} ms; "
          f"busy {sum(r['elapsed_s'] for r in rows):.1f} s in {len(rows)} iterations")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "iterations": rows,
                                        "profile": latency.to_json() | {"samples": None},
                                        "slo": asdict(slo)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
