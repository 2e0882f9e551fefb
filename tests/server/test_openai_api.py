"""The OpenAI API of a real `pacer serve` (tiny random model, real tokenizer), through the official client."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.live_server import API_KEY


@pytest.fixture(scope="module")
def client(tiny_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(tiny_server) -> str:
    return tiny_server.model


def test_models_lists_the_served_model(client, model):
    [card] = client.models.list().data
    assert card.id == model
    assert card.max_model_len == 256 and card.family == "llama"


def test_chat_completion(client, model):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_completion_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    [choice] = response.choices
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_completion_prompt_forms_and_n(client, model):
    response = client.completions.create(model=model, prompt=["one", "two"], n=2, max_tokens=3, seed=7,
                                         extra_body={"ignore_eos": True})
    assert response.object == "text_completion"
    assert sorted(c.index for c in response.choices) == [0, 1, 2, 3]
    assert response.usage.completion_tokens == 12
    ids = client.completions.create(model=model, prompt=[[5, 6, 7], [8, 9]], max_tokens=2,
                                    extra_body={"ignore_eos": True})
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5


def test_seed_reproduces_a_sample_and_greedy_is_deterministic(client, model):
    def complete(**kw) -> str:
        return client.completions.create(model=model, prompt="hello", max_tokens=8, extra_body={"ignore_eos": True},
                                         **kw).choices[0].text
    assert complete(seed=1, temperature=1.0) == complete(seed=1, temperature=1.0)
    assert complete(temperature=0) == complete(temperature=0)


def test_sampling_options_are_accepted(client, model):
    response = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "x"}], max_tokens=6, temperature=0.8, top_p=0.9,
        presence_penalty=0.5, frequency_penalty=0.5, user="u1", stop=None,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True})
    assert response.usage.completion_tokens == 6


def test_completion_logprobs(client, model):
    response = client.completions.create(model=model, prompt="a b c", max_tokens=4, logprobs=2, temperature=0,
                                         extra_body={"ignore_eos": True})
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 and lp <= 0 for top, lp in zip(logprobs.top_logprobs, logprobs.token_logprobs))
    assert logprobs.text_offset[0] == 0


def test_chat_logprobs(client, model):
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                              logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = response.choices[0].logprobs.content
    assert len(content) == 3
    assert all(len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode()) for entry in content)


def test_stream_chat_with_usage(client, model):
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=10,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_continuous_usage_stats(client, model):
    stream = client.completions.create(model=model, prompt="Hi", max_tokens=5, stream=True,
                                       stream_options={"include_usage": True, "continuous_usage_stats": True},
                                       extra_body={"ignore_eos": True})
    usages = [c.usage.completion_tokens for c in stream if c.usage is not None]
    assert usages == sorted(usages) and usages[-1] == 5


def test_stop_string_ends_the_completion_without_it(client, model):
    text = client.completions.create(model=model, prompt="Hi", max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("the random model produced whitespace where the stop string would go")
    response = client.completions.create(model=model, prompt="Hi", max_tokens=20, temperature=0, stop=[stop],
                                         extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].text == text[:text.index(stop)]


def test_sixteen_concurrent_streams_complete_with_correct_usage(tiny_server, model):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, int, str]:
        max_tokens = 1 + (i * 7) % 24
        stream = await client.completions.create(model=model, prompt=f"request {i} " * (1 + i % 5),
                                                 max_tokens=max_tokens, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        reasons, usage = [], None
        async for chunk in stream:
            reasons += [c.finish_reason for c in chunk.choices if c.finish_reason]
            usage = chunk.usage or usage
        return max_tokens, usage.completion_tokens, reasons

    async def main() -> list:
        async with openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(16)))

    for wanted, got, reasons in asyncio.run(main()):
        assert got == wanted and reasons == ["length"]
    assert tiny_server.metrics()["pacer:kv_cache_usage_perc"] == 0


def test_async_client_non_streaming(tiny_server, model):
    async def main() -> openai.types.Completion:
        async with openai.AsyncOpenAI(base_url=tiny_server.url + "/v1", api_key=API_KEY, max_retries=0) as client:
            return await client.completions.create(model=model, prompt="x", max_tokens=4,
                                                   extra_body={"ignore_eos": True})
    assert asyncio.run(main()).usage.completion_tokens == 4


def test_metrics_use_vllm_names(tiny_server):
    samples = tiny_server.metrics()
    for name in ("pacer:num_requests_running", "pacer:num_requests_waiting", "pacer:kv_cache_usage_perc",
                 "pacer:prompt_tokens_total", "pacer:generation_tokens_total", "pacer:num_preemptions_total",
                 "pacer:time_to_first_token_seconds_count", "pacer:inter_token_latency_seconds_count",
                 "pacer:e2e_request_latency_seconds_count", "pacer:request_queue_time_seconds_count",
                 "pacer:request_prefill_time_seconds_count", "pacer:request_decode_time_seconds_count",
                 "pacer:iteration_time_seconds_count", "pacer:iteration_tokens_total_count"):
        assert name in samples, name
    assert samples['pacer:request_success_total{finished_reason="length"}'] > 0


def test_health_version_and_metrics_need_no_key(tiny_server):
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    assert httpx.get(tiny_server.url + "/version").json()["version"]
    assert httpx.get(tiny_server.url + "/metrics").status_code == 200


def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_counted(client, model, tiny_server):
    prompt = list(range(100, 180))  # 80 token ids: five full blocks of 16
    first = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    second = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == 64  # all but the block holding the last token
    assert second.choices[0].text == first.choices[0].text
    metrics = httpx.get(tiny_server.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    hits = [line for line in metrics.splitlines() if line.startswith("pacer:prefix_cache_hits_total")]
    assert hits and float(hits[0].rsplit(" ", 1)[1]) >= 64
