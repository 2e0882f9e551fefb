"""Prefill/decode disaggregation (DistServe): the decisions of a hand-over, in one place for the Ray front end and the
simulator. A prefill replica serves the request to its first token and keeps its prompt's KV (`prefill_only`); when
the prompt is done, a decode replica is chosen and only the blocks it is not believed to hold move (`choose_decoder`);
it adopts the request as `decode_request` makes it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pacer.request import Request, SamplingParams
from pacer.scheduling.router import ReplicaView, Router


def hands_over(request: Request) -> bool:
    """Whether a request sent to a prefill replica continues on a decode replica (one token: the prefill is all)."""
    return request.sampling.max_tokens != 1


def prefill_only(request: Request) -> Request:
    """What a prefill replica is sent: the request stopping at its first token and keeping its prompt's KV (with the
    cache hit predicted for it)."""
    sampling = dataclasses.replace(request.sampling, max_tokens=1, min_tokens=min(1, request.sampling.min_tokens))
    prefill = Request(request.request_id, request.prompt_token_ids, sampling, request.slo, arrival_s=request.arrival_s,
                      export_kv=True)
    prefill.num_cached_tokens = request.num_cached_tokens
    return prefill


def decode_request(request: Request, sampling: SamplingParams, first_token_ids: Sequence[int]) -> Request:
    """The request as `Engine.adopt` takes it: prompt and first token, the prompt's KV computed (in the payload), its
    own sampling again. Adoption stamps its first token and scheduling at the decode replica's clock, so the `slo`
    policy there counts its decode slack from the hand-over."""
    adopted = Request(request.request_id, request.prompt_token_ids, sampling, request.slo, arrival_s=request.arrival_s)
    adopted.token_ids.extend(first_token_ids)
    adopted.num_computed_tokens = adopted.num_prompt_tokens
    return adopted


def choose_decoder(request: Request, decoders: Sequence[ReplicaView], router: Router) -> tuple[int, int]:
    """The decode replica for a prefilled request (the router's pick: decode load is tokens still to generate, and
    TTFT is no longer at stake) and the prompt tokens it is believed to hold already, whose KV need not move."""
    index = router.choose(request, decoders)
    return index, decoders[index].cached_prompt_tokens(request)
