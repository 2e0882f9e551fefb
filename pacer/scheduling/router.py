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
    """The replica with the least predicted TTFT for this request, from its latency model and queue (Llumnix's
    load-aware dispatch, with time instead of memory as the load); fewest outstanding tokens breaks ties,
    and decides alone among replicas that cannot predict."""

    def choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        return min(range(len(replicas)),
                   key=lambda i: (_or_inf(replicas[i].predicted_ttft_s(request)), replicas[i].num_outstanding_tokens))


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
