"""`pacer serve --engine-process`: the same API with the engine in a process of its own. Admission in the front
end reads the engine's snapshots and latency model; the metrics come from the engine's updates; SIGTERM drains."""

from __future__ import annotations

import json
import signal

import httpx
import pytest

from pacer.config import ClusterConfig, EngineConfig, ServerConfig
from pacer.server.launch import serve
from tests.live_server import run_server
from tests.server.test_errors import check_error

COMPLETIONS = "/v1/completions"


def test_serving_from_an_engine_process(tiny_model_dir, tiny_profile, tmp_path):
    with run_server(tiny_model_dir, "--engine-process", "--scheduler", "slo", "--latency-profile", str(tiny_profile),
                    "--threads", "1", "--num-blocks", "64", "--slo-tbt-ms", "60000", log_dir=tmp_path) as server:
        body = {"prompt": "hi", "max_tokens": 5, "ignore_eos": True, "ttft_slo_ms": 60000}
        report = httpx.post(server.url + COMPLETIONS, json=body).json()
        assert report["usage"]["completion_tokens"] == 5 and report["pacer"]["slo_met"] is True

        text = httpx.post(server.url + COMPLETIONS, json={**body, "stream": True}).text
        chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"

        refused = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "ttft_slo_ms": 0.001})
        check_error(refused, 429, code="slo_unattainable")
        assert int(refused.headers["retry-after"]) >= 1
        check_error(httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": -1}), 400)

        samples = server.metrics()
        assert samples["pacer:iteration_time_seconds_count"] >= 10  # sent over from the engine process
        assert samples['pacer:request_success_total{finished_reason="length"}'] == 2
        assert samples["pacer:kv_cache_usage_perc"] == 0
        assert httpx.get(server.url + "/health").status_code == 200

        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0


def test_engine_process_is_refused_with_ray_replicas():
    with pytest.raises(ValueError, match="--engine-process applies to one local engine"):
        serve(EngineConfig(), ServerConfig(engine_process=True), ClusterConfig(replicas=2))
