"""`pacer serve` on the default model: greedy chat through the official client reproduces the reference."""

from __future__ import annotations

import asyncio

import openai
import pytest

from pacer.model.weights import load_tokenizer
from tests.live_server import run_server

pytestmark = pytest.mark.slow

# The reference masks EOS for its 32 tokens (transformers' min_new_tokens): vLLM's min_tokens does the same.
GREEDY32 = {"max_tokens": 32, "temperature": 0, "extra_body": {"min_tokens": 32}}


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory):
    with run_server(smollm2_path, "--dtype", "float32", "--kv-cache-memory", "128MiB", "--served-model-name",
                    "SmolLM2-135M-Instruct", log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


def test_concurrent_greedy_chat_reproduces_the_reference(server, reference, smollm2_path):
    tokenizer = load_tokenizer(smollm2_path)
    cases = reference["cases"]

    async def chat(client: openai.AsyncOpenAI, case: dict, stream: bool) -> tuple[str, int]:
        if not stream:
            response = await client.chat.completions.create(model="SmolLM2-135M-Instruct",
                                                            messages=case["messages"], **GREEDY32)
            return response.choices[0].message.content, response.usage.completion_tokens
        chunks = await client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=case["messages"],
                                                      stream=True, stream_options={"include_usage": True}, **GREEDY32)
        text, usage = "", None
        async for chunk in chunks:
            text += "".join(c.delta.content or "" for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage.completion_tokens

    async def main() -> list[tuple[str, int]]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(chat(client, case, stream) for stream in (False, True) for case in cases))

    results = asyncio.run(main())
    expected = [tokenizer.decode(case["generated_ids"]) for case in cases] * 2
    assert [text for text, _ in results] == expected
    assert all(n == 32 for _, n in results)
    assert server.metrics()["pacer:kv_cache_usage_perc"] == 0
