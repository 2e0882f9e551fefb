"""SIGTERM drains: new requests get 503, in-flight ones finish (or end with "abort" at the timeout), exit 0."""

from __future__ import annotations

import json
import signal
import threading

import httpx

from tests.live_server import run_server

BODY = {"prompt": "a long story", "max_tokens": 200, "stream": True, "ignore_eos": True}


def start_stream(url: str, results: list, first_token: threading.Event) -> threading.Thread:
    """Stream one completion in a thread; append its finish_reason (or the error) to `results`."""
    def run() -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=BODY, timeout=60) as response:
                reason = None
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        first_token.set()
                        reason = json.loads(line[6:])["choices"][0]["finish_reason"] or reason
                results.append(reason)
        except httpx.HTTPError as error:
            results.append(error)
            first_token.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_finishes_in_flight_requests_then_exits_0(tiny_model_dir, tmp_path):
    with run_server(tiny_model_dir, "--threads", "1", log_dir=tmp_path) as server:
        results: list = []
        started = [threading.Event() for _ in range(2)]
        threads = [start_stream(server.url, results, event) for event in started]
        for event in started:
            assert event.wait(30)
        server.process.send_signal(signal.SIGTERM)
        refused = httpx.post(server.url + "/v1/completions", json={"prompt": "late"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url + "/health").status_code == 503
        for thread in threads:
            thread.join(60)
        assert results == ["length", "length"]
        assert server.process.wait(30) == 0


def test_drain_timeout_aborts_what_is_left(tiny_model_dir, tmp_path):
    with run_server(tiny_model_dir, "--threads", "1", "--drain-timeout-s", "0", log_dir=tmp_path) as server:
        results: list = []
        started = threading.Event()
        thread = start_stream(server.url, results, started)
        assert started.wait(30)
        server.process.send_signal(signal.SIGTERM)
        thread.join(60)
        assert results == ["abort"]
        assert server.process.wait(30) == 0
