"""Which replica gets a request: routing policies registered by name, like the schedulers, shared by the
simulator and the scale-out front end. Pure: a router sees each replica only through `ReplicaView`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from pacer.request import Request
from pacer.scheduling.admission import refusal, waited_s
from pacer.scheduling.registry import Registry


class ReplicaView(Protocol):
    """What a router may ask of a replica."""

    @property
    def num_outstanding_tokens(self) -> int:
        """Prompt tokens still to prefill plus output tokens still to generate, over its requests."""
        ...

    def predicted_ttft_s(self, request: Request) -> float | None:
        """Seconds until the request's first token if it were sent here now; None if the replica does not
        predict (its policy has no latency model), and then it admits everything."""
        ...


class Router(Protocol):
    """Picks a replica index for each arriving request; state (if any) lives in the router."""

    def choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int: ...


ROUTERS: Registry[Router] = Registry("router")
register_router = ROUTERS.register
router_class = ROUTERS.lookup


@register_router("round_robin")
class RoundRobinRouter:
    """Each replica in turn, blind to load."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        index = self._next % len(replicas)
        self._next = index + 1
        return index


@register_router("least_tokens")
class LeastTokensRouter:
    """The replica with the fewest outstanding tokens: load-aware, but blind to what the load costs."""

    def choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        return min(range(len(replicas)), key=lambda i: replicas[i].num_outstanding_tokens)


@register_router("slo")
class SloRouter:
    """Keeps the request's TTFT promise and, among the replicas that can, leaves the most room: of the replicas
    predicted (latency model and queue) to meet its TTFT SLO, the one with the fewest outstanding tokens. When
    none can, or the request has no TTFT SLO, the one with the least predicted TTFT (Llumnix's load-aware
    dispatch, with time instead of memory as the load); fewest outstanding tokens breaks ties, and decides alone
    among replicas that cannot predict.

    Why not always the least predicted TTFT: once the promise is kept, a sooner first token gains nothing, and
    sending each request to the replica that could start it soonest spends the room a long prompt arriving next
    needs. In `pacer sim` that refused 7-14 % more documents than round robin did (benchmarks/RESULTS.md, "pacer
    sim: routers at scale"). The time the request has already waited is left to `dispatch`, which overrides a
    pick that would miss."""

    def choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        times = [_or_inf(replica.predicted_ttft_s(request)) for replica in replicas]
        ttft_slo = request.slo.ttft_s
        in_time = [i for i in range(len(replicas)) if ttft_slo is not None and times[i] <= ttft_slo]
        if in_time:
            return min(in_time, key=lambda i: (replicas[i].num_outstanding_tokens, times[i]))
        return min(range(len(replicas)), key=lambda i: (times[i], replicas[i].num_outstanding_tokens))


def _or_inf(seconds: float | None) -> float:
    return math.inf if seconds is None else seconds


def dispatch(request: Request, replicas: Sequence[ReplicaView], router: Router, now: float) -> int:
    """The replica for `request`, with admission across replicas: the router's choice if it can meet the
    request's TTFT SLO (or does not predict); else the replica with the least predicted TTFT if that one can;
    else SLOUnattainable (a 429) with the soonest Retry-After. So a request is refused only when no replica
    can serve it in time, whatever the policy."""
    index = router.choose(request, replicas)
    ttft_slo = request.slo.ttft_s
    if ttft_slo is None:
        return index
    waited = waited_s(request, now)
    predicted = replicas[index].predicted_ttft_s(request)
    if predicted is None or waited + predicted <= ttft_slo:
        return index
    times = [_or_inf(replica.predicted_ttft_s(request)) for replica in replicas]
    best = min(range(len(replicas)), key=times.__getitem__)
    if waited + times[best] <= ttft_slo:
        return best
    raise refusal(waited + times[best], ttft_slo)
