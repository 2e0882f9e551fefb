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


def test_stop_string_spanning_a_hand_over_is_found_and_never_partly_streamed(tokenizer):
    """Disaggregated serving: the prefill engine streams the first token and hands the request over at its token
    limit; the decode engine continues the same text, so a stop string across the two is cut as on one engine."""
    text, stop = "one two three four", "one tw"  # across the first two tokens ("one", " two")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids[:1]) == "one"
    prompt = tokenizer.encode("Hello")
    sampling = SamplingParams(max_tokens=10, stop=[stop])

    first = Request("r", prompt, SamplingParams(max_tokens=1, stop=[stop]), export_kv=True)
    first.token_ids.append(ids[0])
    first.finish_reason = FinishReason.LENGTH
    plan = SchedulerOutput(requests=[first], num_scheduled_tokens={"r": len(prompt)})
    [handed] = Detokenizer(tokenizer).outputs(plan, ModelOutput({"r": ids[0]}), [first])
    assert handed.new_text == "" and handed.new_token_ids == ids[:1]  # "one" may begin the stop string: held back

    decode = Detokenizer(tokenizer)
    request = Request("r", prompt, sampling)
    request.token_ids.append(ids[0])
    decode.adopt(request)
    deltas = []
    for token in ids[1:]:
        request.token_ids.append(token)
        plan = SchedulerOutput(requests=[request], num_scheduled_tokens={"r": 1})
        [out] = decode.outputs(plan, ModelOutput({"r": token}), [])
        assert out.new_token_ids == [token]
        deltas.append(out.new_text)
        if out.finished:
            break
    assert out.finished and out.finish_reason is FinishReason.STOP and "".join(deltas) == ""

    # no stop string across the hand-over: what the prefill engine held back is streamed by the decode engine
    other = Request("r2", prompt, SamplingParams(max_tokens=10, stop=["four."]))
    other.token_ids.append(ids[0])
    decode.adopt(other)
    other.token_ids.append(ids[1])
    plan = SchedulerOutput(requests=[other], num_scheduled_tokens={"r2": 1})
    [out] = decode.outputs(plan, ModelOutput({"r2": ids[1]}), [])
    assert out.new_text == "one"  # "one two" less the 4 characters "four." could still begin with


def step_several(tokenizer, text: str, per_step: int, **sampling) -> tuple[list[str], list[int], list[int]]:
    """Feed `text`'s tokens `per_step` at a time (a verify row's accepted drafts and token): the deltas, the token
    ids output, and all of text's ids."""
    ids = tokenizer.encode(text)
    detok = Detokenizer(tokenizer)
    request = Request("r", tokenizer.encode("Hello"), SamplingParams(**sampling))
    deltas, output_ids = [], []
    for i in range(0, len(ids), per_step):
        request.token_ids += ids[i:i + per_step]
        plan = SchedulerOutput(requests=[request], num_scheduled_tokens={"r": 1})
        [out] = detok.outputs(plan, ModelOutput({"r": request.token_ids[-1]}), [])
        deltas.append(out.new_text)
        output_ids += out.new_token_ids
        assert out.num_output_tokens == len(output_ids)
        if out.finished:
            break
    return deltas, output_ids, ids


def test_several_tokens_a_step_reassemble_the_text(tokenizer):
    text = " Größe: 42 °C — naïve café 日本語 🙂 done."
    deltas, output_ids, ids = step_several(tokenizer, text, 3)
    assert "".join(deltas) == text and output_ids == ids


def test_a_stop_string_among_several_new_tokens_ends_the_tokens_there(tokenizer):
    """The tokens after the one that completed the stop string (in the same step) are not output, as they would
    never have been generated one token at a time."""
    text = "The capital of France is Paris. It is big."
    _, alone, ids = step_several(tokenizer, text, 1, stop=["Paris."])
    assert len(alone) < len(ids)
    for per_step in (2, 4, 16):
        deltas, output_ids, _ = step_several(tokenizer, text, per_step, stop=["Paris."])
        assert "".join(deltas) == "The capital of France is "
        assert output_ids == alone  # the same tokens as one at a time
