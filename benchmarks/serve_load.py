#!/usr/bin/env python3
"""Serving benchmark: concurrent streaming /v1/completions against `pacer serve` (and vLLM's CPU server).

Workload (fixed by the issue): 8 concurrent clients, each sending 3 streaming /v1/completions
requests back to back (24 requests). Every prompt is a distinct list of exactly 128 token ids
(random ids >= 100, SmolLM2's special tokens lie below, drawn from a seed with
`peers/common.make_prompts`, so both servers get the very same ids); 128 output tokens forced with
`max_tokens: 128, ignore_eos: true`; greedy (`temperature: 0`);
`stream_options: {"include_usage": true}`.

Measured per request, on the client (time.perf_counter):
  TTFT   send -> first SSE chunk carrying non-empty text
  E2E    send -> `data: [DONE]`
  output tokens: `usage.completion_tokens` of the last chunk (content chunks are counted too)
  TPOT   (E2E - TTFT) / (output tokens - 1)
Reported per run: output tok/s = all output tokens / (last completion - first send), TTFT p50
and p90, E2E p50, mean TPOT; each figure is the median over `--repeats` runs.

Each server is started here as a subprocess on a free port, waited for (/health 200), warmed up
with 2 requests on other prompts, measured, then stopped (SIGTERM to its process group, SIGKILL
after a grace period) before the next one starts: servers never run together.

  pacer: .venv/bin/pacer serve --dtype DTYPE --threads 2 --kv-cache-memory 2GiB --max-num-seqs 8
  vLLM:  /work/peers/vllm/bin/python -m vllm.entrypoints.openai.api_server --model /work/peers/smollm2-hf
         --dtype bfloat16 --max-model-len 4096 --max-num-seqs 8 --no-enable-prefix-caching --seed 0
         with VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_NUM_OF_RESERVED_CPU=0
         (as benchmarks/peers/vllm_offline.py; a variable already set in the environment wins).
vLLM's CPU server runs bf16 by default (`--vllm-dtype`), as the issue's comparison table did;
pacer runs `--dtype` (default float32, its choice on a CPU without native bf16).

Unless `--no-offline`, pacer's offline throughput on the same batch shape is measured in the same
invocation, interleaved with the served runs (before each one, in a subprocess of its own while
the server idles): the same 24 prompts given to `LLM(max_num_seqs=8).generate` (so at most 8 run
at once), SamplingParams(max_tokens=128, ignore_eos=True, temperature=0). The report states the
HTTP/SSE overhead as 1 - the median over pairs of served tok/s / offline tok/s: this machine's
speed drifts by 20 % over minutes, so only side-by-side ratios mean anything.

Full run (takes ~15 min on 2 cores, most of it vLLM's start-up):

    .venv/bin/python benchmarks/serve_load.py --servers pacer,vllm
    .venv/bin/python benchmarks/serve_load.py --servers pacer,vllm --dtype bfloat16   # pacer in bf16 too

Quick check of the plumbing (pacer only, seconds):

    .venv/bin/python benchmarks/serve_load.py --clients 2 --requests-per-client 1 --output-tokens 8 \
        --repeats 1 --no-offline

Prints a Markdown table on stdout (progress goes to stderr); writes every request's timings to
benchmarks/out/serve_load.json (`--out`) and each server's log beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from common import make_prompts  # stdlib only; the same prompt ids as the offline benchmarks

PROMPT_SEED, WARMUP_SEED = 0, 1
HEALTH_POLL_S = 1.0
STOP_GRACE_S = 30.0


def log(message: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---- workload -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    clients: int = 8
    requests_per_client: int = 3
    prompt_tokens: int = 128
    output_tokens: int = 128
    warmup_requests: int = 2

    @property
    def num_requests(self) -> int:
        return self.clients * self.requests_per_client

    def prompts(self) -> list[list[int]]:
        """All measured prompts, distinct; client c sends prompts[c * requests_per_client + i]."""
        prompts = make_prompts(self.num_requests, self.prompt_tokens, seed=PROMPT_SEED)
        assert len({tuple(p) for p in prompts}) == len(prompts), "prompts must be distinct"
        return prompts

    def warmup_prompts(self) -> list[list[int]]:
        return make_prompts(self.warmup_requests, self.prompt_tokens, seed=WARMUP_SEED)


@dataclass
class RequestResult:
    """One request's timings, in seconds from the run's start (client clock)."""

    client: int
    index: int
    send_s: float
    first_text_s: float | None = None
    done_s: float | None = None
    output_tokens: int | None = None  # usage.completion_tokens
    content_chunks: int = 0
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_text_s is None else self.first_text_s - self.send_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.done_s is None else self.done_s - self.send_s

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def to_json(self) -> dict:
        return {**asdict(self), "ttft_s": self.ttft_s, "e2e_s": self.e2e_s, "tpot_s": self.tpot_s}


# ---- client -------------------------------------------------------------------------------------


def completion_body(model: str, prompt: list[int], output_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": output_tokens, "ignore_eos": True, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}


async def stream_one(http, model: str, prompt: list[int], output_tokens: int, result: RequestResult,
                     t0: float) -> None:
    """Send one streaming completion and fill `result` in from its SSE events."""
    async with http.post("/v1/completions", json=completion_body(model, prompt, output_tokens)) as response:
        if response.status != 200:
            body = await response.text(errors="replace")
            raise RuntimeError(f"HTTP {response.status}: {body[:500]}")
        async for raw in response.content:  # one line at a time
            line = raw.decode().rstrip("\r\n")
            if not line.startswith("data:"):
                continue
            data = line[len("data:"):].strip()
            if data == "[DONE]":
                result.done_s = time.perf_counter() - t0
                return
            event = json.loads(data)
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if any(choice.get("text") for choice in event.get("choices") or []):
                result.content_chunks += 1
                if result.first_text_s is None:
                    result.first_text_s = time.perf_counter() - t0
            if event.get("usage"):
                result.output_tokens = event["usage"]["completion_tokens"]
    raise RuntimeError("the stream ended without data: [DONE]")


async def run_client(http, model: str, client: int, prompts: list[list[int]], output_tokens: int,
                     t0: float, request_timeout_s: float) -> list[RequestResult]:
    """One client: its requests back to back; a failed request is recorded and the client goes on."""
    results = []
    for index, prompt in enumerate(prompts):
        result = RequestResult(client, index, send_s=time.perf_counter() - t0)
        try:
            await asyncio.wait_for(stream_one(http, model, prompt, output_tokens, result, t0), request_timeout_s)
            if result.output_tokens != output_tokens:
                result.error = f"expected {output_tokens} output tokens, usage says {result.output_tokens}"
            elif result.first_text_s is None:
                result.error = "no chunk carried text"
        except Exception as error:  # noqa: BLE001  (recorded, reported, and the exit code says so)
            result.error = f"{type(error).__name__}: {error}"
        results.append(result)
    return results


async def run_load(base_url: str, model: str, prompts: list[list[int]], clients: int, output_tokens: int,
                   request_timeout_s: float) -> list[RequestResult]:
    """`clients` concurrent clients; client c sends its share of `prompts` one after the other."""
    import aiohttp

    per_client = len(prompts) // clients
    timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=10.0)
    # trust_env=False (aiohttp's default): a proxy from the environment must not sit between the client and localhost.
    async with aiohttp.ClientSession(base_url=base_url, timeout=timeout, connector=aiohttp.TCPConnector(limit=clients),
                                     trust_env=False) as http:
        t0 = time.perf_counter()
        shares = [prompts[c * per_client:(c + 1) * per_client] for c in range(clients)]
        runs = [run_client(http, model, c, share, output_tokens, t0, request_timeout_s)
                for c, share in enumerate(shares)]
        return [r for client_results in await asyncio.gather(*runs) for r in client_results]


# ---- figures ------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(results: list[RequestResult]) -> dict:
    """The reported figures of one run (successful requests only; `errors` counts the others)."""
    ok = [r for r in results if r.error is None]
    if not ok:
        return {"requests": len(results), "errors": len(results)}
    wall_s = max(r.done_s for r in ok) - min(r.send_s for r in results)
    output_tokens = sum(r.output_tokens for r in ok)
    ttfts, tpots = [r.ttft_s for r in ok], [r.tpot_s for r in ok if r.tpot_s is not None]
    return {"requests": len(results), "errors": len(results) - len(ok), "wall_s": wall_s,
            "output_tokens": output_tokens, "output_tok_s": output_tokens / wall_s,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
            "e2e_p50_s": percentile([r.e2e_s for r in ok], 50),
            "tpot_mean_s": statistics.fmean(tpots) if tpots else None}


def median_of(summaries: list[dict]) -> dict:
    """Each figure's median over the runs (errors: the total)."""
    keys = [k for k in summaries[0] if k not in ("requests", "errors")]
    medians = {k: statistics.median(s[k] for s in summaries if s.get(k) is not None)
               for k in keys if any(s.get(k) is not None for s in summaries)}
    return {**medians, "errors": sum(s["errors"] for s in summaries)}


