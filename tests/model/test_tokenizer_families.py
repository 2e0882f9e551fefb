"""The Llama-like families' tokenizers, rebuilt from GGUF metadata: Llama 3 ('llama-bpe'), Qwen2/2.5/3 ('qwen2') and
SentencePiece vocabularies ('llama': Llama 2, Mistral, TinyLlama). Ids as llama.cpp gives them and as transformers'
own GGUF conversion gives them; chat prompts as transformers renders them (tests/data/README.md names the files)."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest

from pacer.model.gguf_file import GGUFFile
from pacer.model.tokenizer import Tokenizer
from pacer.model.weights import load_tokenizer
from tests.model.test_tokenizer import incremental_text
from tests.strict import import_or_skip

DATA = Path(__file__).resolve().parents[1] / "data"
VOCABS = ("llama-bpe", "qwen2", "llama-spm")
BYTE_LEVEL = ("llama-bpe", "qwen2")

# Digits, CJK, emoji (ZWJ sequences, flags), code, whitespace runs, accents, scripts, contractions. None starts with
# a space: there transformers' SentencePiece conversion is known to differ (test_transformers_differs_...).
TEXTS = (
    "Hello, world! 123456789 3.14159 1,000,000 and 2024-06-01",
    "你好，世界！这是一个测试。日本語のテキスト、한국어 텍스트",
    "Emoji: 🤗🦙🔥 👨‍👩‍👧‍👦 ✅ 🇫🇷 ☕",
    "def f(x):\n    return x**2  # square\n\n\tif x != 0:\n\t\tpass\n",
    "trailing   \n\n\n   mixed \t tabs\r\nend  ",
    "Café naïve façade Ångström résumé Zürich ñandú Dvořák e\u0301",
    "Ελληνικά, русский текст, العربية, עברית, हिन्दी",
    "I'm sure they'll've done it; DON'T SHOUT. 'S 'T",
    '<html><body class="x">&amp; &lt;tag&gt;</body></html>',
    "a\u00a0b\u2009c\u3000d\u200be",
    "x" * 50 + " " + "9" * 25,
)


def _vocab_path(name: str) -> Path:
    return DATA / "vocab" / f"ggml-vocab-{name}.gguf"


def _llama_cpp_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's tests/test-tokenizer-0.cpp format: the .inp texts end with a marker line each, the .out has a line
    of ids per text (tokenized without BOS, special tokens not parsed; none of the texts holds one)."""
    path = _vocab_path(name)
    raw = Path(f"{path}.inp").read_bytes().decode("utf-8")  # bytes: keep any '\r' as it is
    texts = raw.split("\n__ggml_vocab_test__\n")
    if texts[-1] == "":
        texts.pop()
    lines = Path(f"{path}.out").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(texts)
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]


@pytest.fixture(scope="module")
def ours() -> dict[str, Tokenizer]:
    return {name: load_tokenizer(_vocab_path(name)) for name in VOCABS}


@pytest.fixture(scope="module")
def theirs() -> dict[str, Any]:
    """transformers' conversion of the same files (its backend `tokenizers.Tokenizer`: AutoTokenizer around it takes
    ~20 s a vocabulary here, this ~2 s)."""
    gguf = import_or_skip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    converted = {}
    for name in VOCABS:
        architecture, tokenizer_dict, _ = gguf.get_gguf_tokenizer(str(_vocab_path(name)))
        converted[name], _ = gguf.convert_gguf_tokenizer(architecture, tokenizer_dict)
    return converted


# ---- ids ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", VOCABS)
def test_ids_match_llama_cpp(ours: dict[str, Tokenizer], name: str) -> None:
    for text, ids in _llama_cpp_cases(name):
        assert ours[name].encode(text) == ids, text


@pytest.mark.parametrize("name", VOCABS)
def test_ids_match_transformers(ours: dict[str, Tokenizer], theirs: dict[str, Any], name: str) -> None:
    for text in TEXTS:
        assert ours[name].encode(text) == theirs[name].encode(text, add_special_tokens=False).ids, text


