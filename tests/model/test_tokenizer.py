"""Tokenizer: SmolLM2's GGUF vocabulary reproduces the shared reference prompts and ids exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jinja2
import pytest

from pacer.model.tokenizer import Tokenizer
from pacer.model.weights import load_tokenizer
from tests.strict import import_or_skip


@pytest.fixture(scope="module")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return load_tokenizer(smollm2_path)


def test_chat_template_reproduces_reference_prompts(tokenizer: Tokenizer, reference: dict) -> None:
    for case in reference["cases"]:
        assert tokenizer.apply_chat_template(case["messages"]) == case["prompt_text"]


def test_encode_reproduces_reference_ids(tokenizer: Tokenizer, reference: dict) -> None:
    for case in reference["cases"]:
        assert tokenizer.encode(case["prompt_text"]) == case["prompt_ids"]


def test_decode_reproduces_reference_text(tokenizer: Tokenizer, reference: dict) -> None:
    for case in reference["cases"]:
        end = case["first_eos_index"]
        ids = case["generated_ids"] if end is None else case["generated_ids"][:end]
        assert tokenizer.decode(ids) == case["generated_text_until_eos"]


def test_special_tokens(tokenizer: Tokenizer, reference: dict) -> None:
    assert tokenizer.vocab_size == reference["model_info"]["config"]["vocab_size"] == 49152
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    special = reference["model_info"]["special_tokens"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        special["bos"], special["eos"], special["pad"]
    )
    assert tokenizer.all_special_ids == frozenset(range(17))  # <|endoftext|> ... <empty_output>
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nhi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_add_special_tokens_adds_nothing_for_smollm(tokenizer: Tokenizer) -> None:
    # The GGUF says add_bos_token=False: chat prompts carry <|im_start|> from the template instead.
    assert tokenizer.encode("hello", add_special_tokens=True) == tokenizer.encode("hello")


def test_digits_are_split_one_by_one(tokenizer: Tokenizer) -> None:
    # SmolLM's pre-tokenizer isolates every digit (llama.cpp pre-type "smollm").
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("In 2024")) == ["In", "Ġ", "2", "0", "2", "4"]


def test_incremental_decode_of_slices_matches_full_decode(tokenizer: Tokenizer) -> None:
    """vLLM-style prefix/read offsets: deltas concatenate to the full text, even when a character's
    bytes span several tokens (the emoji and accented letters below)."""
    ids = tokenizer.encode("Olá, café ☕ déjà vu 🤗 naïve — fin.")
    assert incremental_text(tokenizer, ids) == tokenizer.decode(ids)


def incremental_text(tokenizer: Tokenizer, ids: list[int]) -> str:
    """`ids` decoded one token at a time through prefix/read windows, the deltas concatenated."""
    text, prefix_offset, read_offset = "", 0, 0
    for end in range(1, len(ids) + 1):
        prefix = tokenizer.decode(ids[prefix_offset:read_offset])
        full = tokenizer.decode(ids[prefix_offset:end])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            text += full[len(prefix):]
            prefix_offset, read_offset = read_offset, end
    return text


def test_save_and_reload_round_trip(tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer.save(tmp_path)
    reloaded = Tokenizer.from_directory(tmp_path)
    for field in ("bos_token", "eos_token", "unk_token", "pad_token", "chat_template", "vocab_size"):
        assert getattr(reloaded, field) == getattr(tokenizer, field), field
    text = "<|im_start|>user\nIn 2024, naïve 🤗 tests<|im_end|>\n"
    assert reloaded.encode(text) == tokenizer.encode(text)


def test_transformers_reads_the_saved_tokenizer(tokenizer: Tokenizer, reference: dict, tmp_path: Path) -> None:
    transformers = import_or_skip("transformers")
    tokenizer.save(tmp_path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for case in reference["cases"]:
        prompt = theirs.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
        assert prompt == case["prompt_text"]
        assert theirs(prompt, add_special_tokens=False).input_ids == case["prompt_ids"]
    assert theirs.eos_token_id == tokenizer.eos_token_id and theirs.bos_token_id == tokenizer.bos_token_id


def test_reads_chat_template_jinja_file(tokenizer: Tokenizer, tmp_path: Path) -> None:
    """transformers >= 4.47 saves the template beside tokenizer_config.json, not inside it."""
    dataclasses.replace(tokenizer, chat_template=None).save(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert Tokenizer.from_directory(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


# ---- chat template environment: same behaviour as transformers' render -----------------------------

RICH_TEMPLATE = """
{%- set ns = namespace(count=0) -%}
{%- for message in messages -%}
  {%- if message['role'] not in ['system', 'user', 'assistant'] -%}
    {{ raise_exception('bad role ' + message['role']) }}
  {%- endif -%}
  {%- if message['role'] == 'system' %}{% continue %}{% endif -%}
  {%- set ns.count = ns.count + 1 -%}
  {% generation %}{{ bos_token }}{{ message['role'] }}: {{ message['content'] | tojson }}{% endgeneration %}
{% endfor -%}
{%- if tools %}{{ tools | tojson(indent=2) }}{% endif -%}
{{ ns.count }}{% if add_generation_prompt %} assistant:{% endif %}{{ extra | default('') }}
"""


def _with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    return dataclasses.replace(tokenizer, chat_template=template)


def test_rich_template_renders_like_transformers(tokenizer: Tokenizer) -> None:
    utils = import_or_skip("transformers.utils.chat_template_utils")
    messages = [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": "<b>&'quoted' \"ü\"</b>"},
        {"role": "assistant", "content": "ok"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for kwargs in ({}, {"tools": tools, "extra": "!"}):
        ours = _with_template(tokenizer, RICH_TEMPLATE).apply_chat_template(messages, **kwargs)
        (theirs,), _ = utils.render_jinja_template(
            [messages], chat_template=RICH_TEMPLATE, add_generation_prompt=True,
            bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
            unk_token=tokenizer.unk_token, pad_token=tokenizer.pad_token, **kwargs,
        )
        assert ours == theirs
        assert '"<b>&' in ours  # tojson must not HTML-escape


def test_raise_exception_and_strftime_now(tokenizer: Tokenizer) -> None:
    with pytest.raises(jinja2.TemplateError, match="bad role tool"):
        _with_template(tokenizer, RICH_TEMPLATE).apply_chat_template([{"role": "tool", "content": "x"}])
    dated = _with_template(tokenizer, "{{ strftime_now('%Y') }}").apply_chat_template([])
    assert dated.isdigit() and len(dated) == 4


def test_template_is_sandboxed(tokenizer: Tokenizer) -> None:
    """Templates ship inside model files: no dunder access, no mutating the caller's messages."""
    messages = [{"role": "user", "content": "hi"}]
    assert _with_template(tokenizer, "{{ messages.__class__ }}").apply_chat_template(messages) == ""
    with pytest.raises(jinja2.exceptions.SecurityError):
        _with_template(tokenizer, "{{ messages.append(1) }}").apply_chat_template(messages)
    assert messages == [{"role": "user", "content": "hi"}]