# ---- servers ------------------------------------------------------------------------------------


@dataclass
class ServerSpec:
    name: str
    dtype: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 300.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pacer_spec(args: argparse.Namespace, port: int) -> ServerSpec:
    pacer = Path(sys.executable).parent / "pacer"
    launcher = [str(pacer)] if pacer.exists() else [sys.executable, "-m", "pacer.cli"]
    command = [*launcher, "serve", "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
               "--threads", str(args.threads), "--kv-cache-memory", args.kv_cache_memory,
               "--max-num-seqs", str(args.max_num_seqs), "--no-prefix-caching", *shlex.split(args.pacer_args)]
    return ServerSpec("pacer", args.dtype, command, startup_timeout_s=args.startup_timeout)


def vllm_spec(args: argparse.Namespace, port: int) -> ServerSpec:
    env = {"VLLM_TARGET_DEVICE": "cpu", "VLLM_CPU_KVCACHE_SPACE": str(args.vllm_kv_cache_gib),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{args.threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}
    env = {k: os.environ.get(k, v) for k, v in env.items()}  # the caller's settings win, as in vllm_offline.py
    command = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.hf_model,
               "--host", "127.0.0.1", "--port", str(port), "--dtype", args.vllm_dtype, "--seed", "0",
               "--max-model-len", "4096", "--max-num-seqs", str(args.max_num_seqs), "--no-enable-prefix-caching",
               "--disable-uvicorn-access-log", *shlex.split(args.vllm_args)]
    return ServerSpec("vllm", args.vllm_dtype, command, env, startup_timeout_s=max(args.startup_timeout, 900.0))


