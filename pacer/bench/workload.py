"""What `pacer bench` sends: when each request goes (Poisson, gamma, closed loop, trace replay), how long its
prompt and output are (fixed, uniform, a mix of ranges, trace; traces are read by trace.py), and a prompt text of
exactly that many tokens.
"""

from __future__ import annotations

import itertools
import math
import re
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from pacer.bench.metrics import parse_slo_classes
from pacer.bench.trace import FORMATS, TraceRecord, read_trace, turn_gaps

ARRIVALS = ("poisson", "gamma", "concurrency", "trace")
LENGTHS = ("fixed", "uniform", "mix", "trace")
THINK_TIMES = ("exponential", "trace")
MOONCAKE_BLOCK_TOKENS = 512  # tokens per hash id in the Mooncake traces (FAST'25 release README)

# ---- configuration and requests ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadConfig:
    """A benchmark workload, reproducible from its fields (the seed included); checked on construction. Fields that
    the chosen modes do not use (rate in closed loop, time_scale without trace arrivals) are ignored."""

    num_requests: int = field(default=100, metadata={"help": "requests in the run"})
    arrival: str = field(default="poisson", metadata={
        "help": "poisson and gamma: open loop at --rate; concurrency: closed loop, --concurrency in flight; "
                "trace: replay the trace's timestamps (x --time-scale)", "choices": ARRIVALS})
    rate: float = field(default=1.0, metadata={"help": "requests/s for poisson and gamma arrivals"})
    cv: float = field(default=1.0, metadata={
        "help": "gamma arrivals: coefficient of variation of the gaps (1 = Poisson, > 1 burstier)"})
    concurrency: int = field(default=8, metadata={"help": "closed loop: requests in flight"})
    lengths: str = field(default="fixed", metadata={
        "help": "fixed: --prompt-tokens/--output-tokens; uniform: drawn from [min, max]; mix: from --length-mix; "
                "trace: from --trace (x --length-scale)", "choices": LENGTHS})
    prompt_tokens: int = field(default=128, metadata={"help": "prompt tokens (fixed), or the most (uniform)"})
    output_tokens: int = field(default=128, metadata={"help": "max_tokens (fixed), or the most (uniform)"})
    prompt_tokens_min: int = field(default=1, metadata={"help": "uniform lengths: fewest prompt tokens"})
    output_tokens_min: int = field(default=1, metadata={"help": "uniform lengths: fewest output tokens"})
    length_mix: str | None = field(default=None, metadata={
        "help": "--lengths mix: SHARE:PROMPT:OUTPUT,... (each length N or MIN-MAX): each request draws a component by "
                "share (seeded), then its lengths uniformly from that component's ranges; e.g. chat with some long "
                "documents: 0.9:64-1024:32-512,0.1:6144-7936:64-256"})
    trace: str | None = field(default=None, metadata={
        "help": "trace file for --arrival trace or --lengths trace (the first --num-requests records are used), or "
                "--think-times trace"})
    trace_format: str | None = field(default=None, metadata={
        "help": "trace format (default: detected from the first line)", "choices": FORMATS})
    trace_sample: bool = field(default=False, metadata={
        "help": "--lengths trace: draw the records at random (seeded, with replacement) instead of taking the first "
                "--num-requests in order, for runs longer than the trace (not with --arrival trace)"})
    time_scale: float = field(default=1.0, metadata={
        "help": "trace timestamps are multiplied by this (0.5 replays twice as fast)"})
    length_scale: float = field(default=1.0, metadata={
        "help": "trace lengths (and Mooncake's 512-token blocks) are multiplied by this, rounded, at least 1"})
    system_prompt_tokens: int = field(default=0, metadata={
        "help": "every prompt opens with the same text of this many tokens (a shared system prompt, counted in the "
                "prompt's length; seeded, so another seed gives another system prompt)"})
    turns: int = field(default=1, metadata={
        "help": "multi-turn conversations of this many requests: each arrival (or closed-loop slot) opens one, and "
                "turn k+1 is sent after turn k's answer and a think time, with turn k's prompt, its answer and a "
                "new user message as its prompt (the message's and answer's lengths drawn as a single request's, "
                "capped so the last turn fits max_model_len). --rate counts conversations; --num-requests, turns"})
    think_time_s: float = field(default=0.0, metadata={
        "help": "multi-turn: mean think time between an answer and the next message"})
    think_times: str = field(default="exponential", metadata={
        "help": "multi-turn: how think times spread around their mean (seeded): exponential, or trace: as the gaps "
                "between the turns of a conversation in --trace (Mooncake: a request and the later one whose prompt "
                "extends its blocks), drawn at random and scaled to a mean of --think-time-s, so the trace's spread "
                "holds at this machine's time scale", "choices": THINK_TIMES})
    max_model_len: int = field(default=2048, metadata={
        "help": "prompt + output are capped to this, prompt first (at least 1 prompt token is kept)"})
    seed: int = field(default=0, metadata={"help": "seed for arrivals, lengths and prompt text"})
    slo_classes: str | None = field(default=None, metadata={
        "help": "SLO classes NAME:SHARE:TTFT_MS:TBT_MS,... (e.g. interactive:0.3:1000:200,batch:0.7:20000:1000): "
                "each request draws one (seeded) and is sent and judged with its class's SLO instead of --slo-*"})

    def __post_init__(self) -> None:
        for name in ("num_requests", "concurrency", "prompt_tokens", "output_tokens", "prompt_tokens_min",
                     "output_tokens_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("rate", "cv", "time_scale", "length_scale"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if self.lengths not in LENGTHS:
            raise ValueError(f"lengths must be one of {', '.join(LENGTHS)}, got {self.lengths!r}")
        if self.prompt_tokens_min > self.prompt_tokens:
            raise ValueError(f"prompt_tokens_min ({self.prompt_tokens_min}) exceeds prompt_tokens "
                             f"({self.prompt_tokens})")
        if self.output_tokens_min > self.output_tokens:
            raise ValueError(f"output_tokens_min ({self.output_tokens_min}) exceeds output_tokens "
                             f"({self.output_tokens})")
        if self.trace is None and "trace" in (self.arrival, self.lengths):
            raise ValueError(f"trace must be set for arrival={self.arrival!r}, lengths={self.lengths!r}")
        if self.trace_sample and self.arrival == "trace":
            raise ValueError("trace_sample draws lengths at random, so it cannot replay the trace's arrivals")
        if self.trace_format is not None and self.trace_format not in FORMATS:
            raise ValueError(f"trace_format must be one of {', '.join(FORMATS)} or None, got {self.trace_format!r}")
        if (self.lengths == "mix") != (self.length_mix is not None):
            raise ValueError(f"length_mix must be set exactly when lengths='mix', got lengths={self.lengths!r}, "
                             f"length_mix={self.length_mix!r}")
        parse_length_mix(self.length_mix)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        if self.system_prompt_tokens < 0:
            raise ValueError(f"system_prompt_tokens must be >= 0, got {self.system_prompt_tokens}")
        if not 1 <= self.turns <= self.max_model_len // 2:
            raise ValueError(f"turns must be from 1 to max_model_len / 2, got {self.turns}")
        if not (math.isfinite(self.think_time_s) and self.think_time_s >= 0):
            raise ValueError(f"think_time_s must be a finite number >= 0, got {self.think_time_s}")
        if self.think_times not in THINK_TIMES:
            raise ValueError(f"think_times must be one of {', '.join(THINK_TIMES)}, got {self.think_times!r}")
        if self.think_times == "trace" and (self.trace is None or not self.think_time_s):
            raise ValueError("think_times='trace' needs a trace and think_time_s > 0 (the mean it is scaled to)")
        parse_slo_classes(self.slo_classes)


@dataclass(frozen=True)
class LengthRange:
    """One component of a length mix: its share of the requests, and the [min, max] of its prompt and output."""

    share: float
    prompt: tuple[int, int]
    output: tuple[int, int]


def parse_length_mix(text: str | None) -> tuple[LengthRange, ...]:
    """'0.9:64-1024:32-512,0.1:6144-7936:64-256' (SHARE:PROMPT:OUTPUT, each length N or MIN-MAX)."""
    if not text:
        return ()
    mix = []
    for item in text.split(","):
        component = _length_component(item)
        if component is None:
            raise ValueError(f"length_mix: a component is SHARE:PROMPT:OUTPUT with a share in (0, 1] and lengths N or "
                             f"MIN-MAX of at least 1, got {item!r}")
        mix.append(component)
    if abs(sum(c.share for c in mix) - 1) > 1e-6:
        raise ValueError(f"length_mix shares must add up to 1, got {sum(c.share for c in mix):g}")
    return tuple(mix)


def _length_component(item: str) -> LengthRange | None:
    """One SHARE:PROMPT:OUTPUT component, or None if it is malformed."""
    parts = item.strip().split(":")
    if len(parts) != 3:
        return None
    try:
        share = float(parts[0])
        (prompt_min, _, prompt_max), (output_min, _, output_max) = (part.partition("-") for part in parts[1:])
        prompt = int(prompt_min), int(prompt_max or prompt_min)
        output = int(output_min), int(output_max or output_min)
    except ValueError:
        return None
    if not 0 < share <= 1 or min(*prompt, *output) < 1 or prompt[0] > prompt[1] or output[0] > output[1]:
        return None
    return LengthRange(share, prompt, output)


@dataclass(frozen=True)
class BenchRequest:
    """One request to send. `len(tokenizer.encode(prompt)) == num_prompt_tokens` for the tokenizer it was built
    with, and num_prompt_tokens + max_tokens <= the config's max_model_len."""

    index: int
    arrival_s: float | None  # send time, seconds from the start of the run; None in closed loop
    prompt: str
    num_prompt_tokens: int
    max_tokens: int
    slo_class: str | None = None
    # Multi-turn: a turn > 0 continues the request before it (index - 1), `think_s` after that one's answer, and
    # its prompt is only the new user message; the client puts the conversation so far in front of it.
    turn: int = 0
    think_s: float = 0.0


class TokenizerLike(Protocol):
    """What the workload needs of `pacer.model.tokenizer.Tokenizer`."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def all_special_ids(self) -> frozenset[int]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


def build_workload(config: WorkloadConfig, tokenizer: TokenizerLike) -> list[BenchRequest]:
    """The same config and tokenizer always give the same list. Trace records are used in order from the first;
    a trace shorter than num_requests is an error (cycling would invent arrivals and repeat prompts)."""
    records = _records(config)
    arrivals = _arrivals(config, records)
    lengths = _lengths(config, records)
    use_blocks = config.lengths == "trace" and records is not None
    builder = _PromptBuilder(_words(tokenizer), config.seed, max(1, round(MOONCAKE_BLOCK_TOKENS * config.length_scale)))
    turns = conversation_turns(config)
    word_ids = [builder.word_ids(i, prompt, records[i].hash_ids if use_blocks and not turn else ())
                for i, ((prompt, _), (turn, _)) in enumerate(zip(lengths, turns))]
    if config.system_prompt_tokens:  # in front of a conversation's first message only: later turns extend it
        system = _system_prompt(config, len(builder.words))
        word_ids = [ids if turn else np.concatenate((system, ids))[:len(ids)]
                    for ids, (turn, _) in zip(word_ids, turns)]
    prompts = _verified_prompts(builder, word_ids, tokenizer)
    return [BenchRequest(i, arrival, prompt, num_prompt_tokens, max_tokens, slo_class, turn, think_s)
            for i, (arrival, prompt, (num_prompt_tokens, max_tokens), slo_class, (turn, think_s))
            in enumerate(zip(arrivals, prompts, lengths, _slo_classes(config), turns))]


def request_timings(config: WorkloadConfig) -> list[tuple[float | None, int, int, str | None]]:
    """(send time, prompt tokens, max_tokens, SLO class) of each request, exactly as `build_workload` gives
    them, without the prompt text: what the simulator needs, at any trace size (with `conversation_turns`)."""
    records = _records(config)
    return [(arrival, prompt, output, slo_class) for arrival, (prompt, output), slo_class
            in zip(_arrivals(config, records), _lengths(config, records), _slo_classes(config))]


def conversation_turns(config: WorkloadConfig) -> list[tuple[int, float]]:
    """(turn, think time in s) of each request: request i is turn i % turns of conversation i // turns; a
    conversation's first turn has no think time."""
    rng = np.random.default_rng([config.seed, 6])  # its own stream: arrivals and lengths stay put
    if config.think_times == "trace":
        gaps = np.array(turn_gaps(read_trace(config.trace, config.trace_format)))
        if not gaps.size or not gaps.mean() > 0:
            raise ValueError(f"trace {config.trace} has no conversations to take think times from (it needs "
                             "Mooncake's hash_ids and timestamps)")
        think = rng.choice(gaps, config.num_requests) * (config.think_time_s / gaps.mean())
    elif config.think_time_s:
        think = rng.exponential(config.think_time_s, config.num_requests)
    else:
        think = np.zeros(config.num_requests)
    return [(i % config.turns, float(think[i]) if i % config.turns else 0.0) for i in range(config.num_requests)]


def shared_prefixes(config: WorkloadConfig) -> list[tuple[int, ...]]:
    """Per request, the head of its prompt that other requests share, as token stand-ins (word ids, one token each,
    built as `build_workload` builds the prompts): the system prompt, then a trace's blocks up to the first one no
    other request names. The simulator's prompts begin with these, so its prefix cache finds what a server's
    would; without a tokenizer, at any trace size."""
    records = _records(config)
    lengths = _lengths(config, records)
    heads: list[tuple[int, ...]] = [()] * len(lengths)  # a later turn's history is the simulator's to add
    turns = conversation_turns(config)
    if config.lengths == "trace" and records is not None and any(r.hash_ids for r in records):
        builder = _PromptBuilder(np.arange(_MAX_WORDS), config.seed,
                                 max(1, round(MOONCAKE_BLOCK_TOKENS * config.length_scale)))
        named = Counter(h for r in records for h in r.hash_ids)
        for i, (record, (prompt, _), (turn, _)) in enumerate(zip(records, lengths, turns)):
            shared = list(itertools.takewhile(lambda h: named[h] > 1, record.hash_ids))
            if shared and not turn:
                heads[i] = tuple(_INTS[w] for w in builder._blocks(np.array(shared, dtype=np.uint64)).ravel()[:prompt])
    if config.system_prompt_tokens:
        system = _system_prompt(config, _MAX_WORDS)
        heads = [head if turn else tuple(_INTS[w] for w in system[:prompt]) + head[:max(0, prompt - len(system))]
                 for head, (prompt, _), (turn, _) in zip(heads, lengths, turns)]
    return heads


def _system_prompt(config: WorkloadConfig, num_words: int) -> np.ndarray:
    """The word ids every prompt of the workload opens with: its own seeded stream."""
    return np.random.default_rng([config.seed, 5]).integers(0, num_words, config.system_prompt_tokens)


def _slo_classes(config: WorkloadConfig) -> list[str | None]:
    classes = parse_slo_classes(config.slo_classes)
    if not classes:
        return [None] * config.num_requests
    rng = np.random.default_rng([config.seed, 3])  # its own stream: arrivals and lengths stay put
    picks = rng.choice(len(classes), size=config.num_requests, p=[c.share for c in classes])
    return [classes[i].name for i in picks.tolist()]


def _records(config: WorkloadConfig) -> list[TraceRecord] | None:
    if "trace" not in (config.arrival, config.lengths):
        return None
    assert config.trace is not None  # __post_init__ checked
    records = read_trace(config.trace, config.trace_format)
    if config.trace_sample:
        rng = np.random.default_rng([config.seed, 2])  # its own stream, like the lengths'
        return [records[i] for i in rng.integers(0, len(records), config.num_requests)]
    if len(records) < config.num_requests:
        raise ValueError(f"num_requests={config.num_requests} but trace {config.trace} has only "
                         f"{len(records)} records")
    return records[:config.num_requests]


# ---- arrivals and lengths ---------------------------------------------------------------------------------------


def _arrivals(config: WorkloadConfig, records: list[TraceRecord] | None) -> list[float | None]:
    """Open-loop send times; the first request goes at 0 and gap i separates requests i and i + 1. With turns,
    conversation c opens at the c-th of these times and its later turns have none (they follow its answers)."""
    if config.turns > 1:
        starts = _arrivals(replace(config, turns=1), records)
        return [None if i % config.turns else starts[i // config.turns] for i in range(config.num_requests)]
    n = config.num_requests
    if config.arrival == "concurrency":
        return [None] * n
    if config.arrival == "trace":
        assert records is not None
        if records[0].timestamp_s is None:
            raise ValueError(f"arrival='trace' needs timestamps, and trace {config.trace} has none "
                             "(a length-only trace: use poisson or gamma arrivals)")
        return [record.timestamp_s * config.time_scale for record in records]  # type: ignore[operator]
    rng = np.random.default_rng(config.seed)
    if config.arrival == "poisson":
        gaps = rng.exponential(1.0 / config.rate, n)
    else:  # gamma: shape k = 1/cv^2 so that std/mean = cv; scale makes the mean 1/rate
        shape = 1.0 / config.cv**2
        gaps = rng.gamma(shape, 1.0 / (config.rate * shape), n)
    return np.concatenate(([0.0], np.cumsum(gaps[:-1]))).tolist()


def _lengths(config: WorkloadConfig, records: list[TraceRecord] | None) -> list[tuple[int, int]]:
    """(prompt tokens, max_tokens) per request, capped to max_model_len. Output 0 in a trace becomes 1."""
    n = config.num_requests
    if config.lengths == "fixed":
        raw = [(config.prompt_tokens, config.output_tokens)] * n
    elif config.lengths == "uniform":
        rng = np.random.default_rng([config.seed, 1])  # its own stream: arrivals stay put if lengths change
        prompts = rng.integers(config.prompt_tokens_min, config.prompt_tokens + 1, n)
        outputs = rng.integers(config.output_tokens_min, config.output_tokens + 1, n)
        raw = list(zip(prompts.tolist(), outputs.tolist()))
    elif config.lengths == "mix":
        raw = _mixed_lengths(parse_length_mix(config.length_mix), n, config.seed)
    else:
        assert records is not None
        scale = config.length_scale
        raw = [(max(1, round(r.prompt_tokens * scale)), max(1, round(r.output_tokens * scale))) for r in records]
    # a conversation's turns share the context: each gets an equal part, so its last turn fits
    return [_cap(prompt, output, config.max_model_len // config.turns) for prompt, output in raw]


def _mixed_lengths(mix: tuple[LengthRange, ...], n: int, seed: int) -> list[tuple[int, int]]:
    rng = np.random.default_rng([seed, 4])  # its own stream: arrivals stay put if the mix changes
    picks = rng.choice(len(mix), size=n, p=[c.share for c in mix])
    prompt_low, prompt_high, output_low, output_high = (np.array(bounds)[picks] for bounds in zip(
        *((c.prompt[0], c.prompt[1], c.output[0], c.output[1]) for c in mix)))
    prompts = rng.integers(prompt_low, prompt_high + 1)
    outputs = rng.integers(output_low, output_high + 1)
    return list(zip(prompts.tolist(), outputs.tolist()))


def _cap(prompt: int, output: int, max_model_len: int) -> tuple[int, int]:
    """Truncate the prompt first; only if even 1 prompt token does not fit is the output cut too."""
    prompt = min(prompt, max(1, max_model_len - output))
    return prompt, min(output, max_model_len - prompt)


# ---- prompt text ------------------------------------------------------------------------------------------------

_MAX_WORDS = 4096  # fewer words encode faster (BPE caches stay warm); 4096^2 distinct two-word openings
_INTS = tuple(range(_MAX_WORDS))  # one int object per word id, shared by every simulated prompt that holds it
_WORD = re.compile(r" [a-z]+")
_VERIFY_TOKENS = 250_000  # encode every prompt up to this many tokens in all (~0.5 s), else an even sample
_MAX_FIXES = 8
_WORD_CACHE: dict[int, tuple[weakref.ref, np.ndarray]] = {}


def _words(tokenizer: TokenizerLike) -> np.ndarray:
    """Vocabulary entries that are a space plus lowercase letters and encode back to exactly themselves, so a
    prompt of n such words is n tokens: a byte-level BPE pre-tokenizer splits before each space, so no merge
    crosses a word boundary. Checked here on all the words joined; cached per tokenizer."""
    cached = _WORD_CACHE.get(id(tokenizer))
    if cached is not None and cached[0]() is tokenizer:
        return cached[1]
    special = set(tokenizer.all_special_ids)
    found: list[tuple[int, str]] = []
    for token_id in range(tokenizer.vocab_size):
        text = "" if token_id in special else tokenizer.decode([token_id])
        if _WORD.fullmatch(text):
            found.append((token_id, text))
            if len(found) == _MAX_WORDS:
                break
    if tokenizer.encode("".join(text for _, text in found)) != [token_id for token_id, _ in found]:
        found = [(token_id, text) for token_id, text in found if tokenizer.encode(text) == [token_id]]
        if tokenizer.encode("".join(text for _, text in found)) != [token_id for token_id, _ in found]:
            found = []
    if len(found) < 2:
        raise ValueError("tokenizer has no words (a space + lowercase letters) that encode to one token each; "
                         "exact-length prompts need a byte-level BPE tokenizer (GPT-2, Llama 3, SmolLM, Qwen)")
    words = np.array([text for _, text in found], dtype=object)
    key = id(tokenizer)
    try:
        _WORD_CACHE[key] = (weakref.ref(tokenizer, lambda _: _WORD_CACHE.pop(key, None)), words)
    except TypeError:  # not weak-referenceable: no caching
        pass
    return words


class _PromptBuilder:
    """Prompts as word ids. Plain prompts open with two words spelling the request index in base len(words) (under
    a seeded permutation), so no two share even their first token (up to len(words) requests; prompts of >= 2
    tokens stay distinct up to len(words)^2), and continue with seeded random words.

    Mooncake prompts: block h is `block_tokens` words hashed from (seed, h), the same in every request naming h; the
    prompt is its blocks joined and cut to length (so a partial last block is a prefix of the full one, and
    requests sharing it share that much), then random words if the blocks run out (length rounding)."""

    def __init__(self, words: np.ndarray, seed: int, block_tokens: int) -> None:
        self.words = words
        self.block_tokens = block_tokens
        self.rng = np.random.default_rng([seed, 2])
        self.opening = self.rng.permutation(len(words))
        self.block_key = _mix(np.array([seed], dtype=np.uint64))
        self.block_offsets = np.arange(block_tokens, dtype=np.uint64) * _GOLDEN

    def word_ids(self, index: int, num_tokens: int, hash_ids: tuple[int, ...]) -> np.ndarray:
        num_words = len(self.words)
        if hash_ids:
            needed = np.array(hash_ids[:math.ceil(num_tokens / self.block_tokens)], dtype=np.uint64)
            head = self._blocks(needed).ravel()[:num_tokens]
        else:
            head = self.opening[[index % num_words, (index // num_words) % num_words]][:num_tokens]
        return np.concatenate((head, self.rng.integers(0, num_words, num_tokens - len(head))))

    def _blocks(self, hash_ids: np.ndarray) -> np.ndarray:
        """[len(hash_ids), block_tokens] word ids, a pure function of (seed, hash id, position): no state, so a
        block is the same in every request however the requests are ordered, and costs no per-block RNG."""
        keys = _mix(hash_ids ^ self.block_key)[:, None] + self.block_offsets
        return (_mix(keys) % np.uint64(len(self.words))).astype(np.int64)

    def text(self, word_ids: np.ndarray) -> str:
        return "".join(self.words[word_ids].tolist())


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2^64 / golden ratio


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele et al., OOPSLA'14): consecutive uint64 inputs -> uniform uint64 outputs.
    Array arithmetic wraps mod 2^64, as the algorithm wants."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _verified_prompts(builder: _PromptBuilder, word_ids: list[np.ndarray], tokenizer: TokenizerLike) -> list[str]:
    """Texts for the word ids, their token counts checked with the tokenizer: every prompt when that is cheap, else
    an evenly spaced sample (encoding 10k x 1000 tokens takes ~15 s); any miss and every prompt is checked and
    fixed. Fixing edits the end of the prompt, so it may cut into a shared Mooncake block: exactness wins."""
    texts = [builder.text(ids) for ids in word_ids]
    total = sum(len(ids) for ids in word_ids)
    step = max(1, math.ceil(total / _VERIFY_TOKENS))
    sample = range(0, len(texts), step)
    if step > 1 and all(len(tokenizer.encode(texts[i])) == len(word_ids[i]) for i in sample):
        return texts
    for i, (text, ids) in enumerate(zip(texts, word_ids)):
        texts[i] = _fit(builder, text, ids, tokenizer, i)
    return texts


def _fit(builder: _PromptBuilder, text: str, ids: np.ndarray, tokenizer: TokenizerLike, index: int) -> str:
    """Drop or add words at the end until the tokenizer counts exactly len(ids) tokens."""
    target = len(ids)
    for _ in range(_MAX_FIXES):
        count = len(tokenizer.encode(text))
        if count == target:
            return text
        if count > target:
            ids = ids[:max(1, len(ids) - (count - target))]
        else:
            ids = np.concatenate((ids, builder.rng.integers(0, len(builder.words), target - count)))
        text = builder.text(ids)
    raise RuntimeError(f"request {index}: could not build a prompt of exactly {target} tokens with this tokenizer")