def test_missing_template_is_a_clear_error(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        _with_template(tokenizer, None).apply_chat_template([{"role": "user", "content": "hi"}])


# ---- construction from metadata, without the model file -----------------------------------------


def _tiny_metadata(**overrides: object) -> dict:
    tokens = ["<|end|>", "a", "b", "ab", "Ġ", "Ġab"]
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3, 1, 1, 1, 1, 1],
        "tokenizer.ggml.merges": ["a b", "Ġ ab"],
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.bos_token_id": 0,
    }
    return metadata | overrides


def test_from_gguf_metadata_builds_bpe() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(_tiny_metadata())
    assert tokenizer.encode("ab ab<|end|>") == [3, 5, 0]
    assert tokenizer.decode([3, 5, 0]) == "ab ab"
    assert tokenizer.chat_template is None and tokenizer.eos_token == "<|end|>"


def test_from_gguf_metadata_adds_bos_when_the_file_asks() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(_tiny_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert tokenizer.encode("ab", add_special_tokens=True) == [0, 3]
    assert tokenizer.encode("ab") == [3]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [("tokenizer.ggml.model", "bert", "not supported"), ("tokenizer.ggml.pre", "deepseek-coder", "known")],
)
def test_from_gguf_metadata_rejects_unknown_tokenizers(key: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_gguf_metadata(_tiny_metadata(**{key: value}))


def test_no_token_stands_for_more_characters_than_max_token_chars(tokenizer):
    """What lets the server refuse an over-long prompt by its length alone (SmolLM2's longest: 81 characters, a
    newline and 80 spaces; a fixed 64 would have been wrong)."""
    texts = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    assert max(map(len, texts)) <= tokenizer.max_token_chars == 81
    text = "\n" + " " * 80
    assert len(tokenizer.encode(text * 10)) == 10


def test_encode_batch_tokenizes_as_encode(tokenizer):
    texts = ["Hello, world!", "<|im_start|>user\n123 héllo<|im_end|>", ""]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