def start_server(spec: ServerSpec, log_path: Path) -> subprocess.Popen:
    """Its own process group, so that stopping it also stops its children (vLLM's engine core)."""
    log(f"starting {spec.name}: {' '.join(f'{k}={v}' for k, v in spec.env.items())} {shlex.join(spec.command)}")
    log(f"{spec.name} log: {log_path}")
    with open(log_path, "wb") as log_file:
        return subprocess.Popen(spec.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **spec.env}, start_new_session=True)


def stop_server(process: subprocess.Popen, name: str) -> None:
    """SIGTERM to the group, SIGKILL after STOP_GRACE_S; always returns with the process reaped."""
    if process.poll() is None:
        log(f"stopping {name} (pid {process.pid})")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log(f"{name} did not exit in {STOP_GRACE_S:.0f} s: SIGKILL")
    with contextlib.suppress(ProcessLookupError):  # children left behind, if any
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def wait_ready(base_url: str, process: subprocess.Popen, timeout_s: float, log_path: Path) -> str:
    """Poll /health until 200; returns the served model name (from /v1/models)."""
    from pacer.bench.servers import http_get  # no proxy from the environment

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with code {process.returncode} before it was ready; "
                               f"its log ends:\n{tail(log_path)}")
        with contextlib.suppress(OSError):
            if http_get(base_url + "/health", timeout_s=5.0)[0] == 200:
                return json.loads(http_get(base_url + "/v1/models", timeout_s=5.0)[1])["data"][0]["id"]
        time.sleep(HEALTH_POLL_S)
    raise TimeoutError(f"the server was not ready after {timeout_s:.0f} s; its log ends:\n{tail(log_path)}")


