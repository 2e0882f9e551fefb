"""Prefill/decode disaggregation (DistServe, OSDI'24) in the simulator: a pool of replicas that only prefill, a pool
that only decodes, and the prompt's KV moved between them. Both pools run the real Engine and Scheduler, and the
hand-over is the Ray front end's: the same decisions (scheduling/handover.py: what a prefill replica is sent, which
decode replica continues, which blocks move) and the same wait for room on that replica (engine/adoptions.py).

What only the simulator models: the transfer's time (`KVTransfer`), and backpressure. The prefill replica keeps the
prompt's KV in its blocks from the first token until the decode replica adopts the request, and while any prefilled
request waits for room, the prefill pool pauses: a first token the decode pool cannot continue would otherwise be
followed by a stall that a request's P99 or mean gap hides when its output is long, so the wait is moved before the
first token, where the TTFT SLO judges it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pacer.engine.engine import Engine
from pacer.request import Request
from pacer.scheduling.handover import choose_decoder
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
    """The decode replicas, the router that places a prefilled request on one (`handover.choose_decoder`: fewest
    outstanding tokens by default, as the real front end), and the link to them."""

    def __init__(self, engines: Sequence[Engine], transfer: KVTransfer, router: Router | None = None) -> None:
        if not engines:
            raise ValueError("disaggregation needs at least one decode replica")
        self.replicas = [SimReplica(engine) for engine in engines]
        self.transfer = transfer
        self.router = router or LeastTokensRouter()

    def choose(self, request: Request) -> tuple[SimReplica, int]:
        """The decode replica for a prefilled request, and the prompt tokens it is believed to hold already."""
        index, held = choose_decoder(request, self.replicas, self.router)
        return self.replicas[index], held
