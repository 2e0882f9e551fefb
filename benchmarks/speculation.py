#!/usr/bin/env python3
"""Does n-gram speculation pay where drafts are good, and cost nothing where they are bad (issue 37)?

Two `pacer serve` (started here, default model, flags after `--server-args`): one with `--speculation off`, one with
`--speculation ngram`, on the same machine, loaded one at a time, alternating `--repeats` times. Workloads, fixed
before any run (greedy, streamed chat completions, up to `--max-tokens` tokens each):

- `edit` (drafts should be good): "repeat this text, correcting any mistakes" over paragraphs of this repository's
  README, one client sending them one after another;
- `chat` (drafts should be bad): open questions whose answers copy nothing from the prompt, at 1 client and at
  `--clients` clients.

Per run: TPOT p50 over the requests (time from first to last token / (completion tokens - 1), tokens from `usage`),
output tok/s over the run, and the drafts' acceptance from /metrics' `spec_decode_*` counters. Medians of the runs.

    .venv/bin/python benchmarks/speculation.py --out benchmarks/out/speculation.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import time
from pathlib import Path

import aiohttp

from pacer.bench.servers import pacer_server

HERE = Path(__file__).resolve().parent
QUESTIONS = [
    "What makes a good cup of tea?", "Why is the sky blue?", "Give me three ideas for a rainy weekend.",
    "How do bees make honey?", "What should I pack for a hiking trip?", "Why do cats purr?",
    "How does a bicycle stay upright?", "What is a good way to learn a new language?",
]


def edit_prompts(count: int) -> list[str]:
    """Paragraphs of README.md (prose of 200-600 characters, no tables or code), the first `count` of them."""
    text = (HERE.parent / "README.md").read_text(encoding="utf-8")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    prose = [p for p in paragraphs if 200 <= len(p) <= 600 and not p.startswith(("|", "#", "`", "-", "```"))]
    return [f"Repeat the following text exactly, correcting any mistakes:\n\n{p}" for p in prose[:count]]


async def one_request(session: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    first = last = None
    tokens = 0
    async with session.post(url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if event["choices"] and event["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    tpot = (last - first) / (tokens - 1) if first is not None and tokens > 1 else None
    return {"tokens": tokens, "tpot_s": tpot}


async def one_run(url: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    queue = list(prompts)
    results: list[dict] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while queue:
            results.append(await one_request(session, url, queue.pop(0), max_tokens))

    before = await counters(url)
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800), trust_env=False) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    elapsed = time.perf_counter() - start
    after = await counters(url)
    drafts = after["draft_tokens"] - before["draft_tokens"]
    tpots = [r["tpot_s"] for r in results if r["tpot_s"] is not None]
    return {"requests": len(results), "tpot_p50_ms": 1e3 * statistics.median(tpots),
            "output_tok_s": sum(r["tokens"] for r in results) / elapsed,
            "draft_tokens": drafts, "acceptance": (after["accepted_tokens"] - before["accepted_tokens"]) / drafts
            if drafts else None}


async def counters(url: str) -> dict[str, float]:
    """/metrics' speculative decoding counters (0 where the server has none)."""
    async with aiohttp.ClientSession(trust_env=False) as session, session.get(url + "/metrics") as response:
        text = await response.text()
    found = {}
    for name in ("draft_tokens", "accepted_tokens"):
        match = re.search(rf"^pacer:spec_decode_num_{name}_total(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
        found[name] = float(match.group(1)) if match else 0.0
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=6, help="edit prompts (README paragraphs)")
    ap.add_argument("--clients", type=int, default=4, help="clients of the loaded chat run")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--server-args", default="--threads 2", help="more `pacer serve` flags, one string")
    ap.add_argument("--out", default=str(HERE / "out" / "speculation.json"))
    args = ap.parse_args()
    out = Path(args.out)
    workloads = {"edit, 1 client": (edit_prompts(args.edits), 1), "chat, 1 client": (QUESTIONS, 1),
                 f"chat, {args.clients} clients": (QUESTIONS * 2, args.clients)}
    runs = []
    with (pacer_server([*args.server_args.split(), "--speculation", "off"], out.with_suffix(".off.log")) as off,
          pacer_server([*args.server_args.split(), "--speculation", "ngram"], out.with_suffix(".ngram.log")) as on):
        servers = {"off": off.url, "ngram": on.url}
        for url in servers.values():  # warm-up
            asyncio.run(one_run(url, QUESTIONS[:2], 1, 16))
        for i in range(args.repeats):
            for workload, (prompts, clients) in workloads.items():
                for speculation, url in servers.items():
                    run = asyncio.run(one_run(url, prompts, clients, args.max_tokens))
                    runs.append({"workload": workload, "speculation": speculation, "repeat": i} | run)
                    print(json.dumps(runs[-1]), file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print(f"greedy chat completions of up to {args.max_tokens} tokens; medians of {args.repeats} runs\n")
    print("| workload | TPOT p50 off (ms) | TPOT p50 ngram (ms) | ngram / off | output tok/s off | output tok/s ngram "
          "| drafts accepted |")
    print("|---|---|---|---|---|---|---|")
    def median(workload: str, speculation: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["workload"] == workload
                                 and r["speculation"] == speculation and r[key] is not None)

    for workload in workloads:
        off_tpot, on_tpot = median(workload, "off", "tpot_p50_ms"), median(workload, "ngram", "tpot_p50_ms")
        accepted = [r["acceptance"] for r in runs if r["workload"] == workload and r["acceptance"] is not None]
        print(f"| {workload} | {off_tpot:.1f} | {on_tpot:.1f} | {on_tpot / off_tpot:.2f}x "
              f"| {median(workload, 'off', 'output_tok_s'):.1f} | {median(workload, 'ngram', 'output_tok_s'):.1f} "
              f"| {f'{statistics.median(accepted):.0%}' if accepted else '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
