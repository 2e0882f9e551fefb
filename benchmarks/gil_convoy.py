#!/usr/bin/env python3
"""How much a second Python thread slows the engine's iterations: the GIL shared with a server's event loop.

The engine steps 32 running decodes alone, then beside a thread that runs pure Python for BUSY of every 10 ms and
sleeps the rest (what an event loop writing SSE chunks does), for each BUSY given. Each figure is the median step
after the first 40 of a run. `pacer serve` has exactly this pair: the engine thread and uvicorn's loop.

    .venv/bin/python benchmarks/gil_convoy.py --busy 0 0.1 0.3
    python3 benchmarks/gil_convoy.py --device cuda --model DIR --busy 0 0.1   # on a GPU (benchmarks/log/2026-11-26-gpu-first-check-h100.md)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time

from pacer.llm import LLM
from pacer.request import Request, SamplingParams

PERIOD_S = 0.01


def spin(busy: float, stop: threading.Event) -> None:
    """Hold the GIL `busy` of every period: Python bytecode, no C call that would release it."""
    while not stop.is_set():
        until = time.perf_counter() + PERIOD_S * busy
        while time.perf_counter() < until:
            sum(range(50))
        time.sleep(PERIOD_S * (1 - busy))


def median_step_ms(llm: LLM, tag: str, num_requests: int, max_tokens: int) -> float:
    engine = llm.engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    for i in range(num_requests):
        engine.add_request(Request(f"{tag}-{i}", list(range(100, 164)), params))
    times = []
    while engine.has_unfinished:
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[40:]) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the default model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--busy", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=150)
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="with --device cuda: replay decode steps from CUDA graphs")
    args = ap.parse_args()

    llm = LLM(args.model, device=args.device, dtype=args.dtype, threads=args.threads, num_blocks=2048,
              cuda_graphs=args.cuda_graphs)
    median_step_ms(llm, "warm-up", args.num_requests, args.max_tokens)
    graphs = " (CUDA graphs)" if llm.engine.executor.graphs is not None else ""
    print(f"{args.device}{graphs}, switch interval {sys.getswitchinterval() * 1e3:g} ms, {args.num_requests} decodes "
          "a step")
    print("| busy | step alone (ms) | beside the busy thread (ms) | slowdown |\n|---|---|---|---|")
    for busy in args.busy:
        alone = median_step_ms(llm, f"alone-{busy}", args.num_requests, args.max_tokens)
        stop = threading.Event()
        thread = threading.Thread(target=spin, args=(busy, stop), daemon=True)
        thread.start()
        beside = median_step_ms(llm, f"beside-{busy}", args.num_requests, args.max_tokens)
        stop.set()
        thread.join()
        print(f"| {busy:.0%} | {alone:.2f} | {beside:.2f} | {beside / alone:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
