#!/usr/bin/env python3
"""Soak: does `pacer serve` stay flat (memory, errors, KV) under steady load for half an hour, and drain on SIGTERM?

Load (issue 35): open-loop Poisson chat requests at `--rate`, lengths from the suite's `chat` workload
(benchmarks/suite.toml: the Azure 2023 conversation trace, lengths x 0.25, capped to 2048 tokens), streamed from
/v1/chat/completions. The default rate, 0.4 req/s, is 80 % of pacer's capacity on that workload as the suite
measured it on this class of machine (0.5 [0.5-1] req/s on 2026-12-06, benchmarks/README.md's current figures): the
issue asks for 80 % of capacity. `--concurrency N` runs a closed loop of N clients instead (issue 35's first soak
used 6), which holds the load in flight fixed however fast the machine is at the time. On top:
`--abandon-share` (10 %) of the streams are dropped by the client after 5 chunks, and `--invalid-share` (5 %) of
the requests are invalid (negative max_tokens, a body that is not JSON, a prompt longer than the context, a chat
message without a role), each of which must get a 4xx.

Bounded: arrivals stop at `--duration-s` (and at `--max-requests`); then the run waits for the requests in flight
(at most `--settle-s`), reads KV usage (it must be 0), starts `--drain-requests` long streams and, once each has its
first chunk, sends SIGTERM to the server it started and waits for it to exit. Every accepted drain request must end
cleanly: `data: [DONE]` after a finish reason (`abort` included) or an error event, never a cut connection.

Every `--sample-s` it records the server's RSS summed over its process tree (`--engine-process` and Ray replicas run
the engine in child processes), read from /proc, with the main process's anonymous and file-backed RSS apart, and
/metrics' KV usage and running/waiting requests. Writes to `--out`: soak.json (settings, samples, errors by kind,
RSS growth from minute 5 to the end of the load, the end state, the drain), requests.json (every request),
soak.png (RSS and KV usage over time), server.log.

    .venv/bin/python benchmarks/soak.py --out benchmarks/out/soak                     # 30 min, pacer serve
    .venv/bin/python benchmarks/soak.py --duration-s 900 --replicas 2 --server-args "--threads-per-replica 1"
    .venv/bin/python benchmarks/soak.py --duration-s 60 --out /tmp/soak               # the plumbing, 2 min

Loopback only: it starts the server on 127.0.0.1, or targets `--base-url` (RSS and SIGTERM then need
`--server-pid`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pacer.bench.servers import pacer_command, server_process
from pacer.bench.workload import BenchRequest, WorkloadConfig, build_workload
from pacer.model.weights import load_tokenizer, resolve_model_path

HERE = Path(__file__).resolve().parent
CHAT_TRACE = HERE / "data" / "azure2023_conv.csv"
INVALID_KINDS = ("negative_max_tokens", "bad_json", "too_long_prompt", "no_role")
GAUGES = {"pacer:kv_cache_usage_perc": "kv_usage", "pacer:num_requests_running": "running",
          "pacer:num_requests_waiting": "waiting"}
ABANDON_AFTER_CHUNKS = 5
MIB = 1 << 20


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    """One request as the client saw it. `end` is finished (DONE after a stop/length finish reason), aborted (DONE
    after finish_reason abort), error_event, abandoned (the client left), http_NNN, or client:<error>."""

    index: int
    kind: str  # chat, abandon, drain, or invalid:<what>
    sent_s: float
    end: str = "pending"
    status: int | None = None
    error_code: str | None = None
    chunks: int = 0
    first_chunk_s: float | None = None
    end_s: float | None = None


@dataclass
class Sample:
    t_s: float
    rss_mib: float | None = None  # the server's process tree
    main_rss_mib: float | None = None
    main_anon_mib: float | None = None
    main_file_mib: float | None = None
    num_processes: int | None = None
    kv_usage: float | None = None
    running: float | None = None
    waiting: float | None = None


# ---- the server's memory, from /proc ----------------------------------------------------------------------------


def _status_kib(pid: int) -> dict[str, int]:
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if value.strip().endswith("kB"):
                fields[name] = int(value.split()[0])
    return fields


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += _children(current)
    return tree


def memory_sample(pid: int, sample: Sample) -> None:
    total, count = 0, 0
    for member in process_tree(pid):
        try:
            status = _status_kib(member)
        except OSError:  # exited meanwhile
            continue
        total, count = total + status.get("VmRSS", 0), count + 1
        if member == pid:
            sample.main_rss_mib = status.get("VmRSS", 0) / 1024
            sample.main_anon_mib = status.get("RssAnon", 0) / 1024
            sample.main_file_mib = status.get("RssFile", 0) / 1024
    sample.rss_mib, sample.num_processes = total / 1024, count


# ---- requests ---------------------------------------------------------------------------------------------------


@dataclass
class Soak:
    http: aiohttp.ClientSession
    model: str
    t0: float
    context_words: int
    temperature: float | None
    outcomes: list[Outcome] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def start(self, request: BenchRequest, kind: str, max_tokens: int | None = None,
              ignore_eos: bool = False) -> tuple[Outcome, asyncio.Task]:
        """Record the request now and send it in a task of its own."""
        outcome = Outcome(request.index, kind, self.now())
        self.outcomes.append(outcome)
        return outcome, asyncio.create_task(self._send(request, outcome, max_tokens, ignore_eos))

    async def _send(self, request: BenchRequest, outcome: Outcome, max_tokens: int | None,
                    ignore_eos: bool) -> Outcome:
        kind = outcome.kind
        body = {"model": self.model, "max_tokens": max_tokens or request.max_tokens, "stream": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": request.prompt}]}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        if ignore_eos:
            body["ignore_eos"] = True
        data = json.dumps(body)
        if kind.startswith("invalid:"):
            data = _invalid_body(kind.partition(":")[2], body, self.context_words)
        try:
            async with self.http.post("/v1/chat/completions", data=data,
                                      headers={"Content-Type": "application/json"}) as response:
                outcome.status = response.status
                if response.status != 200:
                    text = await response.text()
                    outcome.end = f"http_{response.status}"
                    outcome.error_code = _error_code(text)
                else:
                    await self._read(response, outcome)
        except (aiohttp.ClientError, TimeoutError) as error:
            outcome.end = f"client:{type(error).__name__}"
        outcome.end_s = self.now()
        return outcome

    async def _read(self, response: aiohttp.ClientResponse, outcome: Outcome) -> None:
        pending, finish = b"", None
        async for chunk in response.content.iter_any():
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    outcome.end = "aborted" if finish == "abort" else "finished" if finish else "no_finish_reason"
                    return
                event = json.loads(data)
                if "error" in event:
                    outcome.end, outcome.error_code = "error_event", str(event["error"].get("code"))
                    return
                for choice in event.get("choices") or []:
                    finish = choice.get("finish_reason") or finish
                outcome.chunks += 1
                if outcome.first_chunk_s is None:
                    outcome.first_chunk_s = self.now()
                if outcome.kind == "abandon" and outcome.chunks >= ABANDON_AFTER_CHUNKS:
                    outcome.end = "abandoned"
                    response.close()  # the client goes away mid-stream: the server must abort and free its KV
                    return
        outcome.end = "client:cut_off"  # the stream ended without [DONE]


def _invalid_body(what: str, body: dict, context_words: int) -> str:
    if what == "negative_max_tokens":
        return json.dumps(body | {"max_tokens": -5})
    if what == "bad_json":
        return json.dumps(body)[:-7]
    if what == "too_long_prompt":  # one word is one token or more: past the context for certain
        return json.dumps(body | {"messages": [{"role": "user", "content": " hello" * (context_words + 16)}]})
    assert what == "no_role"
    return json.dumps(body | {"messages": [{"content": "hello"}]})


def _error_code(text: str) -> str | None:
    try:
        error = json.loads(text).get("error") or {}
    except (json.JSONDecodeError, AttributeError):
        return None
    return str(error.get("code") or error.get("type"))


async def read_gauges(http: aiohttp.ClientSession, sample: Sample) -> None:
    try:
        async with http.get("/metrics") as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name in GAUGES:
                setattr(sample, GAUGES[metric.name], metric.value)


# ---- the run ----------------------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, requests: list[BenchRequest], base_url: str, pid: int | None,
               process: subprocess.Popen | None) -> dict:
    rng = random.Random(args.seed)
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=args.request_timeout_s, connect=30)
    async with aiohttp.ClientSession(base_url, timeout=timeout, connector=aiohttp.TCPConnector(limit=0),
                                     trust_env=False) as http:
        async with http.get("/v1/models") as response:
            model = (await response.json())["data"][0]
        run = Soak(http, model["id"], time.perf_counter(), int(model.get("max_model_len") or 8192),
                   args.temperature)
        load_done = asyncio.Event()

        async def sampler() -> None:
            while True:
                sample = Sample(round(run.now(), 1))
                if pid is not None:
                    memory_sample(pid, sample)
                await read_gauges(http, sample)
                samples.append(sample)
                try:
                    await asyncio.wait_for(load_done.wait(), args.sample_s)
                    return
                except TimeoutError:
                    pass

        def send(request: BenchRequest) -> asyncio.Task:
            draw = rng.random()
            kind = ("abandon" if draw < args.abandon_share else
                    f"invalid:{INVALID_KINDS[request.index % len(INVALID_KINDS)]}"
                    if draw < args.abandon_share + args.invalid_share else "chat")
            return run.start(request, kind)[1]

        async def arrive(request: BenchRequest) -> None:
            await asyncio.sleep(max(0.0, request.arrival_s - run.now()))
            await send(request)

        queue = list(reversed(requests))

        async def client() -> None:  # closed loop: the next request as soon as the last one ends
            while queue and run.now() < args.duration_s:
                await send(queue.pop())

        sampling = asyncio.create_task(sampler())
        if args.concurrency:
            log(f"closed loop: {args.concurrency} clients for {args.duration_s:.0f} s, at most {len(requests)} requests")
            load = [asyncio.create_task(client()) for _ in range(args.concurrency)]
        else:
            log(f"{len(requests)} arrivals over {args.duration_s:.0f} s at {args.rate} req/s")
            load = [asyncio.create_task(arrive(r)) for r in requests]
        await asyncio.sleep(args.duration_s)
        load_end_s = run.now()
        settled = (await asyncio.wait(load, timeout=args.settle_s))[1] == set()
        await asyncio.sleep(2)  # the last abandoned streams' aborts reach the engine
        load_done.set()
        await sampling
        end = Sample(round(run.now(), 1))
        if pid is not None:
            memory_sample(pid, end)
        await read_gauges(http, end)
        samples.append(end)
        log(f"load over at {load_end_s:.0f} s (settled: {settled}); KV usage {end.kv_usage}, running {end.running}, "
            f"waiting {end.waiting}")
        drain = await drain_check(args, run, requests, pid, process)
    return {"samples": samples, "outcomes": run.outcomes, "load_end_s": load_end_s, "settled": settled,
            "end": end, "drain": drain}


async def drain_check(args: argparse.Namespace, run: Soak, requests: list[BenchRequest], pid: int | None,
                      process: subprocess.Popen | None) -> dict | None:
    """Long streams in flight, then SIGTERM: each must end cleanly, and the server must exit 0."""
    if pid is None or not args.drain_requests:
        return None
    drain_outcomes, streams = zip(*(run.start(request, "drain", max_tokens=args.drain_max_tokens, ignore_eos=True)
                                    for request in requests[:args.drain_requests]))
    deadline = time.monotonic() + 120
    while any(o.first_chunk_s is None and o.end == "pending" for o in drain_outcomes) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    signalled_s = run.now()
    os.kill(pid, signal.SIGTERM)
    log(f"SIGTERM with {sum(o.end == 'pending' for o in drain_outcomes)} drain request(s) streaming")
    await asyncio.wait(streams, timeout=args.drain_wait_s)
    exit_code = None
    if process is not None:
        deadline = time.monotonic() + args.drain_wait_s
        while process.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        exit_code = process.poll()
    exit_s = run.now()
    ends = Counter(o.end for o in drain_outcomes)
    clean = all(o.end in ("finished", "aborted", "error_event") for o in drain_outcomes if o.status == 200)
    return {"requests": len(streams), "ends": dict(ends), "all_clean": clean, "exit_code": exit_code,
            "exit_after_s": round(exit_s - signalled_s, 2)}


def rss_growth(samples: list[Sample], start_s: float, end_s: float, window_s: float = 60.0) -> dict | None:
    """Median RSS over the minute from start_s and over the last minute before end_s; slope by least squares."""
    points = [(s.t_s, s.rss_mib) for s in samples if s.rss_mib is not None and start_s <= s.t_s <= end_s]
    if len(points) < 4 or points[-1][0] - points[0][0] < 2 * window_s:
        return None
    first = statistics.median(r for t, r in points if t < points[0][0] + window_s)
    last = statistics.median(r for t, r in points if t > points[-1][0] - window_s)
    ts, rs = [t / 60 for t, _ in points], [r for _, r in points]
    mean_t, mean_r = statistics.fmean(ts), statistics.fmean(rs)
    slope = sum((t - mean_t) * (r - mean_r) for t, r in zip(ts, rs)) / sum((t - mean_t) ** 2 for t in ts)
    return {"from_s": points[0][0], "to_s": points[-1][0], "start_mib": round(first, 1), "end_mib": round(last, 1),
            "growth": round(last / first - 1, 4), "slope_mib_per_min": round(slope, 2)}


def summarize(args: argparse.Namespace, result: dict) -> dict:
    load = [o for o in result["outcomes"] if o.kind != "drain"]
    by_kind: dict[str, Counter] = {}
    for o in load:
        by_kind.setdefault(o.kind.partition(":")[0] if o.kind.startswith("invalid") else o.kind, Counter())[
            o.end if o.error_code is None else f"{o.end} ({o.error_code})"] += 1
    invalid_ok = all(o.status is not None and 400 <= o.status < 500 for o in load if o.kind.startswith("invalid"))
    server_errors = sum(1 for o in result["outcomes"] if (o.status or 0) >= 500 or o.end == "error_event")
    growth = rss_growth(result["samples"], 300.0, result["load_end_s"])
    return {"requests": len(load), "outcomes_by_kind": {k: dict(v) for k, v in by_kind.items()},
            "invalid_all_4xx": invalid_ok, "server_errors_5xx": server_errors,
            "client_errors": sum(1 for o in load if o.end.startswith("client:")),
            "unfinished_chat": sum(1 for o in load if o.kind == "chat" and o.end != "finished"),
            "rss_growth_from_minute_5": growth, "settled": result["settled"], "end": asdict(result["end"]),
            "drain": result["drain"]}


def plot(samples: list[Sample], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t_s / 60 for s in samples]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(2, 1))
    for name, label in (("rss_mib", "RSS, process tree"), ("main_anon_mib", "main process, anonymous")):
        top.plot(minutes, [getattr(s, name) or math.nan for s in samples], label=label)
    top.set_ylabel("MiB")
    top.legend(loc="lower right")
    top.set_title(title, fontsize=10)
    top.grid(alpha=0.3)
    bottom.plot(minutes, [s.kv_usage if s.kv_usage is not None else math.nan for s in samples], label="KV usage")
    bottom.plot(minutes, [(s.running or 0) / 10 for s in samples], label="running / 10", alpha=0.6)
    bottom.set_ylabel("fraction")
    bottom.set_xlabel("minutes")
    bottom.legend(loc="upper right")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=1800.0, help="seconds of load (arrivals stop then)")
    parser.add_argument("--rate", type=float, default=0.4, help="Poisson arrivals, requests/s (80 %% of capacity)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="closed loop instead: this many clients, each sending when its last request ended")
    parser.add_argument("--max-requests", type=int, default=5000, help="at most this many arrivals")
    parser.add_argument("--abandon-share", type=float, default=0.10, help="streams the client drops after 5 chunks")
    parser.add_argument("--invalid-share", type=float, default=0.05, help="invalid requests (each must get a 4xx)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS and /metrics samples")
    parser.add_argument("--settle-s", type=float, default=300.0, help="at most this long for the last requests")
    parser.add_argument("--drain-requests", type=int, default=4, help="long streams in flight at the SIGTERM")
    parser.add_argument("--drain-max-tokens", type=int, default=512)
    parser.add_argument("--drain-wait-s", type=float, default=120.0, help="at most this long for the exit")
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--replicas", type=int, default=None, help="pacer serve --replicas N (Ray)")
    parser.add_argument("--server-args", default="", help="more `pacer serve` flags, one string")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment for the server only (e.g. MALLOC_ARENA_MAX=2); repeatable")
    parser.add_argument("--base-url", default=None, help="a running server instead of starting one")
    parser.add_argument("--server-pid", type=int, default=None, help="with --base-url: its pid, for RSS and SIGTERM")
    parser.add_argument("--model", default=None, help="tokenizer of the served model (default: SmolLM2)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sent with every request (default: none, so the server's default, random sampling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "out" / "soak")
    args = parser.parse_args()

    # enough for the run (a closed-loop request takes a few seconds at least), bounded by --max-requests
    expected = args.concurrency * args.duration_s / 2 if args.concurrency else args.rate * args.duration_s * 1.5
    num_requests = min(args.max_requests, math.ceil(expected) + 20)
    workload = WorkloadConfig(num_requests=num_requests, arrival="poisson", rate=args.rate, lengths="trace",
                              trace=str(CHAT_TRACE), trace_sample=True, length_scale=0.25, max_model_len=2048,
                              seed=args.seed)
    tokenizer = load_tokenizer(resolve_model_path(args.model))
    requests = [r for r in build_workload(workload, tokenizer) if args.concurrency or r.arrival_s < args.duration_s]
    args.out.mkdir(parents=True, exist_ok=True)
    flags = shlex.split(args.server_args) + (["--replicas", str(args.replicas)] if args.replicas else [])
    server_env = dict(item.split("=", 1) for item in args.server_env)
    started = time.time()
    if args.base_url:
        result = asyncio.run(soak(args, requests, args.base_url, args.server_pid, None))
        command = None
    else:
        command = pacer_command(flags)
        with server_process(command, args.out / "server.log", env=server_env) as server:
            log(f"server up at {server.url}, pid {server.process.pid}")
            result = asyncio.run(soak(args, requests, server.url, server.process.pid, server.process))
    report = {"command": shlex.join(sys.argv), "server_command": command, "server_env": server_env,
              "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
              "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "workload": asdict(workload) | {"trace": "benchmarks/data/azure2023_conv.csv"},
              "summary": summarize(args, result), "samples": [asdict(s) for s in result["samples"]]}
    (args.out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "requests.json").write_text(json.dumps([asdict(o) for o in result["outcomes"]]) + "\n")
    growth = report["summary"]["rss_growth_from_minute_5"]
    load = f"{args.concurrency} clients, closed loop" if args.concurrency else f"{args.rate} req/s"
    title = (f"soak: {load}, {' '.join(flags) or 'pacer serve'}" + (
        f"; RSS {growth['growth']:+.1%} from minute 5 ({growth['slope_mib_per_min']:+.1f} MiB/min)" if growth else ""))
    plot(result["samples"], args.out / "soak.png", title)
    print(json.dumps(report["summary"], indent=1))
    log(f"wrote {args.out}/soak.json, requests.json, soak.png")


if __name__ == "__main__":
    main()
