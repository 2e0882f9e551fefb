#!/usr/bin/env python3
"""Does an oversized request hurt anyone else? Small streaming requests' TTFT with and without 20 MB bodies arriving
beside them (issue 35: the 413 within 100 ms, and the concurrent requests' TTFT p99 within 10 % of a run without).

One `pacer serve` (started here, default model, flags after `--server-args`) serves `--clients` closed-loop clients,
each sending streaming /v1/completions of `--prompt-words` words and `--max-tokens` tokens back to back for
`--duration-s`. The run is done twice on the same server, alternating `--repeats` times: `quiet`, and `oversized`, where
one more client posts a `--body-mb` MB body (a prompt of that many bytes) every `--every-s` seconds and times its
answer. Reported per condition (median over repeats): TTFT p50 and p99 of the small requests (send -> first content
chunk), their count, the server process's CPU time per small request (what the oversized posts cost the server
itself), and for the oversized posts the status codes and the time to the status line.

The oversized posts come from their own process, at nice `--flood-nice`: sending 20 MB a second costs the sender's CPU,
which on a client machine would not be the server's, and in the small clients' event loop it would delay their own
timestamps. A third condition, `decoy`, is the control: the same posts sent to Python's `http.server` on another port
(it answers a POST with 501 without reading the body), so what they cost the machine, apart from pacer, shows.

    .venv/bin/python benchmarks/big_body.py --out benchmarks/out/big_body.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from pacer.bench.servers import free_port, pacer_server

HERE = Path(__file__).resolve().parent


async def small_client(session: aiohttp.ClientSession, url: str, args: argparse.Namespace, until: float,
                       ttfts: list[float], errors: list[str]) -> None:
    body = {"prompt": " ".join(["hello"] * args.prompt_words), "max_tokens": args.max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0}
    while time.monotonic() < until:
        sent = time.perf_counter()
        first = None
        async with session.post(url + "/v1/completions", json=body) as response:
            if response.status != 200:
                errors.append(str(response.status))
                await response.read()
                continue
            async for line in response.content:
                if first is None and line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    first = time.perf_counter() - sent
        if first is not None:
            ttfts.append(first)


def flood(url: str, args: argparse.Namespace, until: float, results: multiprocessing.Queue) -> None:
    """The oversized posts, in a process of their own; puts their (status, seconds) answers on `results`."""
    os.nice(args.flood_nice)
    answers: list[tuple[int, float]] = []

    async def run() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600), trust_env=False) as session:
            await big_client(session, url, args, until, answers)

    asyncio.run(run())
    results.put(answers)


async def big_client(session: aiohttp.ClientSession, url: str, args: argparse.Namespace, until: float,
                     answers: list[tuple[int, float]]) -> None:
    payload = json.dumps({"prompt": "x" * int(args.body_mb * 1e6), "max_tokens": 4}).encode()
    while time.monotonic() < until:
        sent = time.perf_counter()
        try:
            async with session.post(url + "/v1/completions", data=payload,
                                    headers={"Content-Type": "application/json"}) as response:
                answers.append((response.status, time.perf_counter() - sent))
                await response.read()
        except aiohttp.ClientError as error:  # a server may close the connection after its 413
            answers.append((-1, time.perf_counter() - sent))
            print(f"oversized post: {error!r}", file=sys.stderr)
        await asyncio.sleep(args.every_s)


async def one_run(url: str, args: argparse.Namespace, condition: str, flood_url: str | None) -> dict:
    ttfts: list[float] = []
    errors: list[str] = []
    answers: list[tuple[int, float]] = []
    until = time.monotonic() + args.duration_s  # CLOCK_MONOTONIC: the same clock in the flood's process
    results: multiprocessing.Queue = multiprocessing.Queue()
    sender = None if flood_url is None else multiprocessing.Process(target=flood, args=(flood_url, args, until, results))
    if sender is not None:
        sender.start()
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
        await asyncio.gather(*(small_client(session, url, args, until, ttfts, errors) for _ in range(args.clients)))
    if sender is not None:
        answers = await asyncio.to_thread(results.get)
        sender.join()
    ttfts.sort()
    return {"condition": condition, "requests": len(ttfts), "errors": errors,
            "ttft_p50_ms": 1e3 * ttfts[len(ttfts) // 2], "ttft_p99_ms": 1e3 * ttfts[min(len(ttfts) - 1,
                                                                                        int(0.99 * len(ttfts)))],
            "oversized": [{"status": s, "ms": 1e3 * t} for s, t in answers]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc): what the server itself spent, apart from the clients."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--body-mb", type=float, default=20.0)
    ap.add_argument("--every-s", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flood-nice", type=int, default=19, help="niceness of the oversized posts' process")
    ap.add_argument("--server-args", default="--threads 2", help="more `pacer serve` flags, one string")
    ap.add_argument("--out", default=str(HERE / "out" / "big_body.json"))
    args = ap.parse_args()
    out = Path(args.out)
    runs = []
    decoy_port = free_port()
    decoy = subprocess.Popen([sys.executable, "-m", "http.server", str(decoy_port), "--bind", "127.0.0.1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    floods = {"quiet": None, "oversized": None, "decoy": f"http://127.0.0.1:{decoy_port}"}
    try:
        with pacer_server(args.server_args.split(), out.with_suffix(".server.log")) as server:
            floods["oversized"] = server.url
            warm_up = argparse.Namespace(**{**vars(args), "duration_s": 5.0})
            asyncio.run(one_run(server.url, warm_up, "quiet", None))
            for i in range(args.repeats):
                for condition, flood_url in floods.items():
                    cpu_before = cpu_seconds(server.process.pid)
                    runs.append(asyncio.run(one_run(server.url, args, condition, flood_url)) | {"repeat": i})
                    runs[-1]["server_cpu_s"] = cpu_seconds(server.process.pid) - cpu_before
                    print(json.dumps({k: v for k, v in runs[-1].items() if k != "oversized"}), file=sys.stderr)
    finally:
        decoy.terminate()
        decoy.wait()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(f"{args.clients} clients x {args.prompt_words}-word prompts, {args.max_tokens} tokens, {args.duration_s:.0f} s "
          f"a run; medians of {args.repeats}\n")
    print("| condition | small requests | TTFT p50 (ms) | TTFT p99 (ms) | server CPU ms per small request "
          "| oversized posts: statuses | to status (ms), p50 / max |")
    print("|---|---|---|---|---|---|---|")
    for condition in floods:
        mine = [r for r in runs if r["condition"] == condition]
        posts = [p for r in mine for p in r["oversized"]]
        statuses = ", ".join(f"{s}: {sum(p['status'] == s for p in posts)}" for s in sorted({p["status"] for p in posts}))
        times = sorted(p["ms"] for p in posts)
        print(f"| {condition} | {statistics.median(r['requests'] for r in mine):.0f} "
              f"| {statistics.median(r['ttft_p50_ms'] for r in mine):.0f} "
              f"| {statistics.median(r['ttft_p99_ms'] for r in mine):.0f} "
              f"| {statistics.median(1e3 * r['server_cpu_s'] / r['requests'] for r in mine):.1f} | {statuses or '-'} "
              f"| {f'{times[len(times) // 2]:.0f} / {times[-1]:.0f}' if times else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