# Where transformers' conversion and llama.cpp disagree, llama.cpp is the reference (pacer follows it):
# - SentencePiece: transformers uses Metaspace, which adds no '▁' before a text that starts with a space; llama.cpp
#   (like sentencepiece itself, and Llama 2's own tokenizer.json: Prepend + Replace) does: ' Hello' -> '▁▁Hello'.
# - Llama 3: transformers leaves out `ignore_merges`, which Llama 3's tokenizer.json and llama.cpp both set, so a word
#   that is a token but not reachable by the merges is split.
KNOWN_TRANSFORMERS_DIFFERENCES = {
    "llama-spm": lambda text: text.startswith(" "),
    "llama-bpe": lambda text: text == "Cửa Việt",
    "qwen2": lambda text: False,
}


@pytest.mark.parametrize("name", VOCABS)
def test_transformers_differs_from_llama_cpp_only_where_known(theirs: dict[str, Any], name: str) -> None:
    cases = _llama_cpp_cases(name)
    differ = [text for text, ids in cases if theirs[name].encode(text, add_special_tokens=False).ids != ids]
    assert differ == [text for text, _ in cases if KNOWN_TRANSFORMERS_DIFFERENCES[name](text)]


@pytest.mark.parametrize("name", VOCABS)
def test_decode_returns_the_text(ours: dict[str, Tokenizer], name: str) -> None:
    """Lossless: no clean-up of spaces, SentencePiece's prefix space taken off once, byte tokens joined."""
    tokenizer = ours[name]
    for text in [*TEXTS, *(text for text, _ in _llama_cpp_cases(name))]:
        assert tokenizer.decode(tokenizer.encode(text)) == text


@pytest.mark.parametrize("name", VOCABS)
def test_incremental_decode_of_slices_matches_full_decode(ours: dict[str, Tokenizer], name: str) -> None:
    """The detokenizer's prefix/read windows: SentencePiece's decoder strips a leading space from every window, so the
    deltas only add up because both windows of a step start at the same token."""
    tokenizer = ours[name]
    ids = tokenizer.encode("Olá, café ☕ déjà vu 🤗  naïve — fin.\n  你好")
    assert incremental_text(tokenizer, ids) == tokenizer.decode(ids)


@pytest.mark.parametrize(
    ("name", "bos", "eos", "adds_bos"),
    [
        ("llama-bpe", "<|begin_of_text|>", "<|end_of_text|>", True),  # llama.cpp's default for Llama 3 vocabularies
        ("qwen2", "<|endoftext|>", "<|endoftext|>", False),
        ("llama-spm", "<s>", "</s>", True),  # and for SentencePiece
    ],
)
def test_special_tokens_and_default_bos(
    ours: dict[str, Tokenizer], name: str, bos: str, eos: str, adds_bos: bool
) -> None:
    tokenizer = ours[name]
    assert (tokenizer.bos_token, tokenizer.eos_token) == (bos, eos)
    ids = tokenizer.encode("Hello")
    assert tokenizer.encode("Hello", add_special_tokens=True) == ([tokenizer.bos_token_id] if adds_bos else []) + ids
    assert tokenizer.encode(f"{bos}Hello{eos}") == [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    assert tokenizer.decode(tokenizer.encode(f"{bos}Hello{eos}")) == "Hello"


def test_sentencepiece_text_after_a_special_token_gets_the_prefix_space(ours: dict[str, Tokenizer]) -> None:
    """llama.cpp starts every run of text after a special token with a space (`is_prev_special`), as Llama 2's chat
    format expects: '<s>[INST]' is <s> '▁[', not <s> '['."""
    tokenizer = ours["llama-spm"]
    assert tokenizer.encode("<s>[INST] Hi [/INST]") == [1, *tokenizer.encode("[INST] Hi [/INST]")]
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("<s>[INST]"))[:2] == ["<s>", "▁["]
    assert tokenizer.encode("<unk>") == [0]  # llama.cpp matches the unknown token in text too


def test_sentencepiece_respects_add_space_prefix_false() -> None:
    metadata = GGUFFile(_vocab_path("llama-spm")).metadata | {"tokenizer.ggml.add_space_prefix": False}
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("Hello world")) == ["Hello", "▁world"]
    assert tokenizer.decode(tokenizer.encode(" Hello world")) == " Hello world"