def tail(path: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def bench_server(spec: ServerSpec, workload: Workload, args: argparse.Namespace, port: int,
                 offline: list[dict] | None = None) -> dict:
    """Start the server, warm it up, run the workload `repeats` times, stop it.

    With `offline` (a list), each served run is preceded by one offline run, appended to it, so
    that every served figure has an offline twin measured a minute apart on this noisy machine.
    """
    log_path = Path(args.out).with_name(f"serve_load_{spec.name}_{spec.dtype}.log")
    process = start_server(spec, log_path)
    try:
        start = time.monotonic()
        base_url = f"http://127.0.0.1:{port}"
        model = wait_ready(base_url, process, spec.startup_timeout_s, log_path)
        startup_s = time.monotonic() - start
        log(f"{spec.name} ready in {startup_s:.1f} s, serving {model!r}")
        load = {"base_url": base_url, "model": model, "output_tokens": workload.output_tokens,
                "request_timeout_s": args.request_timeout}
        warmup = asyncio.run(run_load(prompts=workload.warmup_prompts(), clients=workload.warmup_requests, **load))
        if any(r.error for r in warmup):
            raise RuntimeError(f"warm-up failed: {[r.error for r in warmup if r.error]}")
        runs = []
        for repeat in range(args.repeats):
            if offline is not None:
                offline.append(bench_offline(workload, args, repeats=1))
            results = asyncio.run(run_load(prompts=workload.prompts(), clients=workload.clients, **load))
            summary = summarize(results)
            log(f"{spec.name} run {repeat + 1}/{args.repeats}: {json.dumps(summary)}")
            runs.append({"summary": summary, "requests": [r.to_json() for r in results]})
        return {"server": spec.name, "dtype": spec.dtype, "command": spec.command, "env": spec.env,
                "startup_s": startup_s, "model": model, "runs": runs,
                "median": median_of([run["summary"] for run in runs])}
    finally:
        stop_server(process, spec.name)


# ---- offline (pacer's LLM.generate, same prompts and batch shape) --------------------------------


def bench_offline(workload: Workload, args: argparse.Namespace, repeats: int) -> dict:
    """Run `offline_worker` in a fresh subprocess (the server, if up, is idle) and return its results."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec = {"dtype": args.dtype, "threads": args.threads, "kv_cache_memory": args.kv_cache_memory,
                "max_num_seqs": args.max_num_seqs, "output_tokens": workload.output_tokens, "repeats": repeats,
                "prompts": workload.prompts(), "warmup_prompts": workload.warmup_prompts(), "out": str(out_path)}
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, str(Path(__file__).resolve()), "--offline-worker", str(spec_path)]
        log(f"pacer offline: {shlex.join(command)}")
        subprocess.run(command, check=True, stdout=sys.stderr, timeout=args.offline_timeout)
        return json.loads(out_path.read_text())


def offline_worker(spec_path: str) -> None:
    """In the subprocess: load pacer, warm up, time `generate` of all prompts `repeats` times."""
    from pacer import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    start = time.perf_counter()
    llm = LLM(dtype=spec["dtype"], threads=spec["threads"], kv_cache_memory=spec["kv_cache_memory"],
              max_num_seqs=spec["max_num_seqs"], prefix_caching=False)  # as vLLM here: no cache across repeats
    load_s = time.perf_counter() - start
    params = SamplingParams(max_tokens=spec["output_tokens"], ignore_eos=True, temperature=0)
    llm.generate(spec["warmup_prompts"], params, use_tqdm=False)
    times = []
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
        counts = {len(o.token_ids) for o in outputs}
        assert counts == {spec["output_tokens"]}, f"expected {spec['output_tokens']} tokens each, got {counts}"
    elapsed = statistics.median(times)
    result = {"engine": "pacer offline", "dtype": spec["dtype"], "max_num_seqs": spec["max_num_seqs"],
              "requests": len(spec["prompts"]), "load_s": load_s, "elapsed_all_s": times, "elapsed_s": elapsed,
              "output_tok_s": len(spec["prompts"]) * spec["output_tokens"] / elapsed}
    print(json.dumps(result), flush=True)
    Path(spec["out"]).write_text(json.dumps(result))


# ---- report -------------------------------------------------------------------------------------


def table(servers: list[dict], offline: dict | None, workload: Workload) -> str:
    def ms(seconds: float | None) -> str:
        return "" if seconds is None else f"{seconds * 1e3:.0f}"

    heading = (f"{workload.clients} clients x {workload.requests_per_client} streaming requests, "
               f"{workload.prompt_tokens} prompt + {workload.output_tokens} output tokens; medians of "
               f"{len(servers[0]['runs']) if servers else 0} runs")
    lines = [heading, "",
             "| server | dtype | output tok/s | TTFT p50 (ms) | TTFT p90 (ms) | E2E p50 (s) | TPOT mean (ms) |",
             "|---|---|---|---|---|---|---|"]
    for s in servers:
        m = s["median"]
        errors = f" ({m['errors']} failed requests)" if m["errors"] else ""
        if "output_tok_s" not in m:
            lines.append(f"| {s['server']}{errors} | {s['dtype']} | | | | | |")
            continue
        lines.append(f"| {s['server']}{errors} | {s['dtype']} | {m['output_tok_s']:.1f} | {ms(m['ttft_p50_s'])} | "
                     f"{ms(m['ttft_p90_s'])} | {m['e2e_p50_s']:.2f} | {ms(m.get('tpot_mean_s'))} |")
    if offline:
        first = offline["runs"][0]
        lines.append(f"| pacer offline (LLM.generate, max_num_seqs={first['max_num_seqs']}) | {first['dtype']} | "
                     f"{offline['output_tok_s']:.1f} | | | | |")
        served = next((s for s in servers if s["server"] == "pacer" and "output_tok_s" in s["median"]), None)
        if served and len(offline["runs"]) == len(served["runs"]):
            # Each served run against the offline run just before it; the median of those ratios.
            ratios = [run["summary"]["output_tok_s"] / off["output_tok_s"]
                      for run, off in zip(served["runs"], offline["runs"])]
            lines += ["", (f"HTTP/SSE overhead (pacer, {first['dtype']}): 1 - median of served/offline over "
                           f"{len(ratios)} interleaved pairs ({', '.join(f'{r:.2f}' for r in ratios)}) = "
                           f"{1 - statistics.median(ratios):.1%}")]
    return "\n".join(lines)


# ---- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--servers", default="pacer", help="comma-separated, run one after the other: pacer,vllm")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="pacer's dtype")
    ap.add_argument("--vllm-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="vLLM's dtype (bf16, as in the issue's table)")
    ap.add_argument("--threads", type=int, default=2, help="pacer --threads; vLLM binds OMP threads 0..N-1")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of the workload; medians are reported")
    ap.add_argument("--offline", action=argparse.BooleanOptionalAction, default=True,
                    help="also time pacer's LLM.generate on the same prompts (for the HTTP/SSE overhead)")
    w = ap.add_argument_group("workload (defaults: the issue's)")
    w.add_argument("--clients", type=int, default=Workload.clients)
    w.add_argument("--requests-per-client", type=int, default=Workload.requests_per_client)
    w.add_argument("--prompt-tokens", type=int, default=Workload.prompt_tokens)
    w.add_argument("--output-tokens", type=int, default=Workload.output_tokens)
    w.add_argument("--warmup-requests", type=int, default=Workload.warmup_requests)
    w.add_argument("--max-num-seqs", type=int, default=None,
                   help="batch cap for both servers and offline (default: --clients)")
    e = ap.add_argument_group("engines")
    e.add_argument("--kv-cache-memory", default="2GiB", help="pacer's KV cache (server and offline)")
    e.add_argument("--pacer-args", default="",
                   help='more `pacer serve` flags, one shell-quoted string: --pacer-args="--scheduler fcfs"')
    e.add_argument("--vllm-python", default="/work/peers/vllm/bin/python")
    e.add_argument("--hf-model", default="/work/peers/smollm2-hf", help="the safetensors export vLLM serves")
    e.add_argument("--vllm-kv-cache-gib", type=int, default=2)
    e.add_argument("--vllm-args", default="", help='more vLLM server flags, one shell-quoted string: --vllm-args="..."')
    t = ap.add_argument_group("limits (the script always ends)")
    t.add_argument("--startup-timeout", type=float, default=300.0, help="s to wait for /health (vLLM: >= 900)")
    t.add_argument("--request-timeout", type=float, default=600.0, help="s per request")
    t.add_argument("--offline-timeout", type=float, default=1800.0, help="s for the offline subprocess")
    ap.add_argument("--out", default=str(HERE / "out" / "serve_load.json"))
    ap.add_argument("--offline-worker", metavar="SPEC_JSON", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.max_num_seqs = args.max_num_seqs or args.clients
    unknown = set(args.servers.split(",")) - {"pacer", "vllm"}
    if unknown:
        ap.error(f"unknown server(s): {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_args()
    if args.offline_worker:
        offline_worker(args.offline_worker)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops a running server
    workload = Workload(args.clients, args.requests_per_client, args.prompt_tokens, args.output_tokens,
                        args.warmup_requests)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv, "workload": asdict(workload),
                    "servers": [], "offline": None}
    specs = {"pacer": pacer_spec, "vllm": vllm_spec}
    try:
        offline_runs: list[dict] = []
        for name in args.servers.split(","):
            port = free_port()
            interleave = offline_runs if args.offline and name == "pacer" else None
            report["servers"].append(bench_server(specs[name](args, port), workload, args, port, interleave))
        if args.offline and not offline_runs:  # no pacer server: offline runs on its own
            offline_runs.append(bench_offline(workload, args, repeats=args.repeats))
        if offline_runs:
            report["offline"] = {"runs": offline_runs, "output_tok_s": statistics.median(
                r["output_tok_s"] for r in offline_runs)}
    finally:
        Path(args.out).write_text(json.dumps(report, indent=1))
        log(f"wrote {args.out}")
    print(table(report["servers"], report["offline"], workload))
    failed = sum(s["median"]["errors"] for s in report["servers"])
    if failed:
        log(f"{failed} request(s) failed: see 'error' in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
