"""The nouns every package shares: a request, its sampling parameters, its SLO, its status."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

# Below this temperature sampling is greedy (as vLLM): logits / temperature overflows to inf long before it reaches 0.
GREEDY_TEMPERATURE = 1e-5
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes; a negative seed means seed mod 2**64


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued; holds no KV blocks
    RUNNING = "running"  # holds KV blocks; prefilling or decoding
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """OpenAI's `finish_reason` values."""

    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client gone or engine refused to continue
    EXPIRED = "expired"  # never started before its TTFT deadline (slo scheduler with drop_expired)


@dataclass
class SamplingParams:
    """How to pick the next token and when to stop. Validated here so every entry point agrees."""

    max_tokens: int | None = 16  # None: up to the context (or KV) limit
    min_tokens: int = 0  # EOS and stop token ids are masked until this many tokens were generated
    temperature: float = 1.0  # 0 (below GREEDY_TEMPERATURE) means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0  # OpenAI: subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # CTRL: logits of prompt and output tokens divided (>0) or multiplied (<0)
    seed: int | None = None  # per-request generator: the same seed gives the same tokens
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; k: plus the top k
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.min_tokens <= (self.max_tokens or self.min_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise ValueError(f"seed must be in [-2**63, 2**64), got {self.seed}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)


@dataclass(frozen=True)
class SLO:
    """The latency a request was promised; None means no promise on that metric. TPOT is the common decode SLO
    (DistServe, vLLM's and guidellm's benchmarks): the mean time per output token after the first, so a request
    ahead of it has slack to absorb a long iteration. TBT is the strict one: every gap."""

    ttft_s: float | None = None
    tbt_s: float | None = None
    tpot_s: float | None = None
    priority: int = 0  # lower is more important (as vLLM)


@dataclass
class Request:
    """One generation request as the scheduler sees it.

    `token_ids` is prompt + generated tokens; the first `num_computed_tokens` of them have their
    KV in `block_ids`. A request is prefilling while more than one token lacks KV.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    slo: SLO = field(default_factory=SLO)
    arrival_s: float | None = None  # stamped by the engine's clock when added, unless given
    status: RequestStatus = RequestStatus.WAITING
    token_ids: list[int] = field(init=False)
    num_computed_tokens: int = 0
    # Drafts for the next iteration (speculative decoding): guesses at the tokens after token_ids, set by the
    # engine's drafter before each plan; not part of token_ids until the model has verified them.
    spec_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    # Prefix caching (kv/manager.py): the chain key of each full block of token_ids (valid for good: tokens are only
    # appended), how many of block_ids are published, and its tokens found cached: predicted when it is queued
    # (admission plans with it), what was found when it first started.
    block_hashes: list[int] = field(default_factory=list)
    num_cached_blocks: int = 0
    num_cached_tokens: int = 0
    first_scheduled_s: float | None = None  # start of the first prefill chunk (scheduling delay)
    first_token_s: float | None = None
    last_token_s: float | None = None
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Disaggregated prefill: keep a copy of the prompt's KV when it completes, for a decode engine to adopt.
    export_kv: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: the prompt is empty")
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_outstanding_tokens(self) -> int:
        """Prompt tokens still to prefill plus output tokens still to generate (at most): a load figure."""
        return (max(0, self.num_prompt_tokens - self.num_computed_tokens) + (self.sampling.max_tokens or 1)
                - self.num_output_tokens)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_uncomputed_tokens > 1

    @property
    def ttft_deadline_s(self) -> float:
        if self.slo.ttft_s is None or self.arrival_s is None:
            return math.inf
        return self.arrival_s + self.slo.ttft_s

    @property
    def next_token_deadline_s(self) -> float:
        """When its next output token is due: within TBT of the last one, and early enough that its mean gap so far
        stays within TPOT (output token k, counted from 0 at the first, by first + k x TPOT); inf if neither."""
        due = math.inf
        if self.slo.tbt_s is not None and self.last_token_s is not None:
            due = self.last_token_s + self.slo.tbt_s
        if self.slo.tpot_s is not None and self.first_token_s is not None:
            due = min(due, self.first_token_s + self.slo.tpot_s * self.num_output_tokens)
        return due


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one request: the new tokens and text since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    new_logprobs: list = field(default_factory=list)  # TokenLogprobs per new token, if asked for
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache when it started
