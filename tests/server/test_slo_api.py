"""SLOs through the API: fields, headers and defaults; 429 slo_unattainable with Retry-After; the `pacer`
report on responses; expiry with --drop-expired; the latency model's error on /metrics."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ThreadHost
from pacer.scheduling import ModelOutput, SchedulerOutput
from pacer.server.app import create_app
from tests.live_server import run_server
from tests.server.test_errors import check_error

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def slo_server(tiny_model_dir, tiny_profile, tmp_path_factory):
    with run_server(tiny_model_dir, "--scheduler", "slo", "--latency-profile", str(tiny_profile), "--threads", "1",
                    "--num-blocks", "64", "--slo-tbt-ms", "60000", log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


def test_responses_report_the_measured_latency_against_the_slo(slo_server):
    body = {"prompt": "hi", "max_tokens": 4, "ignore_eos": True, "ttft_slo_ms": 60000}
    report = httpx.post(slo_server.url + COMPLETIONS, json=body).json()["pacer"]
    assert report["slo_met"] is True and 0 < report["ttft_ms"] < 60000 and report["max_tbt_ms"] >= 0
    assert report["ttft_slo_ms"] == 60000 and report["tbt_slo_ms"] == 60000  # the server's default TBT SLO

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    text = httpx.post(slo_server.url + CHAT, json=chat, headers={"x-slo-ttft-ms": "30000"}).text
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert all(e["pacer"] is None for e in events[:-2])
    last_choice, usage = events[-2], events[-1]
    assert last_choice["choices"][0]["finish_reason"] == "length" and usage["usage"]["completion_tokens"] == 3
    assert last_choice["pacer"]["ttft_slo_ms"] == 30000 and usage["pacer"]["slo_met"] is True


def test_a_tpot_slo_is_taken_from_the_body_or_a_header_and_reported(slo_server):
    for request in ({"json": {"prompt": "hi", "max_tokens": 5, "ignore_eos": True, "tpot_slo_ms": 60000}},
                    {"json": {"prompt": "hi", "max_tokens": 5, "ignore_eos": True},
                     "headers": {"x-slo-tpot-ms": "60000"}}):
        report = httpx.post(slo_server.url + COMPLETIONS, **request).json()["pacer"]
        assert report["tpot_slo_ms"] == 60000 and report["slo_met"] is True
        assert 0 < report["tpot_ms"] <= report["max_tbt_ms"]  # the mean gap after the first token, the longest
    strict = httpx.post(slo_server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 5, "ignore_eos": True,
                                                            "tpot_slo_ms": 0.001}).json()["pacer"]
    assert strict["slo_met"] is False
    check_error(httpx.post(slo_server.url + COMPLETIONS, json={"prompt": "hi", "tpot_slo_ms": -1}), 400,
                param="tpot_slo_ms")


def test_an_unattainable_ttft_is_refused_at_once_with_retry_after(slo_server):
    for request in ({"json": {"prompt": "hi", "ttft_slo_ms": 0.001}},
                    {"json": {"prompt": "hi"}, "headers": {"x-slo-ttft-ms": "0.001"}}):
        start = time.perf_counter()
        response = httpx.post(slo_server.url + COMPLETIONS, **request)
        elapsed = time.perf_counter() - start
        error = check_error(response, 429, code="slo_unattainable")
        assert error["type"] == "rate_limit_error" and "TTFT SLO" in error["message"]
        assert int(response.headers["retry-after"]) >= 1
        assert elapsed < 5  # answered before any work, not after (the 50 ms target is a benchmark)
    samples = slo_server.metrics()
    assert samples['pacer:request_rejected_total{reason="slo_unattainable"}'] >= 2
    assert samples["pacer:kv_cache_usage_perc"] == 0


def test_without_admission_an_unattainable_ttft_is_served_and_reported_missed(tiny_model_dir, tiny_profile,
                                                                                   tmp_path):
    """--no-admission: the replay against which refusals are judged serves what admission would refuse."""
    with run_server(tiny_model_dir, "--scheduler", "slo", "--latency-profile", str(tiny_profile), "--threads", "1",
                    "--num-blocks", "64", "--no-admission", log_dir=tmp_path) as server:
        response = httpx.post(server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "ttft_slo_ms": 0.001})
        assert response.status_code == 200 and response.json()["pacer"]["slo_met"] is False


@pytest.mark.parametrize(("header", "value"), [("x-slo-tbt-ms", "fast"), ("x-slo-tpot-ms", "0"),
                                               ("x-slo-tpot-ms", "nan")])
def test_bad_slo_header_is_400(slo_server, header, value):
    response = httpx.post(slo_server.url + COMPLETIONS, json={"prompt": "hi"}, headers={header: value})
    check_error(response, 400, param=header, code="invalid_value")
    assert slo_server.metrics()["pacer:kv_cache_usage_perc"] == 0


def test_latency_model_error_is_on_metrics(slo_server):
    httpx.post(slo_server.url + COMPLETIONS, json={"prompt": "hello there", "max_tokens": 8, "ignore_eos": True})
    samples = slo_server.metrics()
    errors = [samples[f'pacer:latency_model_error{{quantile="{q}"}}'] for q in ("0.5", "0.9", "0.99")]
    assert 0 < errors[-1] and errors == sorted(errors)  # computed at the scrape, over the iterations so far


SLOW = 17  # a prompt starting with this token makes its iterations take 0.6 s


class SlowExecutor:
    def __init__(self, inner) -> None:
        self.inner = inner

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        if any(r.prompt_token_ids[0] == SLOW for r in plan.requests):
            time.sleep(0.6)
        return self.inner.execute(plan)


def test_drop_expired_fails_a_request_that_could_not_start_in_time(tiny_model_dir, tiny_profile):
    engine, tokenizer = build_engine(EngineConfig.from_kwargs(
        model=str(tiny_model_dir), num_blocks=64, scheduler="slo", drop_expired=True,
        latency_profile=str(tiny_profile)))
    engine.executor = SlowExecutor(engine.executor)
    frontend = Frontend([ThreadHost(lambda: engine)])
    frontend.start()
    app = create_app(frontend, tokenizer, "tiny", str(tiny_model_dir), "llama")

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pacer", timeout=30) as client:
                slow = asyncio.create_task(client.post(COMPLETIONS, json={"prompt": [SLOW, 5], "max_tokens": 2}))
                await asyncio.sleep(0.05)  # the engine is now inside a 0.6 s iteration
                # admitted (the queue is short), but their 300 ms pass before the engine can start them
                late, late_stream = await asyncio.gather(
                    client.post(COMPLETIONS, json={"prompt": [5, 6], "max_tokens": 2, "ttft_slo_ms": 300}),
                    client.post(COMPLETIONS, json={"prompt": [5, 7], "max_tokens": 2, "stream": True,
                                                   "ttft_slo_ms": 300}))
                return await slow, late, late_stream, await client.get("/metrics")

    slow, late, late_stream, metrics = asyncio.run(main())
    assert slow.status_code == 200
    check_error(late, 503, code="slo_expired")
    events = [line[6:] for line in late_stream.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["error"]["code"] == "slo_expired" and events[-1] == "[DONE]"
    assert 'pacer:request_expired_total{model_name="tiny"} 2.0' in metrics.text
    assert 'pacer:kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics.text


@pytest.mark.parametrize("flag", ["--slo-ttft-ms", "--slo-tbt-ms"])
def test_serve_refuses_a_non_positive_default_slo(flag, capsys):
    from pacer.cli import main

    assert main(["serve", flag, "-5"]) == 2  # refused before any model is loaded
    assert f"{flag[2:].replace('-', '_')} must be positive" in capsys.readouterr().err
