"""Text <-> token ids and chat prompts, on the Rust `tokenizers` backend.

Built from a GGUF file's `tokenizer.ggml.*` metadata or from a Hugging Face directory, so serving
never needs `transformers`; the chat template renders the way `transformers` renders it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

_SPECIAL_ROLES = ("bos", "eos", "unk", "pad")

# Our special-token role -> the word llama.cpp uses in `tokenizer.ggml.{word}_token_id`.
_GGUF_SPECIAL_KEYS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}

# llama.cpp's `tokenizer.ggml.token_type` values (llama_token_type).
_TOKEN_TYPE_NORMAL = 1
_TOKEN_TYPE_UNKNOWN = 2
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# SentencePiece writes a space as U+2581 in its pieces.
_SPM_SPACE = "\u2581"

# The split rules of Llama 3's and Qwen2's tokenizer.json, which llama.cpp rewrites without `(?i:...)` (its regex
# engine lacks it); we keep the original, as the models were trained with it.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # SmolLM's tokenizer.json (and llama.cpp's "smollm" pre-type) isolate every digit first.
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_pre_tokenizer()]
    )


def _split_pre_tokenizer(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Split by the model's regex, then map bytes to GPT-2's alphabet without splitting again."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@dataclass(frozen=True)
class _PreType:
    """How llama.cpp runs one `tokenizer.ggml.pre` value (`llama_vocab::impl::load`)."""

    pre_tokenizer: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # a word that is itself a token stays whole (Llama 3's tokenizer.json says so too)
    add_bos: bool = False  # llama.cpp's default where the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = _PreType(partial(_split_pre_tokenizer, _LLAMA3_SPLIT), ignore_merges=True, add_bos=True)
_QWEN2 = _PreType(partial(_split_pre_tokenizer, _QWEN2_SPLIT))

# `tokenizer.ggml.pre` -> how the text is split before BPE. Only byte-level vocabularies whose split rule we know
# exactly, under every name llama.cpp maps to that very rule and flags; guessing would tokenize differently from
# training without any error.
_GGUF_PRE_TYPES = {
    "gpt-2": _PreType(_gpt2_pre_tokenizer),
    "smollm": _PreType(_smollm_pre_tokenizer),
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano"),
        _LLAMA3,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2),
}


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template that serving needs.

    Special tokens are kept as strings (what chat templates see); their ids come from the vocab,
    and a special token missing from the vocab is an error at construction.
    """

    backend: Backend = field(repr=False)
    bos_token: str | None = None
    eos_token: str | None = None
    unk_token: str | None = None
    pad_token: str | None = None
    chat_template: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for role in _SPECIAL_ROLES:
            token = getattr(self, f"{role}_token")
            if token is not None and self.backend.token_to_id(token) is None:
                raise ValueError(f"{role}_token {token!r} is not in the vocabulary")

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes and tokenize as llama.cpp does: byte-level BPE
        (`tokenizer.ggml.model` 'gpt2', tokens already in GPT-2's byte alphabet as in tokenizer.json) or
        SentencePiece BPE ('llama': merges by score, '▁' for a space, bytes for unknown characters)."""
        kind = metadata.get("tokenizer.ggml.model")
        if kind == "gpt2":
            backend, add_bos = _byte_level_backend(metadata)
        elif kind == "llama":
            backend, add_bos = _sentencepiece_backend(metadata)
        else:
            raise ValueError(
                f"GGUF tokenizer.ggml.model={kind!r} is not supported; only byte-level BPE ('gpt2') and "
                "SentencePiece BPE ('llama')"
            )
        tokens: list[str] = metadata["tokenizer.ggml.tokens"]

        # Control tokens (<|im_start|>...) must never be split by BPE nor merged with their neighbours; llama.cpp
        # matches the unknown token (<unk>) in text the same way.
        token_types = metadata.get("tokenizer.ggml.token_type") or []
        special = [t for t, k in zip(tokens, token_types) if k in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_UNKNOWN)]
        user = [t for t, k in zip(tokens, token_types) if k == _TOKEN_TYPE_USER_DEFINED]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

        ids = {role: metadata.get(f"tokenizer.ggml.{key}_token_id") for role, key in _GGUF_SPECIAL_KEYS.items()}
        specials = {f"{role}_token": None if i is None else tokens[i] for role, i in ids.items()}
        if metadata.get("tokenizer.ggml.add_bos_token", add_bos) and ids["bos"] is not None:
            # Only used by encode(add_special_tokens=True): chat prompts get BOS from the template.
            bos = tokens[ids["bos"]]
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])]
            )
        return cls(backend, chat_template=metadata.get("tokenizer.chat_template"), **specials)

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` + `tokenizer_config.json` (and `chat_template.jinja`, where
        transformers >= 4.47 saves the template) from a Hugging Face-style directory."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found; only fast tokenizers are supported")
        backend = Backend.from_file(str(tokenizer_file))
        config = _read_json(path / "tokenizer_config.json")
        special_map = _read_json(path / "special_tokens_map.json")
        specials = {
            f"{role}_token": _token_content(config.get(f"{role}_token", special_map.get(f"{role}_token")))
            for role in _SPECIAL_ROLES
        }
        template_file = path / "chat_template.jinja"
        chat_template = (
            template_file.read_text(encoding="utf-8")
            if template_file.is_file()
            else _default_template(config.get("chat_template"))
        )
        return cls(backend, chat_template=chat_template, **specials)

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json that transformers and vLLM both load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            # "Use tokenizer.json as is": the GGUF-derived pipeline has no slow-tokenizer equivalent.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
            **{f"{role}_token": getattr(self, f"{role}_token") for role in _SPECIAL_ROLES},
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        text = json.dumps(config, indent=2, ensure_ascii=False)
        (directory / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")

    # ---- ids ----------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @cached_property
    def all_special_ids(self) -> frozenset[int]:
        return frozenset(
            token_id
            for token_id, added in self.backend.get_added_tokens_decoder().items()
            if added.special
        )

    @cached_property
    def max_token_chars(self) -> int:
        """At least as many characters as any token stands for, so a text of n characters has at least
        n / max_token_chars tokens: a bound on a prompt's length before it is tokenized. A vocabulary string has a
        character per byte (byte-level BPE) or per character (SentencePiece: '▁' for a space, six for a byte
        fallback token '<0xE2>' that stands for less than one), never fewer. SentencePiece's normalizer only adds
        a '▁' and swaps ' ' for '▁', so the text tokenized is no shorter than the text given; other normalizers may
        compose characters (NFC: up to 3 into 1), hence the margin then."""
        longest = max(map(len, self.backend.get_vocab(with_added_tokens=True)))
        normalizer = self.backend.normalizer
        never_shortens = normalizer is None or _never_shortens(json.loads(normalizer.__getstate__()))
        return longest if never_shortens else 4 * longest

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # ---- text <-> ids -------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """As `encode`, but the backend lets go of the GIL while it works (its `encode` holds it), so a thread can
        tokenize a long text while the event loop serves on."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Cost is linear in `len(ids)`, so incremental detokenizers can decode short windows
        (vLLM's prefix/read offsets) every step."""
        ids = ids if isinstance(ids, list) else list(ids)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """Vocabulary strings (byte-level alphabet, e.g. 'Ġthe'), not decoded text."""
        return [self.backend.id_to_token(i) for i in ids]

    # ---- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Render like transformers' `apply_chat_template(..., tokenize=False)`: same Jinja
        environment, same variables (special tokens as strings, overridable by kwargs)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template; send a plain completion instead")
        variables = {
            f"{role}_token": getattr(self, f"{role}_token")
            for role in _SPECIAL_ROLES
            if getattr(self, f"{role}_token") is not None
        }
        variables.update(template_kwargs)
        return _compile_chat_template(self.chat_template).render(
            messages=[dict(message) for message in messages],
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )


# ---- helpers -----------------------------------------------------------------------------------


def _byte_level_backend(metadata: Mapping[str, Any]) -> tuple[Backend, bool]:
    """The BPE model and split rule of a 'gpt2' vocabulary, and whether llama.cpp adds BOS by default."""
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in _GGUF_PRE_TYPES:
        raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known: {sorted(_GGUF_PRE_TYPES)}")
    pre_type = _GGUF_PRE_TYPES[pre]
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    # gguf's writer drops an empty array, so a vocabulary without merges (bytes only) has no key at all.
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre_type.ignore_merges))
    backend.pre_tokenizer = pre_type.pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    return backend, pre_type.add_bos


