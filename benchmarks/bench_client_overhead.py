#!/usr/bin/env python3
"""How fast and how exact is `pacer bench`'s client? Measured against a trivial server that answers at once.

The server (a subprocess: plain asyncio, no framework) streams `--chunks` SSE chunks per request as fast
as it can and logs `time.perf_counter()` when it writes each one; on Linux that clock is
CLOCK_MONOTONIC, shared by both processes. The client is pacer's own `LoadClient`, sending a Poisson
workload at `--rate`. Reported: the rate it sustained (completed requests / duration) and the error
of its token timestamps (client receive time - server write time), p50 / p99 / max.

    .venv/bin/python benchmarks/bench_client_overhead.py --rate 500 --num-requests 5000 --chunks 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pacer.bench.client import ClientConfig, LoadClient, run_loop
from pacer.bench.servers import free_port
from pacer.bench.workload import BenchRequest


async def serve(port: int, chunks: int, log_path: Path) -> None:
    """Answer every POST with `chunks` one-token SSE chunks, usage and [DONE]; log each write's time."""
    sent: dict[str, list[float]] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length"))
                body = json.loads(await reader.readexactly(length)) if length else {}
                if not head.startswith(b"POST"):
                    payload = b'{"data": [{"id": "trivial"}]}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
                    continue
                times = sent.setdefault(body["prompt"], [])
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(chunks):
                    event = b'data: {"choices": [{"index": 0, "text": "x", "finish_reason": null}]}\n\n'
                    writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                    await writer.drain()
                    times.append(time.perf_counter())
                tail = (b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": %d}}\n\n'
                        b"data: [DONE]\n\n" % chunks)
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
    try:
        async with server:
            await server.serve_forever()
    finally:
        log_path.write_text(json.dumps(sent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--num-requests", type=int, default=5000)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--serve", nargs=3, metavar=("PORT", "CHUNKS", "LOG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        try:
            asyncio.run(serve(int(args.serve[0]), int(args.serve[1]), Path(args.serve[2])))
        except KeyboardInterrupt:
            pass
        return 0
    port, log = free_port(), Path(tempfile.mkdtemp()) / "sent.json"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(args.chunks), str(log)])
    time.sleep(1.5)
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / args.rate, args.num_requests))
    requests = [BenchRequest(i, float(t), f"request {i}", 2, args.chunks) for i, t in enumerate(arrivals)]
    client = LoadClient(ClientConfig(base_url=f"http://127.0.0.1:{port}", model="trivial"))
    start, cpu_start = time.perf_counter(), time.process_time()
    records = run_loop(client.run(requests))
    duration, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    server.send_signal(2)
    server.wait(30)
    sent = json.loads(log.read_text())
    errors_ms = [(client.t0 + got - put) * 1e3 for record, request in zip(records, requests)
                 for got, put in zip(record.token_times_s, sent.get(request.prompt, []))]
    ok = sum(r.status == "ok" for r in records)
    late = [max(0.0, (r.sent_s or 0) - (r.scheduled_s or 0)) * 1e3 for r in records]
    print(f"offered {args.rate:g} req/s x {args.chunks} chunks; completed {ok}/{len(records)} in {duration:.2f} s "
          f"= {ok / duration:.0f} req/s; send lateness p50 {statistics.median(late):.2f} ms, "
          f"p99 {np.percentile(late, 99):.2f} ms; client CPU {cpu / duration:.0%} of a core")
    print(f"token timestamp error (client receive - server write): p50 {np.percentile(errors_ms, 50):.3f} ms, "
          f"p99 {np.percentile(errors_ms, 99):.3f} ms, max {max(errors_ms):.3f} ms over {len(errors_ms)} tokens")
    failures = sorted({r.error_kind for r in records if r.status != "ok"})
    if failures:
        print(f"failures: {failures}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
