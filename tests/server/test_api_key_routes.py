"""The API key guards /v1 only by default (as vLLM's); with --api-key-all-routes, /health, /metrics and /version too.

In-process, through the real app and front end on the tiny model.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ThreadHost
from pacer.server.app import create_app

KEY = "sk-operator"
OPERATOR_ROUTES = ("/health", "/metrics", "/version")


def get_all(tiny_model_dir, all_routes: bool, headers: dict[str, str]) -> dict[str, httpx.Response]:
    engine, tokenizer = build_engine(EngineConfig.from_kwargs(model=str(tiny_model_dir), num_blocks=64))
    frontend = Frontend([ThreadHost(lambda: engine)])
    frontend.start()
    app = create_app(frontend, tokenizer, "tiny", str(tiny_model_dir), "llama", api_key=KEY, api_key_all_routes=all_routes)

    async def main() -> dict[str, httpx.Response]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pacer", timeout=30) as client:
                return {route: await client.get(route, headers=headers) for route in (*OPERATOR_ROUTES, "/v1/models")}

    return asyncio.run(main())


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.json()["error"]["code"] == "invalid_api_key"


def test_by_default_only_v1_needs_the_key(tiny_model_dir):
    responses = get_all(tiny_model_dir, all_routes=False, headers={})
    for route in OPERATOR_ROUTES:
        assert responses[route].status_code == 200, route
    assert "pacer:kv_cache_usage_perc" in responses["/metrics"].text
    assert_401(responses["/v1/models"])


def test_all_routes_need_the_key_when_asked(tiny_model_dir):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        responses = get_all(tiny_model_dir, all_routes=True, headers=headers)
        for route, response in responses.items():
            assert_401(response)
    responses = get_all(tiny_model_dir, all_routes=True, headers={"Authorization": f"Bearer {KEY}"})
    for route, response in responses.items():
        assert response.status_code == 200, route
    assert "pacer:kv_cache_usage_perc" in responses["/metrics"].text


def test_all_routes_without_a_key_is_refused():
    with pytest.raises(ValueError, match="needs an API key"):
        create_app(None, None, "tiny", "tiny", "llama", api_key=None, api_key_all_routes=True)