def _sentencepiece_backend(metadata: Mapping[str, Any]) -> tuple[Backend, bool]:
    """llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm_session`) as a BPE model: start from characters and
    merge the adjacent pair whose joined piece scores highest, which is BPE with merges ranked by that score. A
    character outside the vocabulary becomes its UTF-8 bytes (<0xE2>...). Spaces are written '▁', and each run of
    text, the first or one after a special token, gets a leading space (`add_space_prefix`, true unless the file
    says otherwise), which decoding takes off again. llama.cpp adds BOS by default."""
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    scores: list[float] | None = metadata.get("tokenizer.ggml.scores")
    if scores is None:
        raise ValueError("GGUF SentencePiece vocabulary ('llama') without tokenizer.ggml.scores")
    token_types = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_TYPE_NORMAL] * len(tokens)
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    vocab = {t: i for i, t in enumerate(tokens)}
    # No fuse_unk: one <unk> per unknown character (when a byte token is missing), as llama.cpp, so that no token
    # stands for more characters than its own (max_token_chars).
    model = models.BPE(
        vocab=vocab,
        merges=_merges_by_score(tokens, scores, token_types),
        unk_token=None if unk_id is None else tokens[unk_id],
        byte_fallback=True,
    )
    backend = Backend(model)
    escape = normalizers.Replace(" ", _SPM_SPACE)
    decode = [decoders.Replace(_SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if metadata.get("tokenizer.ggml.add_space_prefix", True):
        # A normalizer, not Metaspace: tokenizers normalizes each run between added tokens on its own, and
        # Metaspace would not add '▁' before a run that starts with a space (llama.cpp: ' hi' -> '▁▁hi').
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPM_SPACE), escape])
        decode.append(decoders.Strip(" ", 1, 0))
    else:
        backend.normalizer = escape
    backend.decoder = decoders.Sequence(decode)
    return backend, True


