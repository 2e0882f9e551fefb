"""Can we still meet this request's TTFT SLO? Decided at arrival from a snapshot of the queue (Clockwork's
early rejection, per iteration): accept, or refuse at once with the predicted wait as Retry-After.

Pure: the snapshot is plain data, taken by the scheduler after an iteration, so the server can decide on
the event loop thread without waiting for the engine, and the simulator can decide in virtual time.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pacer.latency.model import BatchShape, LatencyModel, largest_chunk
from pacer.request import Request

MIN_CHUNK = 16  # tokens a prefill always gets per iteration, so the queue drains even under decode load


class SLOUnattainable(Exception):
    """The request would miss its TTFT SLO: the server answers 429 with `retry_after_s`."""

    def __init__(self, predicted_ttft_s: float, ttft_slo_s: float, retry_after_s: int) -> None:
        super().__init__(f"predicted time to first token {predicted_ttft_s:.2f} s exceeds the request's TTFT SLO "
                         f"of {ttft_slo_s:.2f} s; retry in {retry_after_s} s")
        self.predicted_ttft_s = predicted_ttft_s
        self.retry_after_s = retry_after_s


def queue_key(request: Request, now: float, aging_s: float) -> tuple[float, float, float]:
    """Prefill order: priority first (lower is more important), aged by one level per `aging_s` waited so
    a long or unimportant prompt cannot starve; then TTFT deadline (EDF); then arrival."""
    arrival = request.arrival_s if request.arrival_s is not None else now
    waited = max(0.0, now - arrival)
    return request.slo.priority - math.floor(waited / aging_s), request.ttft_deadline_s, arrival


@dataclass(frozen=True)
class QueueSnapshot:
    """What admission needs of the scheduler's state, frozen after an iteration."""

    # (priority, TTFT deadline, prompt tokens still to prefill) of every request not yet past its prompt
    queue: tuple[tuple[int, float, int], ...]
    decodes: BatchShape  # the running decodes, as one iteration would hold them
    tbt_limit_s: float  # the tightest TBT SLO among running requests (inf if none)
    token_budget: int  # the policy's cap on tokens per iteration


@dataclass(frozen=True)
class QueueTimes:
    """Seconds from a snapshot to a request's first token: the prompt tokens queued ahead of it (in priority/deadline
    order) plus its own, prefilled in chunks sized as the scheduler would size them beside the current decodes.

    Split in two, so a router reading many replicas at every arrival pays for the request-independent half (the
    chunk size and its predicted time, the queue sorted with running sums of its tokens) once per snapshot, and
    `ttft_s` then costs a bisection and at most one prediction."""

    keys: list[tuple[int, float]]  # (priority, TTFT deadline) of the queued requests, sorted
    tokens_through: list[int]  # tokens_through[i]: prompt tokens still to prefill of keys[:i]
    decodes: BatchShape
    chunk: int  # 0: no room beside the decodes, the request would never start
    chunk_s: float  # predicted time of an iteration of the decodes and one full chunk
    scale: float  # 1 + the latency model's margin
    latency: LatencyModel

    @classmethod
    def of(cls, snapshot: QueueSnapshot, latency: LatencyModel, pending: Iterable[Request] = ()) -> QueueTimes:
        """`pending`: requests submitted since the snapshot, which it does not count yet."""
        queue = sorted((*snapshot.queue,
                        *((r.slo.priority, r.ttft_deadline_s, r.num_prompt_tokens) for r in pending)))
        keys = [(priority, deadline) for priority, deadline, _ in queue]
        tokens_through = list(itertools.accumulate((tokens for _, _, tokens in queue), initial=0))
        decodes, room = snapshot.decodes, snapshot.token_budget - snapshot.decodes.num_tokens
        chunk, chunk_s = 0, math.inf
        scale = 1 + latency.margin(decodes.num_decodes)
        if room > 0:
            chunk = max(largest_chunk(latency, decodes, 0, room, snapshot.tbt_limit_s / scale), min(MIN_CHUNK, room))
            chunk_s = latency.predict(decodes.with_chunk(chunk, 0))
        return cls(keys, tokens_through, decodes, chunk, chunk_s, scale, latency)

    def ttft_s(self, request: Request) -> float:
        if not self.chunk:
            return math.inf
        ahead = self.tokens_through[bisect.bisect_right(self.keys, (request.slo.priority, request.ttft_deadline_s))]
        full, rest = divmod(ahead + request.num_prompt_tokens, self.chunk)  # full chunks, then one of the remainder
        seconds = full * self.chunk_s
        if rest:
            seconds += self.latency.predict(self.decodes.with_chunk(rest, 0))
        return seconds * self.scale


def predict_ttft(snapshot: QueueSnapshot, pending: Iterable[Request], request: Request,
                 latency: LatencyModel) -> float:
    """Seconds from the snapshot to the request's first token, behind the snapshot's queue and `pending`."""
    return QueueTimes.of(snapshot, latency, pending).ttft_s(request)


def admit(snapshot: QueueSnapshot, pending: Iterable[Request], request: Request, latency: LatencyModel,
          now: float) -> None:
    """Raise SLOUnattainable if the request's predicted TTFT misses its SLO."""
    ttft_slo = request.slo.ttft_s
    if ttft_slo is not None:
        predicted = waited_s(request, now) + predict_ttft(snapshot, pending, request, latency)
        if predicted > ttft_slo:
            raise refusal(predicted, ttft_slo)


def waited_s(request: Request, now: float) -> float:
    return now - (request.arrival_s if request.arrival_s is not None else now)


def refusal(predicted_ttft_s: float, ttft_slo_s: float) -> SLOUnattainable:
    """The 429 for a request predicted to reach its first token at `predicted_ttft_s` (from arrival): Retry-After
    is the predicted excess (how long until the work ahead has drained enough), in whole seconds, at least 1."""
    excess = predicted_ttft_s - ttft_slo_s if math.isfinite(predicted_ttft_s) else 60.0
    return SLOUnattainable(predicted_ttft_s, ttft_slo_s, max(1, min(3600, math.ceil(excess))))


class QueueView:
    """A replica's queue as admission sees it from outside the engine's thread or process: the snapshot of its
    latest iteration, plus the requests submitted since that the snapshot does not count yet.

    The engine side publishes `(snapshot or None, number of submitted requests it had taken in)` as one tuple,
    so a reader on another thread never sees half an update; the submitting side records each request it sends.
    """

    def __init__(self, latency: LatencyModel | None = None) -> None:
        self.latency = latency
        self.latest: tuple[QueueSnapshot | None, int] = (None, 0)
        self._num_submitted = 0
        self._submitted: deque[tuple[int, Request]] = deque()

    def submitted(self, request: Request) -> None:
        self._num_submitted += 1
        self._submitted.append((self._num_submitted, request))
        self._forget_taken()

    def pending(self) -> list[Request]:
        """Submitted requests the engine had not taken in at its latest publication."""
        self._forget_taken()
        return [request for _, request in self._submitted]

    def _forget_taken(self) -> None:
        num_taken = self.latest[1]
        while self._submitted and self._submitted[0][0] <= num_taken:
            self._submitted.popleft()

    def predicted_ttft_s(self, request: Request, extra: Iterable[Request] = ()) -> float | None:
        """Seconds from now to the request's first token if it were queued here (behind `extra` too); None if
        this engine does not predict (no latency model, or a policy without admission control)."""
        snapshot = self.latest[0]
        if snapshot is None or self.latency is None:
            return None
        return predict_ttft(snapshot, [*self.pending(), *extra], request, self.latency)
