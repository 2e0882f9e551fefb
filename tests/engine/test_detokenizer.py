"""Incremental detokenization with the real SmolLM2 tokenizer: deltas add up, stop strings are cut
and never streamed in part."""

from __future__ import annotations

import pytest

from pacer.engine.detokenizer import Detokenizer
from pacer.model.weights import load_tokenizer
from pacer.request import FinishReason, Request, SamplingParams
from pacer.scheduling import ModelOutput, SchedulerOutput


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    return load_tokenizer(smollm2_path)


def stream(tokenizer, text: str, **sampling) -> tuple[list[str], bool]:
    """Feed `text`'s tokens one step at a time; return the deltas and whether a stop string ended it."""
    ids = tokenizer.encode(text)
    detok = Detokenizer(tokenizer)
    request = Request("r", tokenizer.encode("Hello"), SamplingParams(**sampling))
    deltas = []
    for token in ids:
        request.token_ids.append(token)
        plan = SchedulerOutput(requests=[request], num_scheduled_tokens={"r": 1})
        [out] = detok.outputs(plan, ModelOutput({"r": token}), [])
        deltas.append(out.new_text)
        if out.finished:
            assert out.finish_reason is FinishReason.STOP
            return deltas, True
    return deltas, False


def test_deltas_reassemble_the_text_including_multibyte(tokenizer):
    text = " Größe: 42 °C — naïve café 日本語 🙂 done."
    deltas, stopped = stream(tokenizer, text)
    assert "".join(deltas) == text and not stopped
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_cut_and_never_partly_streamed(tokenizer):
    deltas, stopped = stream(tokenizer, "The capital of France is Paris. It is big.", stop=["Paris."])
    assert stopped and "".join(deltas) == "The capital of France is "
    assert not any("Par" in d for d in deltas)


def test_stop_string_spanning_tokens(tokenizer):
    deltas, stopped = stream(tokenizer, "one two three four", stop=["o thr"])
    assert stopped and "".join(deltas) == "one tw"
