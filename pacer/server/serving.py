"""From an OpenAI request to engine requests and back: prompts, sampling parameters, choices, SSE chunks.

One HTTP call becomes one engine request per choice (prompts x n), submitted together so that
admission is all or nothing; their outputs come back on one stream and are folded into choices.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

import jinja2
from pydantic import BaseModel
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response

from pacer.engine.frontend import Frontend
from pacer.engine.protocol import EngineError, QueueFullError, RequestExpired
from pacer.model.tokenizer import Tokenizer
from pacer.request import SLO, Request, SamplingParams
from pacer.scheduling import TokenLogprobs
from pacer.scheduling.admission import SLOUnattainable
from pacer.server.call import Call, request_slo
from pacer.server.metrics import Metrics
from pacer.server.protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorInfo,
    ErrorResponse,
    SamplingRequest,
    TokenLogprob,
    TopLogprob,
    invalid,
)
from pacer.server.sse import EventStream

T = TypeVar("T")

# Engine requests one call may make (prompts x n): each is real work even for one token (~2 ms of the tiny model's
# front end and engine), and a short body could otherwise ask for millions. vLLM has no bound; 1024 lets a client
# batch hundreds of prompts.
MAX_CHOICES = 1024
# Longer texts are tokenized on a thread: 4K characters take ~3 ms (1 MB, ~0.8 s) that would stall every stream's
# tokens on the event loop; the hop costs ~0.1 ms.
TOKENIZE_ON_THREAD_CHARS = 4096


class OpenAIServing:
    """The logic behind /v1/completions and /v1/chat/completions."""

    def __init__(self, engine: Frontend, tokenizer: Tokenizer, model_name: str, metrics: Metrics,
                 default_slo: SLO | None = None, stream_timeout_s: float = 0.0,
                 max_tokens_default: int | None = None) -> None:
        self.engine = engine
        self.stream_timeout_s = stream_timeout_s
        self.default_slo = default_slo or SLO()
        self.max_tokens_default = max_tokens_default  # for requests that set none; None: to the end of the context
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = metrics
        self._token_text = functools.lru_cache(maxsize=65536)(self._decode_token)  # logprobs' token strings
        self._max_token_chars = tokenizer.max_token_chars

    # ---- completions --------------------------------------------------------------------------

    async def completions(self, body: CompletionRequest, http: HTTPRequest, arrival_s: float) -> Response:
        self._check(body)
        prompts = await self._completion_prompts(body.prompt, body.n)
        call_id = f"cmpl-{uuid.uuid4().hex}"
        call = self._submit(call_id, prompts, body, body.max_tokens, body.logprobs, arrival_s, "prompt",
                            request_slo(body, http.headers, self.default_slo))
        created = int(time.time())
        if body.stream:
            return self._sse(call_id, self._completion_chunks(call, body, call_id, created))
        await _until_disconnected(http, self._collect(call))
        choices = [CompletionChoice(index=c.index, text="".join(c.text), finish_reason=c.finish_reason,
                                    logprobs=self._completion_logprobs(c.logprobs, 0)
                                    if body.logprobs is not None else None)
                   for c in call.choices.values()]
        return _json(CompletionResponse(id=call_id, created=created, model=self.model_name, choices=choices,
                                        usage=call.usage(), pacer=call.report()))

    async def _completion_chunks(self, call: Call, body: CompletionRequest, call_id: str,
                                 created: int) -> AsyncGenerator[str, None]:
        offsets = {c.index: 0 for c in call.choices.values()}
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)
        with call.stream:
            async for output in call.stream:
                choice = call.observe(output, keep=False)
                if not (output.new_text or output.finished or body.logprobs is not None and output.new_token_ids):
                    continue
                logprobs = None
                if body.logprobs is not None:
                    logprobs = self._completion_logprobs(list(zip(output.new_token_ids, output.new_logprobs)),
                                                         offsets[choice.index])
                    offsets[choice.index] += sum(map(len, logprobs.tokens))
                chunk = CompletionResponse(
                    id=call_id, created=created, model=self.model_name, usage=call.usage() if continuous else None,
                    choices=[CompletionChoice(index=choice.index, text=output.new_text, logprobs=logprobs,
                                              finish_reason=choice.finish_reason)],
                    pacer=call.report() if call.finished else None)
                yield _event(chunk.model_dump_json())
        if body.stream_options and body.stream_options.include_usage:
            yield _event(CompletionResponse(id=call_id, created=created, model=self.model_name, choices=[],
                                            usage=call.usage(), pacer=call.report()).model_dump_json())

    async def _completion_prompts(self, prompt: str | list, n: int) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise invalid("prompt must not be an empty list", "prompt")
        if len(prompt) * n > MAX_CHOICES:
            raise invalid(f"prompt: {len(prompt)} prompts x n={n} make more than {MAX_CHOICES} choices in one call",
                          "prompt")
        for text in prompt:
            if isinstance(text, str):
                self._check_length(len(text), "prompt")
        prompts = [await self._encode(p, "prompt", True) if isinstance(p, str) else list(p) for p in prompt]
        for ids in prompts:
            if not ids:
                raise invalid("prompt is empty: it must have at least one token", "prompt")
            if min(ids) < 0 or max(ids) >= self.tokenizer.vocab_size:
                raise invalid(f"prompt token ids must be in [0, {self.tokenizer.vocab_size})", "prompt")
        return prompts

    def _completion_logprobs(self, items: list[tuple[int, TokenLogprobs]], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for token_id, lp in items:
            token = self._token_text(token_id)
            out.tokens.append(token)
            out.token_logprobs.append(lp.logprob)
            out.top_logprobs.append({self._token_text(t): v for t, v in lp.top})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    # ---- chat ---------------------------------------------------------------------------------

    async def chat(self, body: ChatCompletionRequest, http: HTTPRequest, arrival_s: float) -> Response:
        self._check(body)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        self._check_length(sum(len(m["content"]) for m in messages), "messages")
        for i, message in enumerate(messages):
            _check_text(message["content"], f"messages.{i}.content")
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except jinja2.TemplateError as error:
            raise invalid(f"the model's chat template refused these messages: {error}", "messages") from error
        prompt = await self._encode(text, "messages", False)
        top = (body.top_logprobs or 0) if body.logprobs else None
        call_id = f"chatcmpl-{uuid.uuid4().hex}"
        call = self._submit(call_id, [prompt], body, body.max_completion_tokens or body.max_tokens, top, arrival_s,
                            "messages", request_slo(body, http.headers, self.default_slo))
        created = int(time.time())
        if body.stream:
            return self._sse(call_id, self._chat_chunks(call, body, call_id, created))
        await _until_disconnected(http, self._collect(call))
        choices = [ChatChoice(index=c.index, message=AssistantMessage(content="".join(c.text)),
                              finish_reason=c.finish_reason,
                              logprobs=self._chat_logprobs(c.logprobs) if body.logprobs else None)
                   for c in call.choices.values()]
        return _json(ChatCompletionResponse(id=call_id, created=created, model=self.model_name, choices=choices,
                                            usage=call.usage(), pacer=call.report()))

    async def _chat_chunks(self, call: Call, body: ChatCompletionRequest, call_id: str,
                           created: int) -> AsyncGenerator[str, None]:
        continuous = bool(body.stream_options and body.stream_options.continuous_usage_stats)

        def chunk(choice: ChatStreamChoice) -> str:
            return _event(ChatCompletionChunk(id=call_id, created=created, model=self.model_name, choices=[choice],
                                              usage=call.usage() if continuous else None,
                                              pacer=call.report() if call.finished else None).model_dump_json())

        with call.stream:
            for choice in call.choices.values():
                yield chunk(ChatStreamChoice(index=choice.index, delta=Delta(role="assistant", content="")))
            async for output in call.stream:
                choice = call.observe(output, keep=False)
                if not (output.new_text or output.finished or body.logprobs and output.new_token_ids):
                    continue
                logprobs = None
                if body.logprobs:
                    logprobs = self._chat_logprobs(list(zip(output.new_token_ids, output.new_logprobs)))
                yield chunk(ChatStreamChoice(index=choice.index, delta=Delta(content=output.new_text or None),
                                             logprobs=logprobs, finish_reason=choice.finish_reason))
        if body.stream_options and body.stream_options.include_usage:
            yield _event(ChatCompletionChunk(id=call_id, created=created, model=self.model_name, choices=[],
                                             usage=call.usage(), pacer=call.report()).model_dump_json())

    def _chat_logprobs(self, items: list[tuple[int, TokenLogprobs]]) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            token = self._token_text(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

        return ChatLogprobs(content=[
            TokenLogprob(**entry(token_id, lp.logprob), top_logprobs=[TopLogprob(**entry(t, v)) for t, v in lp.top])
            for token_id, lp in items])

    # ---- shared -------------------------------------------------------------------------------

    def _check(self, body: SamplingRequest) -> None:
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves "
                           f"`{self.model_name}`", param="model", code="model_not_found")
        unsupported = body.unsupported()
        if unsupported:
            raise invalid(f"{', '.join(unsupported)} is not supported by pacer", unsupported[0], "unsupported")
        if body.stop_token_ids and max(body.stop_token_ids) >= self.tokenizer.vocab_size:
            raise invalid(f"stop_token_ids must be in [0, {self.tokenizer.vocab_size})", "stop_token_ids")

    def _check_length(self, num_chars: int, param: str) -> None:
        """Refuse text too long for any tokenization of it to fit, without tokenizing it."""
        limit = self.engine.limits.max_request_tokens
        if num_chars > limit * self._max_token_chars:
            raise invalid(f"the {param} has {num_chars} characters, more than {limit} tokens of at most "
                          f"{self._max_token_chars} characters each can hold: shorten the {param}", param,
                          "context_length_exceeded")

    def _submit(self, call_id: str, prompts: list[list[int]], body: SamplingRequest, max_tokens: int | None,
                logprobs: int | None, arrival_s: float, prompt_param: str, slo: SLO) -> Call:
        requests = []
        for prompt in prompts:
            for j in range(body.n):
                index = len(requests)
                params = self._sampling_params(body, max_tokens or self._default_max_tokens(body, prompt), logprobs, j)
                requests.append(Request(f"{call_id}-{index}", prompt, params, slo, arrival_s=arrival_s))
        try:
            stream = self.engine.generate(requests)
        except ValueError as error:
            limit = self.engine.limits.max_request_tokens
            param = prompt_param if max(map(len, prompts)) >= limit else "max_tokens"
            hint = "lower max_tokens" if param == "max_tokens" else f"shorten the {param}"
            raise invalid(f"{error}: {hint}", param,
                          "context_length_exceeded") from error
        except (QueueFullError, SLOUnattainable) as error:
            code = "queue_full" if isinstance(error, QueueFullError) else "slo_unattainable"
            raise APIError(429, str(error), type="rate_limit_error", code=code,
                           headers={"Retry-After": str(error.retry_after_s)}) from error
        except EngineError as error:
            raise APIError(503, str(error), type="service_unavailable", code="engine_unavailable") from error
        return Call(stream, requests, sum(map(len, prompts)), arrival_s, self.metrics)

    def _default_max_tokens(self, body: SamplingRequest, prompt: list[int]) -> int | None:
        """The server's default output length (at least min_tokens), cut where the context ends, as no limit would
        be; None (no default) runs to the end of the context."""
        if self.max_tokens_default is None:
            return None
        room = self.engine.limits.max_request_tokens - len(prompt)
        return max(1, min(max(self.max_tokens_default, body.min_tokens), room))

    def _sampling_params(self, body: SamplingRequest, max_tokens: int | None, logprobs: int | None,
                         index: int) -> SamplingParams:
        try:
            return SamplingParams(
                max_tokens=max_tokens, min_tokens=body.min_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p,
                presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                repetition_penalty=body.repetition_penalty,
                # n choices, n different samples; mod 2**64, as torch reads a negative seed
                seed=None if body.seed is None else (body.seed + index) % 2**64,
                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                stop_token_ids=list(body.stop_token_ids or []), ignore_eos=body.ignore_eos,
                logprobs=logprobs, skip_special_tokens=body.skip_special_tokens)
        except ValueError as error:
            field_name = re.match(r"\w+", str(error))
            raise invalid(str(error), field_name.group(0) if field_name else None) from error

    async def _collect(self, call: Call) -> None:
        try:
            with call.stream:
                async for output in call.stream:
                    call.observe(output, keep=True)
        except RequestExpired as error:
            raise APIError(503, str(error), type="service_unavailable", code="slo_expired") from error
        except EngineError as error:
            raise APIError(500, str(error), type="server_error", code="engine_error") from error

    def _sse(self, call_id: str, chunks: AsyncGenerator[str, None]) -> EventStream:
        async def events() -> AsyncGenerator[str, None]:
            try:
                async with contextlib.aclosing(chunks):  # closing events closes chunks: their requests abort now
                    async for event in chunks:
                        yield event
            except EngineError as error:
                code = "slo_expired" if isinstance(error, RequestExpired) else "engine_error"
                body = ErrorResponse(error=ErrorInfo(message=str(error), type="server_error", code=code))
                yield _event(body.model_dump_json())
            yield "data: [DONE]\n\n"

        return EventStream(events(), call_id, self.stream_timeout_s, self.metrics.stream_timeouts.inc)

    async def _encode(self, text: str, param: str, add_special_tokens: bool) -> list[int]:
        """`add_special_tokens`: the tokenizer's own rule (a BOS for Llama 3 and SentencePiece vocabularies) for a
        plain prompt, as vLLM and llama.cpp do; never for a chat prompt, whose template writes its own."""
        _check_text(text, param)
        if len(text) < TOKENIZE_ON_THREAD_CHARS:
            return self.tokenizer.encode(text, add_special_tokens)
        return (await asyncio.to_thread(self.tokenizer.encode_batch, [text], add_special_tokens))[0]

    def _decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


def _check_text(text: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise invalid(f"{param} is not valid Unicode: {error.reason} at position {error.start}", param) from error


def _json(body: BaseModel) -> Response:
    return Response(body.model_dump_json(), media_type="application/json")


def _event(data: str) -> str:
    return f"data: {data}\n\n"


async def _until_disconnected(http: HTTPRequest, work: Awaitable[T]) -> T:
    """Run `work` unless the client hangs up first; then cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await http.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise APIError(499, "client closed the request", code="client_closed_request")
    return task.result()
