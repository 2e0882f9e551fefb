"""Prefill/decode disaggregation (DistServe, OSDI'24) in the simulator: a pool of replicas that only prefill, a pool
that only decodes, and the prompt's KV moved between them. Both pools run the real Engine and Scheduler, through
the engine's own hand-over: a prefill replica serves each request with max_tokens=1 and `export_kv` (its first
token is the prefill's; the engine keeps the prompt's KV as a payload when the request ends, and frees its blocks),
and a decode replica takes the request with `Engine.adopt`, which allocates its blocks and imports the payload. The
decode replica is chosen when the prompt is done, and only the blocks it is not believed to hold in its prefix cache
move (a later turn of a conversation it decoded moves its new tokens only).

KV accounting: the prefill replica keeps the prompt's KV in its blocks from the first token until a decode replica
adopts the request (the transfer, then any wait for a decode replica with room), and the decode replica allocates
its blocks at adoption; never both at once. While a prefilled request waits for a decode replica with room, the
prefill pool pauses (the simulator's backpressure): a first token the decode pool cannot continue would otherwise
be followed by a stall that a request's P99 or mean gap hides when its output is long, so the wait is moved before
the first token, where the TTFT SLO judges it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pacer.engine.engine import Engine
from pacer.request import Request, SamplingParams
from pacer.scheduling.router import LeastTokensRouter, Router
from pacer.sim.replica import SimReplica


@dataclass(frozen=True)
class KVTransfer:
    """The link between a prefill and a decode replica: one transfer at a time per request, no contention (as
    DistServe's simulator); the bandwidth is the replica's aggregate, all its tensor-parallel GPUs sending their
    shards at once."""

    kv_bytes_per_token: int  # K and V over all layers and KV heads: the model's, whatever the tensor parallelism
    bandwidth_bytes_s: float

    def seconds(self, num_tokens: int) -> float:
        return num_tokens * self.kv_bytes_per_token / self.bandwidth_bytes_s


class DecodePool:
    """The decode replicas, the router that places a prefilled request on one (fewest outstanding tokens by
    default: decode load is tokens still to generate, and TTFT is no longer at stake), and the link to them."""

    def __init__(self, engines: Sequence[Engine], transfer: KVTransfer, router: Router | None = None) -> None:
        if not engines:
            raise ValueError("disaggregation needs at least one decode replica")
        self.replicas = [SimReplica(engine) for engine in engines]
        self.transfer = transfer
        self.router = router or LeastTokensRouter()

    def choose(self, request: Request) -> SimReplica:
        return self.replicas[self.router.choose(request, self.replicas)]


def prefill_only(request: Request) -> Request:
    """What a prefill replica is sent: the request, stopping at its first token and keeping its prompt's KV."""
    return Request(request.request_id, request.prompt_token_ids, SamplingParams(max_tokens=1, ignore_eos=True),
                   request.slo, arrival_s=request.arrival_s, export_kv=True)


def decode_request(prefilled: Request, max_tokens: int) -> Request:
    """The request as `Engine.adopt` takes it: prompt and first token, the prompt's KV computed (in the payload).
    Adoption stamps its first token and scheduling at the decode replica's now, so the `slo` policy there counts
    its TBT slack from the hand-over; the client's token times are the simulator's records, not these fields."""
    request = Request(prefilled.request_id, prefilled.prompt_token_ids,
                      SamplingParams(max_tokens=max_tokens, ignore_eos=True), prefilled.slo,
                      arrival_s=prefilled.arrival_s)
    request.token_ids.append(prefilled.token_ids[-1])
    request.num_computed_tokens = prefilled.num_prompt_tokens
    return request
