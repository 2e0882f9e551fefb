"""Bad input, overload and disconnects against a real `pacer serve`: clear 4xx, nothing lost or leaked."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.live_server import API_KEY, run_server

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "hi"}]

# (route, body, status, param or None, code or None)
BAD_REQUESTS = [
    (COMPLETIONS, {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "temperature": -0.5}, 400, "temperature", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 0}, 400, "top_p", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, 400, "top_p", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "n": 0}, 400, "n", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 21}, 400, "logprobs", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "stop": [""]}, 400, "stop", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "stream": "sometimes"}, 400, "stream", "invalid_value"),
    (COMPLETIONS, {"prompt": 42}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": ""}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": []}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": [1, 10**9]}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": "\ud800 lone surrogate"}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"max_tokens": 3}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "echo": True}, 400, "echo", "unsupported"),
    (COMPLETIONS, {"prompt": "hi", "suffix": "end"}, 400, "suffix", "unsupported"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 300}, 400, "max_tokens", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi " * 300, "max_tokens": 1}, 400, "prompt", "context_length_exceeded"),
    (CHAT, {"messages": [{"role": "user", "content": "hi " * 300}]}, 400, "messages", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi", "model": "gpt-4o"}, 404, "model", "model_not_found"),
    (CHAT, {"messages": []}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    (CHAT, {"messages": [{"content": "x"}]}, 400, "messages.0.role", "invalid_value"),
    (CHAT, {"messages": "hi"}, 400, "messages", "invalid_value"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content", "invalid_value"),
    (CHAT, {"messages": [MESSAGES[0], {"role": "assistant", "content": None}]}, 400, "messages.1.content",
     "invalid_value"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     None, "invalid_value"),
    (CHAT, {"messages": MESSAGES, "max_completion_tokens": 0}, 400, "max_completion_tokens", "invalid_value"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": -1}, 400, "top_logprobs", "invalid_value"),
    (CHAT, {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools",
     "unsupported"),
    (CHAT, {"messages": MESSAGES, "model": "nope"}, 404, "model", "model_not_found"),
    (COMPLETIONS, {"prompt": "hi", "ttft_slo_ms": -5}, 400, "ttft_slo_ms", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "tbt_slo_ms": 0}, 400, "tbt_slo_ms", "invalid_value"),
    (CHAT, {"messages": MESSAGES, "ttft_slo_ms": "soon"}, 400, "ttft_slo_ms", "invalid_value"),
    (CHAT, {"messages": MESSAGES, "priority": "high"}, 400, "priority", "invalid_value"),
    # Beyond what the engine can take (each was a 500 from the engine, or worse, once):
    (COMPLETIONS, {"prompt": "hi", "seed": 2**80, "temperature": 1}, 400, "seed", "invalid_value"),
    (CHAT, {"messages": MESSAGES, "seed": -(2**63) - 1}, 400, "seed", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [10**6], "min_tokens": 2}, 400, "stop_token_ids",
     "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "stop_token_ids": [2**80], "min_tokens": 2}, 400, "stop_token_ids",
     "invalid_value"),
    (CHAT, {"messages": MESSAGES, "stop_token_ids": [-5], "min_tokens": 2}, 400, "stop_token_ids.0", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "best_of": -1}, 400, "best_of", "invalid_value"),
    (COMPLETIONS, {"prompt": ["a"] * 9, "n": 128, "max_tokens": 1}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": [2**80]}, 400, "prompt", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 2**80}, 400, "max_tokens", "context_length_exceeded"),
    (COMPLETIONS, {"prompt": "hi", "min_tokens": 2**80}, 400, "min_tokens", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "n": 2**80}, 400, "n", "invalid_value"),
    (COMPLETIONS, {"prompt": "hi", "logprobs": 2**80}, 400, "logprobs", "invalid_value"),
    (CHAT, {"messages": MESSAGES, "priority": 2**80}, 400, "priority", "invalid_value"),
    (CHAT, {"messages": MESSAGES, "top_logprobs": 2**80, "logprobs": True}, 400, "top_logprobs", "invalid_value"),
]
# Non-finite numbers (Python's JSON reader takes them, as many clients write them): raw bodies.
NON_FINITE = [
    ('{"prompt": "hi", "temperature": Infinity}', "temperature"),
    ('{"prompt": "hi", "top_p": NaN}', "top_p"),
    ('{"prompt": "hi", "presence_penalty": -Infinity}', "presence_penalty"),
    ('{"prompt": "hi", "repetition_penalty": Infinity}', "repetition_penalty"),
    ('{"prompt": "hi", "ttft_slo_ms": Infinity}', "ttft_slo_ms"),
    ('{"prompt": "hi", "tpot_slo_ms": NaN}', "tpot_slo_ms"),
    ('{"prompt": "hi", "min_p": NaN}', "min_p"),
]


def post(server, route: str, body: dict, headers: dict[str, str] = AUTH) -> httpx.Response:
    """json.dumps escapes non-ASCII, so a lone surrogate travels as valid JSON (as clients send it)."""
    return httpx.post(server.url + route, content=json.dumps(body),
                      headers={**headers, "Content-Type": "application/json"})


def check_error(response: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param and param.split(".")[0] in error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize("route, body, status, param, code", BAD_REQUESTS,
                         ids=[f"{i}-{b.get('prompt', '')!s:.10}" for i, (_, b, *_) in enumerate(BAD_REQUESTS)])
def test_bad_request_gets_an_openai_error(tiny_server, route, body, status, param, code):
    check_error(post(tiny_server, route, body), status, param, code)


@pytest.mark.parametrize("raw", [b'{"prompt": "hi", ', b"not json", b'{"prompt": "\xff\xfe"}', b"[]"])
def test_malformed_body_is_400(tiny_server, raw):
    response = httpx.post(tiny_server.url + COMPLETIONS, content=raw,
                          headers={**AUTH, "Content-Type": "application/json"})
    check_error(response, 400)


@pytest.mark.parametrize("raw, param", NON_FINITE, ids=[param for _, param in NON_FINITE])
def test_non_finite_numbers_are_400(tiny_server, raw, param):
    response = httpx.post(tiny_server.url + COMPLETIONS, content=raw,
                          headers={**AUTH, "Content-Type": "application/json"})
    check_error(response, 400, param, "invalid_value")


def test_seeds_at_the_ends_of_the_range_sample_and_wrap_modulo_2_64(tiny_server):
    """A negative seed is its value mod 2**64 (as torch reads it); the n choices of one seed take seed, seed + 1,
    ... mod 2**64, so the last seed's second choice is seed 0's first."""
    def texts(seed: int, n: int = 1) -> list[str]:
        body = {"prompt": "hi", "max_tokens": 4, "temperature": 1, "seed": seed, "n": n, "ignore_eos": True}
        response = post(tiny_server, COMPLETIONS, body)
        assert response.status_code == 200, response.text
        return [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]

    last = texts(2**64 - 1, n=2)
    assert texts(-1) == last[:1] and texts(0) == last[1:] and texts(-(2**63)) == texts(2**63)


def test_a_temperature_too_small_to_divide_by_is_greedy(tiny_server):
    def text(temperature: float) -> str:
        body = {"prompt": "hi", "max_tokens": 6, "temperature": temperature, "ignore_eos": True}
        response = post(tiny_server, COMPLETIONS, body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    assert text(1e-300) == text(0) != ""


def test_unknown_route_is_404_json(tiny_server):
    check_error(httpx.get(tiny_server.url + "/v1/nothing", headers=AUTH), 404)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": "Basic " + API_KEY}])
def test_missing_or_wrong_key_is_401(tiny_server, headers):
    body = {"prompt": "hi", "max_tokens": 1}
    check_error(httpx.post(tiny_server.url + COMPLETIONS, json=body, headers=headers), 401, code="invalid_api_key")
    check_error(httpx.get(tiny_server.url + "/v1/models", headers=headers), 401)


def test_errors_leak_nothing_and_the_server_keeps_serving(tiny_server):
    for route, body, *_ in BAD_REQUESTS:
        post(tiny_server, route, body)
    ok = post(tiny_server, COMPLETIONS, {"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200
    samples = tiny_server.metrics()
    assert samples["pacer:kv_cache_usage_perc"] == 0 and samples["pacer:num_requests_running"] == 0
    assert samples['pacer:request_rejected_total{reason="context_length_exceeded"}'] >= 2


def test_disconnected_streams_are_aborted_and_free_their_blocks(tiny_server):
    """8 streams; 3 are dropped after their first token and 1 before it; the other 4 finish."""
    body = {"prompt": "tell me a story", "max_tokens": 200, "stream": True, "ignore_eos": True}
    before = tiny_server.metrics().get('pacer:request_success_total{finished_reason="abort"}', 0)

    async def stream(client: httpx.AsyncClient, i: int) -> str | None:
        request = client.build_request("POST", tiny_server.url + COMPLETIONS, json={**body, "max_tokens": 40 + i})
        response = await client.send(request, stream=True)
        try:
            if i == 0:
                return None  # gone before its first token
            last = None
            async for line in response.aiter_lines():
                if line.startswith("data: {") and i < 4:
                    return None  # gone after its first token
                if line.startswith("data: {"):
                    last = line
            return last
        finally:
            await response.aclose()

    async def main() -> list:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as client:
            return await asyncio.gather(*(stream(client, i) for i in range(8)))

    results = asyncio.run(main())
    assert all('"finish_reason":"length"' in r for r in results[4:])
    deadline = time.monotonic() + 10
    while True:
        samples = tiny_server.metrics()
        aborted = samples.get('pacer:request_success_total{finished_reason="abort"}', 0) - before
        if aborted == 4 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert aborted == 4
    assert samples["pacer:kv_cache_usage_perc"] == 0 and samples["pacer:num_requests_running"] == 0


def test_queue_full_is_429_with_retry_after_and_kv_capacity_is_a_limit(tiny_model_dir, tmp_path):
    # 12 blocks of 16 tokens: the whole KV cache holds 192 tokens, less than the 256-token context.
    with run_server(tiny_model_dir, "--max-num-seqs", "1", "--max-queued-requests", "1", "--threads", "1",
                    "--num-blocks", "12", log_dir=tmp_path) as server:
        error = check_error(post(server, COMPLETIONS, {"prompt": "hi", "max_tokens": 200}, headers={}), 400,
                            "max_tokens", "context_length_exceeded")
        assert "KV cache capacity of 192 tokens" in error["message"]
        body = {"prompt": "hi", "max_tokens": 150, "ignore_eos": True}

        async def main() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(server.url + COMPLETIONS, json=body) for _ in range(4)))

        responses = asyncio.run(main())
        refused = [r for r in responses if r.status_code == 429]
        served = [r for r in responses if r.status_code == 200]
        assert refused and served and len(refused) + len(served) == 4
        for response in refused:
            check_error(response, 429, code="queue_full")
            assert int(response.headers["Retry-After"]) >= 1
        assert all(r.json()["usage"]["completion_tokens"] == 150 for r in served)
        assert server.metrics()['pacer:request_rejected_total{reason="queue_full"}'] == len(refused)
