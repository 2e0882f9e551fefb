"""The instrument against an outside load generator: the same requests through guidellm and `pacer bench`.

One `pacer serve` (prefix caching off, so a repeat meets the same server) serves both tools in turn, closed loop. Both send the very same prompts (written
as a JSON-lines file for guidellm), with the same max_tokens and ignore_eos. Each tool's first wave (its first
`--concurrency` requests) is left out of both: on two cores guidellm starts its worker process while its first
requests are in flight, and that start is not the server's latency. Per request, TTFT = first token - request
start and TPOT = (last - first token) / (tokens - 1) (guidellm's `inter_token_latency_ms`; its own
`time_per_output_token_ms` folds the TTFT in). Attainment: TTFT <= --slo-ttft-ms and TPOT <= --slo-tpot-ms.

Two runs of one server differ by more than 5 % on this machine, whoever sends them, so each tool is also held
against the server's own clock on the very same requests: its mean TTFT over the whole run (first wave included)
minus the mean the server's `pacer:time_to_first_token_seconds` histogram recorded meanwhile, and likewise for
the decode time (first to last token). That offset is the instrument's own error. The CPU seconds each client
spent are reported too: on two cores they are taken from the server.

    python benchmarks/guidellm_check.py --guidellm /work/peers/guidellm/bin/guidellm \
        --hf-tokenizer /work/peers/smollm2-hf --out benchmarks/results/DATE/guidellm_check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import time
from pathlib import Path

from pacer.bench.client import ClientConfig
from pacer.bench.metrics import SLOTargets, request_metrics
from pacer.bench.run import metric_totals, run_workload
from pacer.bench.servers import pacer_server
from pacer.bench.workload import BenchRequest, WorkloadConfig, build_workload
from pacer.model.weights import load_tokenizer, resolve_model_path

Latencies = list[tuple[float, float, float]]  # (TTFT s, TPOT s, decode s = last - first token) per request
SERVER_HISTOGRAMS = {"ttft": "pacer:time_to_first_token_seconds", "decode": "pacer:request_decode_time_seconds"}


def server_totals(url: str) -> dict[str, float]:
    """The sums and counts of the server's TTFT and decode-time histograms."""
    totals = metric_totals(url)
    if totals is None:
        raise RuntimeError(f"{url}/metrics: no metrics")
    return {f"{key}_{part}": totals.get(f"{name}_{part}", 0.0)
            for key, name in SERVER_HISTOGRAMS.items() for part in ("sum", "count")}


