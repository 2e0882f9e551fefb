"""A client that holds its stream open and reads nothing is cut off after --stream-timeout-s; its KV is freed.

A real `pacer serve` and a raw socket: the stall has to happen in uvicorn's `send`, against a real TCP window.
"""

from __future__ import annotations

import json
import shutil
import socket
import time

import httpx
import pytest

from pacer.config import ServerConfig
from tests.live_server import Server, run_server

TIMEOUT_S = 1.0
MAX_TOKENS = 3000  # at the tiny model's few hundred tokens a second, ~10 s: it must be cut off long before


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a 4k context (RoPE is computed, not stored), so a stream can outlast the timeout."""
    path = tmp_path_factory.mktemp("tiny-4k") / "model"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 4096}))
    return path


@pytest.fixture(scope="module")
def server(long_model_dir, tmp_path_factory):
    with run_server(long_model_dir, "--stream-timeout-s", str(TIMEOUT_S), "--threads", "1", "--num-blocks", "600",
                    "--max-num-batched-tokens", "64", log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


def open_stream_and_never_read(server: Server) -> socket.socket:
    """POST a long streamed completion (5 logprobs a token: ~1 KB a chunk) from a socket that reads nothing."""
    body = json.dumps({"prompt": "hello", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
                       "logprobs": 5}).encode()
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: the window it advertises
    client.connect((httpx.URL(server.url).host, httpx.URL(server.url).port))
    client.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: pacer\r\nContent-Type: application/json\r\n"
                   b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    return client


def wait_for(server: Server, name: str, value: float, timeout_s: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while (samples := server.metrics()).get(name) != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return samples


def test_a_client_that_reads_nothing_is_cut_off_and_its_kv_freed_while_others_are_served(server):
    start = time.monotonic()
    stalled = open_stream_and_never_read(server)
    try:
        samples = wait_for(server, "pacer:num_requests_running", 1, timeout_s=30)
        assert samples["pacer:num_requests_running"] == 1
        # served while the other one fills its buffers and stalls
        with httpx.stream("POST", server.url + "/v1/completions", timeout=30,
                          json={"prompt": "hi", "max_tokens": 16, "ignore_eos": True, "stream": True}) as response:
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200 and events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"

        samples = wait_for(server, "pacer:request_stream_timeout_total", 1, timeout_s=30)
        elapsed_s = time.monotonic() - start
        assert samples["pacer:request_stream_timeout_total"] == 1
        # filling ~130 KiB of buffers, then the timeout; far less than the whole generation
        assert TIMEOUT_S <= elapsed_s < TIMEOUT_S + 15
        assert samples["pacer:generation_tokens_total"] < MAX_TOKENS
        samples = wait_for(server, "pacer:kv_cache_usage_perc", 0, timeout_s=5)
        assert samples["pacer:kv_cache_usage_perc"] == 0 and samples["pacer:num_requests_running"] == 0
        assert samples['pacer:request_success_total{finished_reason="abort"}'] == 1
        assert samples['pacer:request_success_total{finished_reason="length"}'] == 1

        after = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4}, timeout=30)
        assert after.status_code == 200
    finally:
        stalled.close()
    assert "the client read nothing for 1.0 s" in server.log.read_text()


def test_stream_timeout_must_not_be_negative():
    with pytest.raises(ValueError, match="stream_timeout_s"):
        ServerConfig(stream_timeout_s=-1)
    with pytest.raises(ValueError, match="stream_timeout_s"):
        ServerConfig(stream_timeout_s=float("nan"))