def test_saved_sentencepiece_tokenizer_reads_back_the_same(ours: dict[str, Tokenizer], tmp_path: Path) -> None:
    """What a checkpoint export writes (tokenizer.json: normalizer, byte fallback, decoder) and vLLM or transformers
    read back."""
    transformers = import_or_skip("transformers")
    tokenizer = ours["llama-spm"]
    tokenizer.save(tmp_path)
    reloaded, hf = Tokenizer.from_directory(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [*TEXTS, " Hello", "<s>[INST] hi [/INST]"]:
        ids = tokenizer.encode(text)
        assert reloaded.encode(text) == hf(text, add_special_tokens=False).input_ids == ids, text
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), text
    assert hf("Hi").input_ids == tokenizer.encode("Hi", add_special_tokens=True)


@pytest.mark.parametrize("name", VOCABS)
def test_no_token_stands_for_more_characters_than_max_token_chars(ours: dict[str, Tokenizer], name: str) -> None:
    """SentencePiece's '▁' and byte tokens ('<0xE2>': 6 characters, less than one of text) keep the bound, and its
    normalizer (a '▁' before, '▁' for ' ') never shortens the text, so no margin is needed."""
    tokenizer = ours[name]
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    assert tokenizer.max_token_chars == max(map(len, vocab))
    texts = tokenizer.backend.decode_batch([[i] for i in range(tokenizer.vocab_size)], skip_special_tokens=False)
    assert max(map(len, texts)) <= tokenizer.max_token_chars
    for text in TEXTS:
        assert len(tokenizer.encode(text)) * tokenizer.max_token_chars >= len(text)


# ---- chat templates ----------------------------------------------------------------------------------------------

# Template file (tests/data/templates) -> the vocabulary whose special tokens it is rendered with.
TEMPLATES = {
    "meta-llama-Llama-3.1-8B-Instruct": "llama-bpe",
    "meta-llama-Llama-3.2-3B-Instruct": "llama-bpe",
    "Qwen-Qwen2.5-7B-Instruct": "qwen2",
    "Qwen-Qwen3-0.6B": "qwen2",
    "mistralai-Mistral-Nemo-Instruct-2407": "llama-spm",
    "google-gemma-2-2b-it": "llama-spm",
}

SYSTEM = {"role": "system", "content": "You are terse. Answer in one line."}
CONVERSATIONS = {
    "system+user": [SYSTEM, {"role": "user", "content": "What is 2+2?"}],
    "multi-turn": [
        {"role": "user", "content": "Bonjour ! Quelle heure est-il ? 🕰️"},
        {"role": "assistant", "content": "<think>\nNo clock here.\n</think>\n\nJe ne sais pas."},
        {"role": "user", "content": "你好，再试一次。\n\n  indented"},
    ],
    "system+multi-turn": [
        SYSTEM,
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "bye!"},
    ],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def _render_like_transformers(
    tokenizer: Tokenizer, template: str, messages: list[dict], add_generation_prompt: bool, tools: list | None
) -> str:
    utils = import_or_skip("transformers.utils.chat_template_utils")
    specials = {f"{role}_token": getattr(tokenizer, f"{role}_token") for role in ("bos", "eos", "unk", "pad")}
    (rendered,), _ = utils.render_jinja_template(
        [messages], tools=tools, chat_template=template, add_generation_prompt=add_generation_prompt,
        **{key: value for key, value in specials.items() if value is not None},
    )
    return rendered


@pytest.mark.parametrize("tools", [None, TOOLS], ids=["no-tools", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "no-gen"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("template_name", TEMPLATES)
def test_chat_template_renders_like_transformers(
    ours: dict[str, Tokenizer], theirs: dict[str, Any], template_name: str, conversation: str,
    add_generation_prompt: bool, tools: list | None,
) -> None:
    """Same text, or the same error where the template refuses (Gemma 2 has no system role); for the byte-level
    vocabularies the same ids too, special tokens parsed."""
    vocab = TEMPLATES[template_name]
    template = (DATA / "templates" / f"{template_name}.jinja").read_text(encoding="utf-8")
    tokenizer = dataclasses.replace(ours[vocab], chat_template=template)
    messages = CONVERSATIONS[conversation]
    try:
        expected = _render_like_transformers(tokenizer, template, messages, add_generation_prompt, tools)
    except jinja2.TemplateError as error:
        with pytest.raises(jinja2.TemplateError, match=re.escape(str(error))):
            tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        return
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    assert prompt == expected
    if vocab in BYTE_LEVEL:
        assert tokenizer.encode(prompt) == theirs[vocab].encode(prompt, add_special_tokens=False).ids