def client_cpu_s() -> float:
    """CPU seconds of this process and its finished children (guidellm runs as one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def write_jsonl(requests: list[BenchRequest], path: Path) -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": r.prompt, "prompt_tokens_count": r.num_prompt_tokens,
                                "output_tokens_count": r.max_tokens}) + "\n" for r in requests)


def run_guidellm(binary: str, url: str, data: Path, hf_tokenizer: str, n: int, concurrency: int,
                 out: Path) -> Latencies:
    command = [binary, "run", "--backend", f"kind=openai_http,target={url},request_format=/v1/completions",
               "--profile", f"kind=concurrent,streams={concurrency}",
               "--constraint", f"kind=max_requests,count={n}", "--data", f"kind=json_file,path={data}",
               "--tokenizer", f"kind=huggingface_auto,model={hf_tokenizer}",
               "--output", f"kind=json,path={out}", "--disable-console-interactive"]
    env = os.environ | {"GUIDELLM__MAX_WORKER_PROCESSES": "1", "HF_HUB_OFFLINE": "1"}
    with open(out.with_suffix(".log"), "w") as log:
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    requests = json.loads(out.read_text())["benchmarks"][0]["requests"]
    if requests["errored"] or requests["incomplete"]:
        raise RuntimeError(f"guidellm: {len(requests['errored'])} errored, {len(requests['incomplete'])} incomplete")
    done = sorted(requests["successful"], key=lambda r: r["info"]["timings"]["request_start"])
    return [(r["time_to_first_token_ms"] / 1e3, r["inter_token_latency_ms"] / 1e3,
             r["info"]["timings"]["last_token_iteration"] - r["info"]["timings"]["first_token_iteration"])
            for r in done]


def run_pacer_bench(requests: list[BenchRequest], config: WorkloadConfig, url: str, tokenizer) -> Latencies:
    run = run_workload(requests, config, ClientConfig(base_url=url, send_slo=False), SLOTargets(), tokenizer)
    if any(r.status != "ok" for r in run.records):
        raise RuntimeError("pacer bench: a request failed")
    metrics = [request_metrics(r) for r in sorted(run.records, key=lambda r: r.sent_s)]
    return [(m.ttft_s, m.tpot_s, m.e2e_s - m.ttft_s) for m in metrics]


def measured(run, url: str, skip: int, ttft_s: float, tpot_s: float) -> dict[str, float]:
    """Run one tool; its medians past the first wave, and its offsets from the server's own means."""
    before, cpu = server_totals(url), client_cpu_s()
    latencies = run()
    cpu, after = client_cpu_s() - cpu, server_totals(url)
    server = {key: (after[f"{key}_sum"] - before[f"{key}_sum"]) / (after[f"{key}_count"] - before[f"{key}_count"])
              for key in SERVER_HISTOGRAMS}
    steady = latencies[skip:]
    return {"ttft_p50_ms": 1e3 * statistics.median(t for t, _, _ in steady),
            "tpot_p50_ms": 1e3 * statistics.median(p for _, p, _ in steady),
            "attainment": sum(t <= ttft_s and p <= tpot_s for t, p, _ in steady) / len(steady),
            "ttft_offset_ms": 1e3 * (statistics.mean(t for t, _, _ in latencies) - server["ttft"]),
            "decode_offset_ms": 1e3 * (statistics.mean(d for _, _, d in latencies) - server["decode"]),
            "client_cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--guidellm", required=True, help="the guidellm executable (its own venv)")
    parser.add_argument("--hf-tokenizer", required=True, help="a Hugging Face directory with the model's tokenizer")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=24, help="measured requests, after the first wave")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--slo-ttft-ms", type=float, default=3000)
    parser.add_argument("--slo-tpot-ms", type=float, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(resolve_model_path(None))
    config = WorkloadConfig(num_requests=args.num_requests + args.concurrency, arrival="concurrency",
                            concurrency=args.concurrency, prompt_tokens=args.prompt_tokens,
                            output_tokens=args.output_tokens, seed=1)
    requests = build_workload(config, tokenizer)
    data = args.out / "requests.jsonl"
    write_jsonl(requests, data)
    slo = (args.slo_ttft_ms / 1e3, args.slo_tpot_ms / 1e3)
    runs: dict[str, list[dict[str, float]]] = {"guidellm": [], "pacer bench": []}
    # The cache would serve a repeated prompt from its KV: each repeat would measure a different server.
    with pacer_server(["--no-prefix-caching"], args.out / "server.log") as server:
        for i in range(args.repeats):
            out = args.out / f"guidellm-{i + 1}.json"
            runs["guidellm"].append(measured(lambda out=out: run_guidellm(
                args.guidellm, server.url, data, args.hf_tokenizer, len(requests), args.concurrency, out),
                server.url, args.concurrency, *slo))
            runs["pacer bench"].append(measured(lambda: run_pacer_bench(
                requests, config, server.url, tokenizer), server.url, args.concurrency, *slo))
            print(i + 1, {tool: r[-1] for tool, r in runs.items()}, flush=True)
    medians = {tool: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for tool, rs in runs.items()}
    report = {"runs": runs, "medians": medians, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    g, p = medians["guidellm"], medians["pacer bench"]
    print("| | guidellm | pacer bench | difference |\n|---|---|---|---|")
    for key in ("ttft_p50_ms", "tpot_p50_ms", "attainment"):
        print(f"| {key} | {g[key]:.4g} | {p[key]:.4g} | {100 * (g[key] / p[key] - 1):+.1f} % |")
    for key in ("ttft_offset_ms", "decode_offset_ms", "client_cpu_s"):
        print(f"| {key} | {g[key]:.3g} | {p[key]:.3g} | |")


if __name__ == "__main__":
    main()
