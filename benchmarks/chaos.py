#!/usr/bin/env python3
"""Chaos on the cluster: kill -9 one replica's worker under steady load, and count what is lost (issue 35).
With `--target engine-process`, the engine process of one `pacer serve --engine-process` instead.

Starts `pacer serve --replicas 2 --threads-per-replica 1` (SmolLM2 unless `--model`) on a free loopback port,
runs a closed loop of `--clients` streaming completions (fixed prompt and output lengths, `ignore_eos`) for
`--warmup-s` + `--before-s`, kills one Replica actor's worker process with SIGKILL (a descendant of the server
whose title is `ray::Replica...`, as the OOM killer would), keeps the load for `--after-s`, then stops sending,
lets the requests in flight end and stops the server (SIGTERM). Bounded: it stops by itself.

Each request ends one way:
  complete      a 200 stream with all its tokens and `data: [DONE]`
  error_event   a 200 stream that ended with an error event (one under way on the killed replica)
  not_accepted  an HTTP error status, or no connection (never accepted, so never lost)
  lost          accepted (200) but ended otherwise: cut off, malformed, short, or no end in --request-timeout-s
Reported: the count of each (lost must be 0), requests re-routed (`pacer:requests_rerouted_total`: no token yet,
moved to the other replica), the time from the kill until /health shows the replica down and up again, and
goodput, the output tokens per second of complete requests (each token timed at its arrival, from
`continuous_usage_stats`), per 5 s window aligned on the kill; recovery is the end of the first window after the
kill back to >= 90 % of the mean of the windows before it (the warm-up's excluded).

    .venv/bin/python benchmarks/chaos.py                          # SmolLM2, ~4 min with start-up
    .venv/bin/python benchmarks/chaos.py --model DIR --before-s 10 --after-s 30   # a quick check of the plumbing

Prints a Markdown summary on stdout (progress on stderr); writes the figures and every request to `--out`.
Exit code 1 if any accepted request was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from common import make_prompts  # stdlib only

from pacer.bench.servers import http_get, pacer_command, server_process

WINDOW_S = 5.0
RECOVERED = 0.9  # of the goodput before the kill


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Record:
    """One request; times in seconds from the start of the load."""

    client: int
    send_s: float
    outcome: str = "lost"
    status: int | None = None
    token_s: list[float] = field(default_factory=list)  # one entry per output token, at the chunk's arrival
    detail: str | None = None


async def one_request(http, body: dict, record: Record, t0: float, output_tokens: int, timeout_s: float) -> None:
    import aiohttp

    done = False
    try:
        async with asyncio.timeout(timeout_s), http.post("/v1/completions", json=body) as response:
            record.status = response.status
            if response.status != 200:
                record.outcome, record.detail = "not_accepted", (await response.text())[:200]
                return
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    record.outcome, record.detail = "error_event", event["error"].get("message", "")[:200]
                    continue
                usage = event.get("usage") or {}
                now = time.perf_counter() - t0
                record.token_s += [now] * (usage.get("completion_tokens", 0) - len(record.token_s))
    except (TimeoutError, aiohttp.ClientError, ValueError) as error:
        if record.status is None:
            record.outcome = "not_accepted"
        record.detail = f"{type(error).__name__}: {error}"[:200]
        return
    if record.outcome != "error_event":
        record.outcome = "complete" if done and len(record.token_s) == output_tokens else "lost"


async def client_loop(http, client: int, prompts: list[list[int]], args: argparse.Namespace, t0: float,
                      stop_s: float, records: list[Record]) -> None:
    i = 0
    while time.perf_counter() - t0 < stop_s:
        body = {"prompt": prompts[i % len(prompts)], "max_tokens": args.output_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"continuous_usage_stats": True}}
        record = Record(client, time.perf_counter() - t0)
        records.append(record)
        await one_request(http, body, record, t0, args.output_tokens, args.request_timeout_s)
        i += 1


async def watch_health(url: str, t0: float, stop: asyncio.Event, samples: list[tuple[float, list[str]]]) -> None:
    """/health every 0.25 s: (time, each replica's state)."""
    while not stop.is_set():
        try:
            status, text = await asyncio.to_thread(http_get, url + "/health", 2.0)
            if status != 200:
                states = [f"http {status}"]
            else:  # replicas on Ray list their states; one engine (process) is up when /health answers 200
                states = [r["state"] for r in json.loads(text)["replicas"]] if text.strip() else ["up"]
        except (OSError, ValueError, KeyError) as error:
            states = [type(error).__name__]
        samples.append((time.perf_counter() - t0, states))
        await asyncio.sleep(0.25)


def replica_workers(root_pid: int, target: str) -> list[int]:
    """Pids of the engines among `root_pid`'s descendants (from /proc): the Ray Replica actors' worker processes, or
    the engine process (`--engine-process`: a spawned multiprocessing child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            todo.append(child)
            try:
                argv = (Path("/proc") / str(child) / "cmdline").read_bytes()
            except OSError:
                continue
            if (argv.startswith(b"ray::Replica") if target == "ray" else b"spawn_main" in argv):
                found.append(child)
    return sorted(found)


def metric(url: str, name: str) -> float:
    text = http_get(url + "/metrics", 5.0)[1]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def run(url: str, server_pid: int, args: argparse.Namespace) -> dict:
    import aiohttp

    prompts = make_prompts(64, args.prompt_tokens, seed=0)
    wanted = 2 if args.target == "ray" else 1
    for _ in range(60):  # Ray names an actor's process once it runs
        workers = replica_workers(server_pid, args.target)
        if len(workers) >= wanted:
            break
        await asyncio.sleep(0.5)
    log(f"replica workers: {workers}")
    rerouted_before = metric(url, "pacer:requests_rerouted_total")
    records: list[Record] = []
    health: list[tuple[float, list[str]]] = []
    kill_s = args.warmup_s + args.before_s
    stop_s = kill_s + args.after_s
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(base_url=url, timeout=timeout, trust_env=False,
                                     connector=aiohttp.TCPConnector(limit=args.clients)) as http:
        t0 = time.perf_counter()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_health(url, t0, stop, health))
        clients = [asyncio.create_task(client_loop(http, c, prompts[c::args.clients], args, t0, stop_s, records))
                   for c in range(args.clients)]
        await asyncio.sleep(kill_s)
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        actual_kill_s = time.perf_counter() - t0
        log(f"killed replica worker {victim} at {actual_kill_s:.1f} s")
        await asyncio.gather(*clients)
        log("load stopped; waiting for /health to show every replica up (at most 120 s)")
        deadline = time.perf_counter() + 120
        while time.perf_counter() < deadline and not (health and _all_up(health[-1][1])
                                                      and any(not _all_up(s) for _, s in health)):
            await asyncio.sleep(0.5)
        stop.set()
        await watcher
    rerouted = metric(url, "pacer:requests_rerouted_total") - rerouted_before
    return report(records, health, actual_kill_s, stop_s, rerouted, args)


def _all_up(states: list[str]) -> bool:
    return bool(states) and all(s == "up" for s in states)


def report(records: list[Record], health: list[tuple[float, list[str]]], kill_s: float, stop_s: float,
           rerouted: float, args: argparse.Namespace) -> dict:
    outcomes = {k: sum(r.outcome == k for r in records) for k in ("complete", "error_event", "not_accepted", "lost")}
    down_s = next((t for t, s in health if t >= kill_s and not _all_up(s)), None)
    up_s = next((t for t, s in health if down_s is not None and t > down_s and _all_up(s)), None)
    tokens = sorted(t for r in records if r.outcome == "complete" for t in r.token_s)
    # windows aligned on the kill: [kill - 5k, kill - 5(k-1)) before it, from the end of the warm-up
    first = -int((kill_s - args.warmup_s) // WINDOW_S)
    offsets = [i * WINDOW_S for i in range(first, int((stop_s - kill_s) // WINDOW_S))]
    windows = [{"from_kill_s": o, "goodput_tok_s": sum(kill_s + o <= t < kill_s + o + WINDOW_S for t in tokens)
                / WINDOW_S} for o in offsets]
    before = [w["goodput_tok_s"] for w in windows if w["from_kill_s"] < 0]
    level = statistics.fmean(before) if before else 0.0
    recovered = next((w for w in windows if w["from_kill_s"] >= 0 and w["goodput_tok_s"] >= RECOVERED * level), None)
    return {
        "outcomes": outcomes, "requests": len(records), "rerouted": rerouted,
        "kill_s": round(kill_s, 2),
        "down_after_kill_s": None if down_s is None else round(down_s - kill_s, 2),
        "up_after_kill_s": None if up_s is None else round(up_s - kill_s, 2),
        "goodput_before_tok_s": round(level, 2),
        "recovered_after_kill_s": None if recovered is None else recovered["from_kill_s"] + WINDOW_S,
        "windows": windows,
        "errors": sorted({r.detail for r in records if r.outcome != "complete" and r.detail}),
        "records": [asdict(r) | {"num_tokens": len(r.token_s), "token_s": None} for r in records],
    }


def markdown(result: dict, command: str) -> str:
    o = result["outcomes"]
    requests = (f"{result['requests']}: {o['complete']} complete, {o['error_event']} ended with an error event, "
                f"{o['not_accepted']} not accepted")
    health = f"{result['down_after_kill_s']} s / {result['up_after_kill_s']} s"
    load = result["load_average"]
    lines = [f"`{command}`", "",
             "| figure | value |", "|---|---|",
             f"| requests | {requests} |",
             f"| **accepted requests lost** | **{o['lost']}** |",
             f"| re-routed (no token yet when the replica died) | {result['rerouted']:.0f} |",
             f"| /health shows the replica down / up again after the kill | {health} |",
             f"| goodput before the kill (mean of {WINDOW_S:.0f} s windows) | {result['goodput_before_tok_s']} tok/s |",
             f"| back to >= {RECOVERED:.0%} of it | {result['recovered_after_kill_s']} s after the kill |",
             f"| machine's 1-minute load average at start / end | {load['start']:.1f} / {load['end']:.1f} |", "",
             "| window (s from the kill) | goodput (tok/s) |", "|---|---|"]
    lines += [f"| {w['from_kill_s']:+.0f} to {w['from_kill_s'] + WINDOW_S:+.0f} | {w['goodput_tok_s']:.1f} |"
              for w in result["windows"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (pacer's default)")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=10.0, help="load before the windows count")
    parser.add_argument("--before-s", type=float, default=30.0, help="measured load before the kill")
    parser.add_argument("--after-s", type=float, default=90.0, help="load after the kill")
    parser.add_argument("--request-timeout-s", type=float, default=120.0)
    parser.add_argument("--target", choices=["ray", "engine-process"], default="ray",
                        help="kill one of 2 replicas on Ray, or the engine process of one `--engine-process` server")
    parser.add_argument("--server-args", default="", help="more flags for pacer serve")
    parser.add_argument("--out", type=Path, default=HERE / "out" / "chaos.json")
    args = parser.parse_args()
    layout = ["--replicas", "2", "--threads-per-replica", "1"] if args.target == "ray" else ["--engine-process"]
    flags = [*layout, *(["--model", args.model] if args.model else []), *args.server_args.split()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log_path = args.out.with_suffix(".server.log")
    log(f"starting pacer serve {' '.join(flags)} (log: {log_path})")
    load_before = os.getloadavg()[0]  # the 1-minute load: other work on the machine makes goodput noisy
    with server_process(pacer_command(flags), log_path, ready_timeout_s=600) as server:
        result = asyncio.run(run(server.url, server.process.pid, args))
    result["load_average"] = {"start": load_before, "end": os.getloadavg()[0]}
    args.out.write_text(json.dumps(result | {"args": {k: str(v) for k, v in vars(args).items()}}, indent=1))
    print(markdown(result, "benchmarks/chaos.py " + " ".join(sys.argv[1:])))
    return 1 if result["outcomes"]["lost"] else 0


if __name__ == "__main__":
    sys.exit(main())
