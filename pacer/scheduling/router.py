"""Which replica gets a request: routing policies registered by name, like the schedulers, shared by the
simulator and the scale-out front end. Pure: a router sees each replica only through `ReplicaView`."""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

from pacer.kv.block_pool import chain_key
from pacer.request import Request
from pacer.scheduling.admission import refusal, waited_s
from pacer.scheduling.registry import Registry


class ReplicaView(Protocol):
    """What a router may ask of a replica."""

    @property
    def num_outstanding_tokens(self) -> int:
        """Prompt tokens still to prefill plus output tokens still to generate, over its requests."""
        ...

    def cached_prompt_tokens(self, request: Request) -> int:
        """Tokens of the request's prompt this replica is believed to hold in its prefix cache: what was sent to it
        (a `PrefixIndex`), since a front end cannot read a replica's KV."""
        ...

    def predicted_ttft_s(self, request: Request, ahead: Sequence[Request] = ()) -> float | None:
        """Seconds until the request's first token if it were sent here now (behind `ahead` too), its believed cache
        hit not prefilled; None if the replica does not predict (its policy has no latency model), and then it admits
        everything."""
        ...


class Router(Protocol):
    """Picks a replica index for each arriving request; state (if any) lives in the router."""

    def choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int: ...


class PrefixIndex:
    """What a front end believes a replica holds in its prefix cache: the chain keys of the blocks of the prompts it
    sent there, the least recently sent dropped past `capacity` blocks. A belief, as in SGLang's cache-aware
    router: the replica evicts on its own. Its blocks are `BLOCK_TOKENS` long whatever the replicas' block size:
    it measures how long a prefix two prompts share, not which blocks hold it."""

    BLOCK_TOKENS = 16
    # The latest prompt's keys: at an arrival, every replica's index asks for the same ones. Keyed by the prompt list
    # itself (held, so its id is never reused; copies of a request share it): request ids recur across simulations.
    _latest: tuple[list[int] | None, list[int]] = (None, [])

    def __init__(self, capacity: int = 1 << 16) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[int, None] = OrderedDict()

    @classmethod
    def of_tokens(cls, num_tokens: int) -> PrefixIndex:
        """An index as large as a prefix cache of `num_tokens` tokens (`KVCacheManager.prefix_cache_tokens`)."""
        return cls(num_tokens // cls.BLOCK_TOKENS)

    @classmethod
    def keys_of(cls, tokens: Sequence[int]) -> list[int]:
        keys, parent, size = [], None, cls.BLOCK_TOKENS
        for i in range(len(tokens) // size):
            parent = chain_key(parent, tuple(tokens[i * size:(i + 1) * size]))
            keys.append(parent)
        return keys

    @classmethod
    def prompt_keys(cls, request: Request) -> list[int]:
        """The block keys of the request's prompt (which never changes)."""
        if cls._latest[0] is not request.prompt_token_ids:
            cls._latest = (request.prompt_token_ids, cls.keys_of(request.prompt_token_ids))
        return cls._latest[1]

    def num_cached_tokens(self, keys: Sequence[int]) -> int:
        """Tokens of the longest prefix of these block keys sent here."""
        n = 0
        while n < len(keys) and keys[n] in self._keys:
            n += 1
        return n * self.BLOCK_TOKENS

    def cached_prompt_tokens(self, request: Request) -> int:
        """What admission may plan as cached for the request here: never its whole prompt, whose last token is
        always computed (it gives the first output token)."""
        return min(self.num_cached_tokens(self.prompt_keys(request)), request.num_prompt_tokens - 1)

    def add(self, keys: Sequence[int]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.capacity:
            self._keys.popitem(last=False)


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
    """Keeps the request's TTFT promise and, among the replicas that can, reuses the most and leaves the most room:
    of the replicas predicted (latency model and queue) to meet its TTFT SLO, the one believed to hold the longest
    prefix of its prompt in cache (`ReplicaView.cached_prompt_tokens`, as SGLang's cache-aware router and llm-d's
    prefix scorer), then the one with the fewest outstanding tokens. When none can, or the request has no TTFT SLO,
    the one with the least predicted TTFT (Llumnix's load-aware dispatch, with time instead of memory as the load);
    fewest outstanding tokens breaks ties, and decides alone among replicas that cannot predict.

    Why not always the least predicted TTFT: once the promise is kept, a sooner first token gains nothing, and
    sending each request to the replica that could start it soonest spends the room a long prompt arriving next
    needs: in `pacer sim` that refused more long prompts than round robin did (benchmarks/README.md). The time
    the request has already waited is left to `dispatch`, which overrides a pick that would miss."""

    def choose(self, request: Request, replicas: Sequence[ReplicaView]) -> int:
        times = [_or_inf(replica.predicted_ttft_s(request)) for replica in replicas]
        ttft_slo = request.slo.ttft_s
        in_time = [i for i in range(len(replicas)) if ttft_slo is not None and times[i] <= ttft_slo]
        if in_time:
            cached = {i: replicas[i].cached_prompt_tokens(request) for i in in_time}
            return min(in_time, key=lambda i: (-cached[i], replicas[i].num_outstanding_tokens, times[i]))
        return min(range(len(replicas)), key=lambda i: (times[i], replicas[i].num_outstanding_tokens))


def with_hit(request: Request, num_cached_tokens: int) -> Request:
    """The request as a replica holding that much of its prompt would plan it: a shallow copy where the hit differs
    (what a view predicts with; the request itself keeps the prediction of the replica it goes to)."""
    if num_cached_tokens == request.num_cached_tokens:
        return request
    planned = copy.copy(request)
    planned.num_cached_tokens = num_cached_tokens
    return planned


def _or_inf(seconds: float | None) -> float:
    return math.inf if seconds is None else seconds


def dispatch(requests: Sequence[Request], replicas: Sequence[ReplicaView], router: Router, now: float,
             admit: bool = True) -> int:
    """The replica for one call's requests (its `n` choices, which go together and queue in order), with admission
    across replicas: the router's choice for the first if it can meet its TTFT SLO (or does not predict); else the
    replica with the least predicted TTFT if that one can; else SLOUnattainable (a 429) with the soonest Retry-After.
    So a request is refused only when no replica can serve it in time, whatever the policy; the other choices are
    admitted behind the first on its replica. Without `admit`, the router's choice, whatever it predicts."""
    first = requests[0]
    index = router.choose(first, replicas)
    if not admit:
        return index
    index = _admitted(first, replicas, index, now)
    for i in range(1, len(requests)):
        ttft_slo = requests[i].slo.ttft_s
        predicted = replicas[index].predicted_ttft_s(requests[i], requests[:i]) if ttft_slo is not None else None
        if predicted is not None and waited_s(requests[i], now) + predicted > ttft_slo:
            raise refusal(waited_s(requests[i], now) + predicted, ttft_slo)
    return index


def _admitted(request: Request, replicas: Sequence[ReplicaView], index: int, now: float) -> int:
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