def _merges_by_score(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """Every split of a normal token into two normal tokens, best-scoring joined piece first (ties: lower id)."""
    normal = {t for t, k in zip(tokens, token_types) if k == _TOKEN_TYPE_NORMAL}
    ranked = [
        (-scores[i], i, token[:cut], token[cut:])
        for i, (token, kind) in enumerate(zip(tokens, token_types))
        if kind == _TOKEN_TYPE_NORMAL
        for cut in range(1, len(token))
        if token[:cut] in normal and token[cut:] in normal
    ]
    ranked.sort(key=lambda merge: merge[:2])
    return [(left, right) for _, _, left, right in ranked]


def _never_shortens(normalizer: dict[str, Any]) -> bool:
    """Whether a normalizer (as tokenizers serializes it) only adds characters or swaps one for one."""
    kind = normalizer["type"]
    if kind == "Sequence":
        return all(map(_never_shortens, normalizer["normalizers"]))
    if kind == "Replace":
        return len(normalizer["pattern"].get("String", "")) == 1 and len(normalizer["content"]) >= 1
    return kind == "Prepend"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(token: str | dict[str, Any] | None) -> str | None:
    """tokenizer_config.json stores a special token as a string or as a serialized AddedToken."""
    return token["content"] if isinstance(token, dict) else token


def _default_template(template: str | list[dict[str, str]] | None) -> str | None:
    """Some repos ship several named templates; the one named 'default' is for chat."""
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template}
        return named.get("default")
    return template


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (transformers' assistant-mask markers)
    and render the body unchanged: we never need the mask, but templates that use it must parse."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes '<' and '&', which would change the prompt.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@cache
def _compile_chat_template(template: str) -> jinja2.Template:
    # Templates come from model files, i.e. untrusted: sandboxed and immutable, as transformers does.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
