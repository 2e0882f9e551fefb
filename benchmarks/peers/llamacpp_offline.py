#!/usr/bin/env python3
"""Offline throughput of llama.cpp's server on the same GGUF pacer serves; same flags and JSON as the runners beside
it (stdlib only). N requests go to the server at once, one slot each, so it batches them as it would when serving.

    .venv/bin/python benchmarks/peers/llamacpp_offline.py --cases 1x128x128 --repeats 3

The server is built as benchmarks/README.md says; `--dtype` is ignored (the weights are the file's blocks).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import parser, run_cases

PEERS = Path("/work/peers/llama.cpp")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--server", default=str(PEERS / "llama-server"))
    args = ap.parse_args()
    model = args.model or str(PEERS / "model.gguf")
    cases = [tuple(map(int, c.split("x"))) for c in args.cases.split(",")]
    slots = max(n for n, _, _ in cases)
    slot_tokens = max(p + o for _, p, o in cases) + 16
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [args.server, "-m", model, "-t", str(args.threads), "-tb", str(args.threads), "-np", str(slots),
           "-c", str(slots * slot_tokens), "--port", str(port), "--no-webui"]
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    try:
        while True:
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.perf_counter() - start > 120:
                    raise RuntimeError(f"llama-server did not start: {' '.join(cmd)}") from None
                time.sleep(0.5)
        load_s = time.perf_counter() - start

        def generate(prompts: list[list[int]], output_len: int) -> list[int]:
            body = {"n_predict": output_len, "temperature": 0, "ignore_eos": True, "cache_prompt": False}
            with ThreadPoolExecutor(len(prompts)) as pool:
                results = pool.map(lambda p: post(base + "/completion", body | {"prompt": p}), prompts)
                return [r["tokens_predicted"] for r in results]

        args.dtype = "gguf"
        run_cases(args, "llama.cpp", generate, {"load_s": load_s, "slots": slots})
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
