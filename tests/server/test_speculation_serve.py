"""`pacer serve --speculation ngram` (tiny random model, real tokenizer): the same greedy text as without drafts,
streamed in full when a step brings several tokens, with vLLM's speculative decoding counters on /metrics."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.live_server import API_KEY, Server, run_server

PROMPTS = [list(range(100, 108)) * 4, [7, 8, 9] * 6 + [300, 301], [2000 + i % 5 for i in range(30)]]


@pytest.fixture(scope="module")
def spec_server(tiny_model_dir, tmp_path_factory) -> Iterator[Server]:
    """tiny_server's flags, with n-gram drafts."""
    with run_server(tiny_model_dir, "--api-key", API_KEY, "--max-num-seqs", "8", "--max-num-batched-tokens", "64",
                    "--num-blocks", "64", "--threads", "1", "--speculation", "ngram",
                    log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def test_streamed_greedy_text_is_the_same_as_without_drafts(tiny_server, spec_server):
    for prompt in PROMPTS:
        kwargs = {"model": tiny_server.model, "prompt": prompt, "max_tokens": 40, "temperature": 0,
                  "extra_body": {"ignore_eos": True}}
        plain = client(tiny_server).completions.create(**kwargs)
        chunks = list(client(spec_server).completions.create(stream=True, stream_options={"include_usage": True},
                                                              **kwargs))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
        assert chunks[-1].usage.completion_tokens == 40
        unstreamed = client(spec_server).completions.create(**kwargs)
        assert unstreamed.choices[0].text == plain.choices[0].text and unstreamed.usage.completion_tokens == 40
    samples = spec_server.metrics()
    drafts, accepted = (samples[f"pacer:spec_decode_num_{name}_total"] for name in ("draft_tokens", "accepted_tokens"))
    assert samples["pacer:spec_decode_num_drafts_total"] > 0 and 0 < accepted < drafts
    assert samples["pacer:generation_tokens_total"] == 3 * 2 * 40


def test_a_stop_string_cuts_the_same_text_with_drafts(tiny_server, spec_server):
    kwargs = {"model": tiny_server.model, "prompt": PROMPTS[0], "max_tokens": 40, "temperature": 0,
              "extra_body": {"ignore_eos": True}}
    text = client(tiny_server).completions.create(**kwargs).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    plain = client(tiny_server).completions.create(stop=[stop], **kwargs)
    drafted = client(spec_server).completions.create(stop=[stop], **kwargs)
    assert drafted.choices[0].text == plain.choices[0].text and drafted.choices[0].finish_reason == "stop"
    assert drafted.usage.completion_tokens == plain.usage.completion_tokens
