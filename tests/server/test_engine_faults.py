"""An engine failure inside one request is that request's 500, and the server serves on.

In-process (the fault is injected into the executor), through the real app and front end.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ThreadHost
from pacer.scheduling import ModelOutput, SchedulerOutput
from pacer.server.app import create_app

POISON = 13  # a prompt starting with this token id makes the executor fail


class FaultyExecutor:
    def __init__(self, inner) -> None:
        self.inner = inner

    def execute(self, plan: SchedulerOutput) -> ModelOutput:
        if any(r.prompt_token_ids[0] == POISON for r in plan.requests):
            raise RuntimeError("injected fault")
        return self.inner.execute(plan)


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    engine, tokenizer = build_engine(EngineConfig.from_kwargs(model=str(tiny_model_dir), num_blocks=64))
    engine.executor = FaultyExecutor(engine.executor)
    frontend = Frontend([ThreadHost(lambda: engine)])
    frontend.start()
    return create_app(frontend, tokenizer, "tiny", str(tiny_model_dir), "llama")


def run(app, calls):
    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pacer", timeout=30) as client:
                return [await call(client) for call in calls]
    return asyncio.run(main())


def test_engine_error_fails_the_request_with_500_and_the_server_serves_on(app):
    async def poisoned(client):
        return await client.post("/v1/completions", json={"prompt": [POISON, 5], "max_tokens": 4})

    async def healthy(client):
        return await client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 4, "ignore_eos": True})

    async def poisoned_stream(client):
        return await client.post("/v1/completions", json={"prompt": [POISON, 6], "max_tokens": 4, "stream": True})

    async def metrics(client):
        return await client.get("/metrics")

    bad, good, streamed, samples = run(app, [poisoned, healthy, poisoned_stream, metrics])
    assert bad.status_code == 500
    assert bad.json()["error"]["code"] == "engine_error" and "injected fault" in bad.json()["error"]["message"]
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 4
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[0])["error"]["code"] == "engine_error" and events[-1] == "[DONE]"
    assert 'pacer:kv_cache_usage_perc{model_name="tiny"} 0.0' in samples.text
