"""Incremental detokenization and stop strings: token ids in, text deltas out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling import ModelOutput, SchedulerOutput

# How many tokens before the new ones are decoded with them, so that merges across the boundary
# (spaces, multi-byte characters) come out as the tokenizer would print the whole sequence.
_CONTEXT_TOKENS = 5


class TextDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


@dataclass
class _Stream:
    prefix_offset: int  # token_ids[prefix_offset:read_offset] was decoded last time as context
    read_offset: int
    text: str = ""  # all output text so far (stop string cut off)
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    logprobs: list = field(default_factory=list)
    # output tokens up to the one that completed a stop string, where tokens after it came in the same step
    # (accepted drafts): they are not output
    num_tokens_to_stop: int | None = None


class Detokenizer:
    """Turns each step's sampled tokens into text deltas, vLLM-style (prefix/read offsets).

    While a request has stop strings, the last `len(longest stop) - 1` characters are held back
    so that a stop string is never partly streamed; the stop string itself is never returned.
    Without a tokenizer (the simulator) only token ids flow.
    """

    def __init__(self, tokenizer: TextDecoder | None) -> None:
        self.tokenizer = tokenizer
        self._streams: dict[str, _Stream] = {}
        self._num_sent: dict[str, int] = {}  # without a tokenizer: output tokens sent so far, per request

    def outputs(self, plan: SchedulerOutput, result: ModelOutput, finished: list[Request]) -> list[RequestOutput]:
        if self.tokenizer is None:
            return self._token_outputs(plan, result, finished)
        done = {r.request_id for r in finished}
        outputs = []
        for request in plan.requests:
            rid = request.request_id
            if rid not in result.sampled_token_ids and rid not in done:
                continue
            stream = self._streams.get(rid)
            if stream is None:
                offset = request.num_prompt_tokens
                stream = self._streams[rid] = _Stream(max(0, offset - _CONTEXT_TOKENS), offset)
            if rid in result.logprobs:
                stream.logprobs.append(result.logprobs[rid])
            if self._decode(request, stream):
                request.finish_reason = FinishReason.STOP
                done.add(rid)
            outputs.append(self._emit(request, stream, finished=rid in done))
        return outputs

    def adopt(self, request: Request) -> None:
        """Continue a request whose first output tokens another engine has already sent (disaggregated serving):
        outputs start after them. The text so far is rebuilt as that engine built it, so a stop string spanning
        the hand-over is found, and what it held back (a stop string's possible start) is sent from here."""
        num_sent = request.num_output_tokens
        if self.tokenizer is None:
            self._num_sent[request.request_id] = num_sent
            return
        offset = request.num_prompt_tokens
        stream = _Stream(max(0, offset - _CONTEXT_TOKENS), offset, num_sent_tokens=num_sent)
        self._decode(request, stream)  # no stop string in these tokens: the prefill engine would have ended there
        stream.num_sent_chars = max(0, len(stream.text) - _holdback(request.sampling.stop))
        self._streams[request.request_id] = stream

    def ended(self, request: Request) -> RequestOutput:
        """The final output of a request ended outside an iteration's update (aborted, expired)."""
        if self.tokenizer is None:
            return self._token_output(request, None, True)
        stream = self._streams.get(request.request_id) or _Stream(request.num_tokens, request.num_tokens)
        return self._emit(request, stream, finished=True)

    def _token_outputs(self, plan: SchedulerOutput, result: ModelOutput, finished: list[Request]) -> list[RequestOutput]:
        """Token ids only (the simulator, tests): no text to build, so no stream state; this runs for every
        request of every simulated iteration."""
        done = {r.request_id for r in finished}
        sampled, logprobs = result.sampled_token_ids, result.logprobs
        return [self._token_output(request, logprobs.get(request.request_id), request.request_id in done)
                for request in plan.requests if request.request_id in sampled or request.request_id in done]

    def _token_output(self, request: Request, logprobs: object, finished: bool) -> RequestOutput:
        rid = request.request_id
        sent = self._num_sent.pop(rid, 0) if finished else self._num_sent.get(rid, 0)
        output = _output(request, sent, "", finished, [logprobs] if logprobs else [])
        if not finished:
            self._num_sent[rid] = output.num_output_tokens
        return output

    def _decode(self, request: Request, stream: _Stream) -> bool:
        """Extend stream.text with the request's new tokens; True if a stop string was hit."""
        assert self.tokenizer is not None  # outputs() takes the token-only path without one
        ids, skip = request.token_ids, request.sampling.skip_special_tokens
        prefix = self.tokenizer.decode(ids[stream.prefix_offset:stream.read_offset], skip_special_tokens=skip)
        full = self.tokenizer.decode(ids[stream.prefix_offset:], skip_special_tokens=skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # an incomplete UTF-8 sequence: wait for the next token
        old_len, old_offsets = len(stream.text), (stream.prefix_offset, stream.read_offset)
        stream.text += full[len(prefix):]
        stream.prefix_offset, stream.read_offset = stream.read_offset, len(ids)
        stops = request.sampling.stop
        if stops:
            start = max(0, old_len - max(map(len, stops)) + 1)
            hits = [(i, i + len(s)) for i, s in ((stream.text.find(s, start), s) for s in stops) if i >= 0]
            if hits:
                cut, end = min(hits)
                stream.text = stream.text[:cut]
                if len(ids) - old_offsets[1] > 1:
                    stream.num_tokens_to_stop = self._tokens_to(request, old_offsets, len(prefix), end - old_len)
                return True
        return False

    def _tokens_to(self, request: Request, offsets: tuple[int, int], prefix_len: int, num_chars: int) -> int:
        """Output tokens up to the first of this step's tokens whose text makes `num_chars` new characters: the one
        that completed a stop string, when a step brought several (rare: only then is text decoded per token)."""
        assert self.tokenizer is not None
        ids, skip = request.token_ids, request.sampling.skip_special_tokens
        end = offsets[1] + 1
        while end < len(ids) and len(self.tokenizer.decode(ids[offsets[0]:end], skip_special_tokens=skip)) \
                - prefix_len < num_chars:
            end += 1
        return end - request.num_prompt_tokens

    def _emit(self, request: Request, stream: _Stream, finished: bool) -> RequestOutput:
        # a stop string's possible start waits for the next tokens, here or, after a hand-over, on the decode engine
        goes_on = not finished or (request.export_kv and request.finish_reason is FinishReason.LENGTH)
        holdback = _holdback(request.sampling.stop) if goes_on else 0
        end = max(stream.num_sent_chars, len(stream.text) - holdback)
        output = _output(request, stream.num_sent_tokens, stream.text[stream.num_sent_chars:end], finished,
                         stream.logprobs, stream.num_tokens_to_stop)
        # a fresh list: the output keeps the old one, which must not grow with the next token's logprobs
        stream.num_sent_chars, stream.num_sent_tokens, stream.logprobs = end, output.num_output_tokens, []
        if finished:
            self._streams.pop(request.request_id, None)
        return output


def _holdback(stops: list[str]) -> int:
    """Characters of text not yet streamed while a stop string may still complete: one less than the longest."""
    return max(map(len, stops)) - 1 if stops else 0


def _output(request: Request, num_sent_tokens: int, new_text: str, finished: bool, logprobs: list,
            num_output_tokens: int | None = None) -> RequestOutput:
    """The output of a request's tokens after the first `num_sent_tokens` outputs, up to `num_output_tokens` (all
    by default). Called for every request of every iteration: one pass, no property chains."""
    num_prompt = len(request.prompt_token_ids)
    end = len(request.token_ids) if num_output_tokens is None else num_prompt + num_output_tokens
    return RequestOutput(request.request_id, request.token_ids[num_prompt + num_sent_tokens:end], new_text, finished,
                         request.finish_reason if finished else None, logprobs, num_prompt, end - num_prompt,
                         request.num_cached_tokens)
