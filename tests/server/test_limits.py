"""Bounded work per request, decided before the work: the default output length, the body size limit, the
character bound on prompts, tokenization off the event loop.

In-process (the real app and front end on the tiny model, through httpx's ASGI transport) unless the HTTP server
itself is what is tested.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import httpx
import pytest

from pacer.config import EngineConfig, ServerConfig
from pacer.engine.builder import build_engine
from pacer.engine.frontend import Frontend
from pacer.engine.hosts import ThreadHost
from pacer.server.app import create_app
from tests.server.test_errors import AUTH, check_error

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CONTEXT = 256  # the tiny model's context length


def make_app(model_dir, **options):
    engine, tokenizer = build_engine(EngineConfig.from_kwargs(model=str(model_dir), num_blocks=64, threads=1))
    frontend = Frontend([ThreadHost(lambda: engine)])
    frontend.start()
    return create_app(frontend, tokenizer, "tiny", str(model_dir), "llama", **options)


def run(app, *calls: Callable[[httpx.AsyncClient], Awaitable]) -> list:
    async def main() -> list:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pacer", timeout=60) as client:
                return [await call(client) for call in calls]

    return asyncio.run(main())


def posting(route: str, body: dict) -> Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]:
    async def call(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(route, json=body)

    return call


@pytest.fixture(scope="module")
def app(tiny_model_dir):
    return make_app(tiny_model_dir)


def usage(response: httpx.Response) -> tuple[int, int, str]:
    assert response.status_code == 200, response.text
    body = response.json()
    return body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"], body["choices"][0]["finish_reason"]


# ---- max_tokens omitted -------------------------------------------------------------------------


def test_without_max_tokens_chat_runs_to_the_end_of_the_context_and_completions_to_16(app):
    chat, null, completion = run(
        app, posting(CHAT, {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}),
        posting(COMPLETIONS, {"prompt": "hi", "max_tokens": None, "ignore_eos": True}),
        posting(COMPLETIONS, {"prompt": "hi", "ignore_eos": True}))
    prompt, output, reason = usage(chat)
    assert prompt + output == CONTEXT and reason == "length"
    prompt, output, reason = usage(null)
    assert prompt + output == CONTEXT and reason == "length"
    assert usage(completion)[1:] == (16, "length")  # OpenAI's default for completions, as vLLM


def test_max_tokens_default_applies_where_the_request_sets_no_limit(tiny_model_dir):
    messages = [{"role": "user", "content": "hi"}]
    omitted, given, given_new, completion, null, at_least_min, near_the_end = run(
        make_app(tiny_model_dir, max_tokens_default=5),
        posting(CHAT, {"messages": messages, "ignore_eos": True}),
        posting(CHAT, {"messages": messages, "ignore_eos": True, "max_tokens": 7}),
        posting(CHAT, {"messages": messages, "ignore_eos": True, "max_completion_tokens": 3}),
        posting(COMPLETIONS, {"prompt": "hi", "ignore_eos": True}),
        posting(COMPLETIONS, {"prompt": "hi", "ignore_eos": True, "max_tokens": None}),
        posting(CHAT, {"messages": messages, "ignore_eos": True, "min_tokens": 8}),
        posting(COMPLETIONS, {"prompt": list(range(1000, 1000 + CONTEXT - 3)), "max_tokens": None,
                              "ignore_eos": True}))
    assert [usage(r)[1] for r in (omitted, given, given_new, completion, null, at_least_min)] == [5, 7, 3, 16, 5, 8]
    assert usage(near_the_end)[1:] == (3, "length")  # cut where the context ends, as no default would be


def test_max_tokens_default_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens_default"):
        ServerConfig(max_tokens_default=0)


# ---- the body size limit ------------------------------------------------------------------------


def test_a_20_mb_body_gets_413_at_once_and_the_server_serves_on(tiny_server):
    """Against uvicorn itself (the 4 MiB default): refused by its Content-Length, before the body is read."""
    body = b'{"prompt": "' + b"a" * 20_000_000 + b'", "max_tokens": 1}'
    start = time.perf_counter()
    response = httpx.post(tiny_server.url + COMPLETIONS, content=body,
                          headers={**AUTH, "Content-Type": "application/json"})
    elapsed_s = time.perf_counter() - start
    error = check_error(response, 413, code="request_too_large")
    assert str(4 * 2**20) in error["message"]
    assert elapsed_s < 2  # loose: the client's own sending of 20 MB is most of it (the server answers in ms)
    ok = httpx.post(tiny_server.url + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}, headers=AUTH)
    assert ok.status_code == 200
    assert tiny_server.metrics()['pacer:request_rejected_total{reason="request_too_large"}'] >= 1


def test_a_chunked_body_without_content_length_is_counted_as_it_arrives(tiny_server):
    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(80):  # 5 MiB
            yield b"a" * 2**16
        yield b'"}'

    response = httpx.post(tiny_server.url + COMPLETIONS, content=chunks(),
                          headers={**AUTH, "Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    check_error(response, 413, code="request_too_large")


def test_max_request_bytes_is_the_operators(tiny_model_dir):
    small = posting(COMPLETIONS, {"prompt": "hi", "max_tokens": 1})
    large = posting(COMPLETIONS, {"prompt": "hi " * 200, "max_tokens": 1})
    ok, refused = run(make_app(tiny_model_dir, max_request_bytes=256), small, large)
    assert ok.status_code == 200
    check_error(refused, 413, code="request_too_large")
    with pytest.raises(ValueError, match="max_request_bytes"):
        ServerConfig(max_request_bytes="0")


# ---- the character bound ------------------------------------------------------------------------


def test_a_prompt_too_long_to_fit_in_any_tokenization_is_refused_without_tokenizing(app):
    """256 tokens of at most 81 characters: a 1 MB prompt cannot fit, whatever its tokens."""
    started = []

    def timed(route: str, body: dict):
        call = posting(route, body)

        async def timed_call(client: httpx.AsyncClient) -> tuple[httpx.Response, float]:
            started.append(time.perf_counter())
            response = await call(client)
            return response, time.perf_counter() - started[-1]

        return timed_call

    megabyte = "hello world " * 87_400
    (completion, completion_s), (chat, chat_s), (many, _), (shorter, _) = run(
        app, timed(COMPLETIONS, {"prompt": megabyte, "max_tokens": 1}),
        timed(CHAT, {"messages": [{"role": "system", "content": megabyte[:600_000]},
                                  {"role": "user", "content": megabyte[:600_000]}], "max_tokens": 1}),
        timed(COMPLETIONS, {"prompt": ["hi", "x" * (256 * 81 + 1)], "max_tokens": 1}),
        timed(COMPLETIONS, {"prompt": "x" * (256 * 81), "max_tokens": 1}))  # tokenized, then refused by count
    for response, param in ((completion, "prompt"), (chat, "messages"), (many, "prompt"), (shorter, "prompt")):
        check_error(response, 400, param, "context_length_exceeded")
    assert "81 characters" in completion.json()["error"]["message"]
    assert "81 characters" not in shorter.json()["error"]["message"]
    assert completion_s < 1 and chat_s < 1  # loose (tokenizing 1 MB takes about as long here; refusing, ms)


# ---- tokenization off the event loop ------------------------------------------------------------


def test_long_prompts_are_tokenized_beside_the_event_loop(app):
    """50 prompts of 20K characters (each just fits the character bound, so each is tokenized: half a second in
    all) while a ticker measures how late the event loop runs."""
    prompts = [f"{i} " + "hello world " * 1700 for i in range(50)]

    async def main() -> tuple[httpx.Response, float]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://pacer", timeout=60) as client:
                gaps = []

                async def tick() -> None:
                    last = time.perf_counter()
                    while True:
                        await asyncio.sleep(0.002)
                        now = time.perf_counter()
                        gaps.append(now - last)
                        last = now

                ticker = asyncio.create_task(tick())
                await asyncio.sleep(0.05)
                response = await client.post(COMPLETIONS, json={"prompt": prompts, "max_tokens": 1})
                await asyncio.sleep(0.05)  # the ticker's wake-up after a stall counts it
                ticker.cancel()
                return response, max(gaps)

    response, longest_gap_s = asyncio.run(main())
    check_error(response, 400, "prompt", "context_length_exceeded")  # ~3,400 tokens each: counted, then refused
    assert longest_gap_s < 0.25  # measured: 12 ms; 0.52 s with every prompt tokenized on the loop
