"""OpenAI's request and response shapes as pydantic models, and its error body.

Ranges are checked here, so a bad value is a 400 that names the field before anything reaches
the engine. Unknown fields are ignored, as vLLM does; fields that change the meaning of a
request but are not implemented (`echo`, `suffix`, `logit_bias`, `tools`, ...) are refused.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from pacer.request import SEED_RANGE

# ---- errors -------------------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class APIError(Exception):
    """An OpenAI-style error: the routes raise it, one handler turns it into JSON with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorInfo(message=message, type=type, param=param, code=code))
        self.headers = headers


def invalid(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


# ---- requests -----------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False  # one more chunk at the end, with the whole call's usage
    continuous_usage_stats: bool = False  # vLLM: usage so far in every chunk


class SamplingRequest(BaseModel):
    """The fields completions and chat share (OpenAI's, plus vLLM's sampling extensions)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None  # and below the vocabulary size (serving)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # pacer's SLO extension (also as headers x-slo-ttft-ms / x-slo-tpot-ms / x-slo-tbt-ms; server defaults
    # otherwise): TPOT is the mean time per output token after the first, TBT every gap
    ttft_slo_ms: float | None = Field(None, gt=0, le=3.6e6)
    tpot_slo_ms: float | None = Field(None, gt=0, le=3.6e6)
    tbt_slo_ms: float | None = Field(None, gt=0, le=3.6e6)
    priority: int = Field(0, ge=-(2**31), lt=2**31)  # lower is more important (as vLLM)

    def unsupported(self) -> list[str]:
        """Names of fields set to something pacer cannot honour."""
        return ["logit_bias"] if self.logit_bias else []


_Text = Annotated[str, Field(min_length=1)]  # an empty prompt has no token to start from
_Ids = Annotated[list[int], Field(min_length=1)]


class CompletionRequest(SamplingRequest):
    prompt: _Text | Annotated[list[_Text], Field(min_length=1)] | _Ids | Annotated[list[_Ids], Field(min_length=1)]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.echo:
            names.append("echo")
        if self.suffix:
            names.append("suffix")
        if self.best_of not in (None, 1, self.n):
            names.append("best_of")
        return names


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    # Required, null refused: only an assistant message with tool_calls may go without, and tools are not supported.
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI, still what most clients send
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    response_format: dict | None = None

    def unsupported(self) -> list[str]:
        names = super().unsupported()
        if self.tools:
            names.append("tools")
        if self.response_format and self.response_format.get("type") != "text":
            names.append("response_format")
        return names


# ---- responses ----------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # found in the prefix cache: not prefilled again


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class SLOReport(BaseModel):
    """pacer's extension on a call's last chunk (and non-streamed body): what the server measured for this
    call (TTFT from HTTP arrival; of any choice, the longest mean gap after the first token and the longest gap)
    against its SLO."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    max_tbt_ms: float | None = None
    ttft_slo_ms: float | None = None
    tpot_slo_ms: float | None = None
    tbt_slo_ms: float | None = None
    slo_met: bool


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    pacer: SLOReport | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    pacer: SLOReport | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    pacer: SLOReport | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pacer"
    root: str
    family: str  # the architecture family: llama, mistral, qwen2, qwen3
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
