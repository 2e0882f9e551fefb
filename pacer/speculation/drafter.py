"""Who gets drafts, and the n-gram drafter the engine asks before each plan (`--speculation ngram`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from pacer.request import Request
from pacer.speculation.ngram import TokenBuffer, propose_ngram


class Drafter(Protocol):
    def propose(self, running: Iterable[Request]) -> None:
        """Set `spec_token_ids` of the running requests (empty where there is no guess, or no drafting) before the
        scheduler plans the next iteration."""
        ...


def can_speculate(request: Request) -> bool:
    """Drafts are verified only for sampling that sees nothing but the logits of each position: penalties would
    need the drafts counted in as outputs, logprobs per accepted draft, and min_tokens a mask per position, which
    this first part does not do (issue 37), so such requests decode one token at a time."""
    sampling = request.sampling
    return (not sampling.penalized and sampling.logprobs is None
            and request.num_output_tokens >= sampling.min_tokens)


class NgramDrafter:
    """Sets `spec_token_ids` of every running decode from its own tokens (prompt + output), each iteration.

    Keeps a search buffer per request it last saw running, so each call converts only the new tokens."""

    def __init__(self, num_speculative_tokens: int, min_n: int = 2, max_n: int = 4) -> None:
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes must satisfy 1 <= min_n <= max_n, got {min_n} and {max_n}")
        self.num_speculative_tokens = num_speculative_tokens
        self.min_n, self.max_n = min_n, max_n
        # request id -> (the request, its buffer): an id used again by a new request gets a new buffer
        self._buffers: dict[str, tuple[Request, TokenBuffer]] = {}

    def propose(self, running: Iterable[Request]) -> None:
        buffers = {}
        for request in running:
            if request.is_prefilling or not can_speculate(request):
                request.spec_token_ids = []
                continue
            known = self._buffers.get(request.request_id)
            buffer = known[1] if known is not None and known[0] is request else TokenBuffer()
            buffers[request.request_id] = (request, buffer)
            buffer.sync(request.token_ids)
            request.spec_token_ids = propose_ngram(buffer, self.num_speculative_tokens, self.min_n, self.max_n)
        self._buffers = buffers  # those no longer running (finished, preempted) are dropped
