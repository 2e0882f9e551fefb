#!/usr/bin/env python3
"""Scheduler overhead: time in schedule() (and update()) per iteration with 256 running requests, as a share of the
iteration's own (predicted) time. Fabricated state: 256 decoding requests at 256-766 tokens of context and a
queue of 64 waiting prompts that cannot join (max_num_seqs is full), the KV pool large enough for all of them.
Every prompt opens with the same 128 tokens (a system prompt), then its own; each policy runs with prefix caching
off and on (its cost: publishing each block a decode fills, and the look-ups of the requests that start).

    .venv/bin/python benchmarks/scheduler_overhead.py --profile PROFILE [--profile benchmarks/data/profiles/sarathi-a100]
"""

from __future__ import annotations

import argparse
import statistics
import time

from pacer.config import SchedulerConfig
from pacer.kv import KVCacheManager
from pacer.request import SLO, Request, SamplingParams
from pacer.scheduling import ModelOutput, scheduler_class
from pacer.sim.gpu import load_sim_profile

NUM_RUNNING, NUM_WAITING = 256, 64


def prompt(index: int, length: int) -> list[int]:
    return [7] * 128 + [1000 + index] + [0] * (length - 129)


def measure(profile: str, policy: str, iterations: int, prefix_caching: bool) -> tuple[float, float, float]:
    latency, _ = load_sim_profile(profile)
    config = SchedulerConfig(scheduler=policy, max_num_seqs=NUM_RUNNING)
    scheduler = scheduler_class(policy)(config, KVCacheManager(200_000, 16, prefix_caching), 16_384, latency=latency)
    # A TBT every profile's 256 decodes can keep (about 4 s an iteration on the CPU one): slo starts a request only
    # while the decodes leave room within the TBT, so a tighter one would hold the batch under 256.
    slo = SLO(ttft_s=5.0, tbt_s=10.0)
    params = SamplingParams(max_tokens=10_000, ignore_eos=True)  # none finishes, not even while the others prefill
    now = 0.0
    for i in range(NUM_RUNNING):  # prefill each alone, so the plan starts with 256 decodes
        request = Request(f"r{i}", prompt(i, 256 + 2 * i), params, slo, arrival_s=now)
        scheduler.add(request)
        while request.is_prefilling or request.num_output_tokens == 0:
            plan = scheduler.schedule(now)
            sampled = {r.request_id: 1 for r in plan.requests if plan.samples(r)}
            scheduler.update(plan, ModelOutput(sampled, elapsed_s=latency.predict(plan.shape)), now)
    for i in range(NUM_WAITING):
        scheduler.add(Request(f"w{i}", prompt(NUM_RUNNING + i, 256), params, slo, arrival_s=now))
    schedule_s, update_s, iteration_times = [], [], []
    for _ in range(iterations):
        start = time.perf_counter()
        plan = scheduler.schedule(now)
        planned = time.perf_counter()
        sampled = {r.request_id: 1 for r in plan.requests}
        elapsed = latency.predict(plan.shape)
        result = ModelOutput(sampled, elapsed_s=elapsed)
        updating = time.perf_counter()
        scheduler.update(plan, result, now + elapsed)
        schedule_s.append(planned - start)
        update_s.append(time.perf_counter() - updating)
        iteration_times.append(elapsed)
        now += elapsed
    assert len(plan.requests) == NUM_RUNNING and len(scheduler.waiting) == NUM_WAITING, (policy, len(plan.requests), len(scheduler.waiting))
    return statistics.median(schedule_s), statistics.median(update_s), statistics.median(iteration_times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", action="append", required=True)
    ap.add_argument("--schedulers", default="fcfs,sarathi,slo")
    ap.add_argument("--iterations", type=int, default=200)
    args = ap.parse_args()
    print("| profile | policy | prefix caching | schedule() (ms) | update() (ms) | iteration (ms) | schedule() share "
          "| both |\n|---|---|---|---|---|---|---|---|")
    for profile in args.profile:
        for policy in args.schedulers.split(","):
            for caching in (False, True):
                schedule_s, update_s, iteration = measure(profile, policy, args.iterations, caching)
                print(f"| {profile.rsplit('/', 1)[-1]} | {policy} | {'on' if caching else 'off'} | "
                      f"{schedule_s * 1e3:.2f} | {update_s * 1e3:.2f} | {iteration * 1e3:.1f} | "
                      f"{schedule_s / iteration:.2%} | {(schedule_s + update_s) / iteration:.2%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
