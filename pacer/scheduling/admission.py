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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

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


class QueuedPrompt(NamedTuple):
    """A request not yet past its prompt, as admission sees it."""

    priority: int
    ttft_deadline_s: float
    num_to_prefill: int  # prompt tokens still to prefill
    num_computed_tokens: int  # tokens already computed, or found cached by a request that has not started
    num_to_go: int  # output tokens it may still generate (`tokens_to_go`)


@dataclass(frozen=True)
class QueueSnapshot:
    """What admission needs of the scheduler's state, frozen after an iteration."""

    queue: tuple[QueuedPrompt, ...]  # every request not yet past its prompt
    decodes: tuple[tuple[int, int], ...]  # (context, output tokens it may still generate) of each running decode
    tbt_limit_s: float  # the tightest TBT SLO among the requests (inf if none)
    token_budget: int  # the policy's cap on tokens per iteration
    max_request_tokens: int  # where a request without max_tokens stops
    tpot_s: float = math.inf  # the tightest TPOT SLO among the requests
    # how long until the tightest running decode with a TPOT is due its next token (inf if none): it may lend that
    # to one long iteration, and after it gets one token each iteration, each due one TPOT later
    tpot_slack_s: float = math.inf


def tokens_to_go(request: Request, max_request_tokens: int) -> int:
    """Output tokens the request may still generate: up to its max_tokens, or to the request length limit."""
    left = max_request_tokens - request.num_tokens
    if request.sampling.max_tokens is not None:
        left = min(left, request.sampling.max_tokens - request.num_output_tokens)
    return max(0, left)


class _Decodes:
    """The decodes as admission plays iterations forward: each reads one more token of context every iteration and
    leaves after its last output token (at max_tokens; an EOS can only make it leave sooner)."""

    def __init__(self) -> None:
        self.count = 0
        self.context = 0
        self._leaving: dict[int, list[int]] = {}  # iteration -> [decodes whose last it is, their context after it]

    def add(self, context: int, to_go: int, first: int) -> None:
        """A decode of `context` tokens that generates one token in each iteration from `first` on, `to_go` in all."""
        if to_go > 0:
            self.count += 1
            self.context += context
            leaving = self._leaving.setdefault(first + to_go - 1, [0, 0])
            leaving[0] += 1
            leaving[1] += context + to_go

    def step(self, iteration: int) -> None:
        """After `iteration`: every decode has one more token, and those that generated their last are gone."""
        self.context += self.count
        count, context = self._leaving.pop(iteration, (0, 0))
        self.count -= count
        self.context -= context

    @property
    def shape(self) -> BatchShape:
        return BatchShape(num_decodes=self.count, decode_context=self.context)


@dataclass(frozen=True)
class _Pace:
    """How long an iteration may run beside running decodes, as the `slo` scheduler sizes it: within the tightest
    TBT, and until the tightest TPOT decode's next token is due (`due_s`, which moves one TPOT later with each
    iteration: a decode ahead of its pace lends the slack), over 1 + the latency model's margin."""

    tbt_s: float
    tpot_s: float
    divisor: float  # 1 + margin for as many decodes; inf without decodes (no limit)

    def limit_s(self, start_s: float, due_s: float) -> float:
        if math.isinf(self.divisor):
            return math.inf
        return max(0.0, min(self.tbt_s, due_s - start_s)) / self.divisor

    def next_due_s(self, due_s: float, end_s: float, joined: bool = False) -> float:
        """After an iteration ending at end_s: each decode has one more token (due one TPOT later), and a prompt it
        finished (`joined`) has its first (its second due one TPOT after)."""
        return (min(due_s, end_s) if joined else due_s) + self.tpot_s


@dataclass(frozen=True)
class Boundary:
    """Where a request stands behind a prefix of the queue: the iteration that finishes that prefix's prompts starts
    at `start_s` and holds `shape` once they are in, with room for `room` of the request's prompt tokens, its TPOT
    decode due at `due_s`; after it, the request goes on in chunks beside `decodes` at `pace`."""

    start_s: float
    shape: BatchShape
    room: int
    decodes: BatchShape
    pace: _Pace
    due_s: float


@dataclass
class _Chunks:
    """A request's own iterations behind a boundary, which are the same whatever its length until its last chunk: so
    they are played once per boundary, and further as longer prompts ask. Iteration k starts at `seconds[k]` with
    `shapes[k]` and takes its prompt up to `ends[k]` tokens; k = 0 is the boundary's iteration, with its room."""

    ends: list[int]
    seconds: list[float]  # one more: when the next iteration, not yet played, starts
    shapes: list[BatchShape]  # likewise: the decodes of the next
    dues: list[float]  # likewise: when the TPOT decode's token from that iteration is due
    pace: _Pace

    @classmethod
    def of(cls, at: Boundary, latency: LatencyModel) -> _Chunks:
        whole = at.shape.with_chunk(at.room, 0) if at.room else at.shape
        end = at.start_s + latency.predict(whole)
        return cls([at.room], [at.start_s, end], [at.shape, at.decodes],
                   [at.due_s, at.pace.next_due_s(at.due_s, end)], at.pace)

    def limit_s(self, k: int) -> float:
        return self.pace.limit_s(self.seconds[k], self.dues[k])

    def fits(self, tokens: int, latency: LatencyModel, budget: int) -> bool:
        """Would the rest of a prompt of `tokens` fit the next iteration? (The common case, so it is checked with one
        prediction before the next iteration's largest chunk is searched for.)"""
        decodes, start = self.shapes[-1], self.ends[-1]
        return tokens - start <= budget - decodes.num_decodes and \
            latency.predict(decodes.with_chunk(tokens - start, start)) <= self.limit_s(-1)

    def extend(self, latency: LatencyModel, budget: int) -> bool:
        """Play the next iteration; False if it cannot take a prompt token (the decodes fill the budget)."""
        decodes, start = self.shapes[-1], self.ends[-1]
        left = budget - decodes.num_decodes
        if left <= 0:
            return False
        chunk = largest_chunk(latency, decodes, start, left, self.limit_s(-1)) or min(MIN_CHUNK, left)
        self.ends.append(start + chunk)
        self.seconds.append(self.seconds[-1] + latency.predict(decodes.with_chunk(chunk, start)))
        self.shapes.append(decodes._replace(decode_context=decodes.decode_context + decodes.num_decodes))
        self.dues.append(self.pace.next_due_s(self.dues[-1], self.seconds[-1]))
        return True


MAX_ITERATIONS = 256  # played forward per snapshot (cost); a longer queue's rest is extrapolated at the rate so far


@dataclass(frozen=True)
class QueueTimes:
    """Seconds from a snapshot to a request's first token, from the scheduler's iterations played forward on the
    latency model: the decodes, then chunks of the prompts in priority/deadline order, each as large as the
    tightest TBT allows beside them, or the TPOT slack, as the scheduler lends it: the tightest decode's next token
    is due at its slack, then one TPOT later for each iteration. A prompt becomes a decode when it is done (so later
    chunks shrink), each decode leaves at its max_tokens, and a chunk over earlier context costs its attention. The
    iteration in flight at the snapshot was planned without the request; the request's own chunks after the first
    are sized for the TBT or TPOT pace (the slack lent to the first).

    Split in two, so a router reading many replicas at every arrival pays for the request-independent half (where
    each prefix of the queue is done) once per snapshot, and `ttft_s` then costs a bisection and the request's
    own chunks."""

    keys: list[tuple[int, float]]  # (priority, TTFT deadline) of the queued requests, sorted
    prompts: list[tuple[int, int]]  # (tokens to prefill, tokens computed) of each, after the iteration in flight
    boundaries: list[Boundary]  # boundaries[i]: behind keys[:i]
    budget: int
    # 1 + the latency model's margin for a sum of iterations. A prediction is divided by it: the soonest first token
    # the model's error allows, since a refused request is a miss for certain and a refusal must be right.
    scale: float
    latency: LatencyModel
    _chunks: dict[int, _Chunks] = field(default_factory=dict)  # behind boundaries[i], played as far as asked

    @classmethod
    def of(cls, snapshot: QueueSnapshot, latency: LatencyModel, pending: Iterable[Request] = ()) -> QueueTimes:
        """`pending`: requests submitted since the snapshot, which it does not count yet."""
        pending = list(pending)
        added = (QueuedPrompt(r.slo.priority, r.ttft_deadline_s, r.num_prompt_tokens - r.num_cached_tokens,
                              r.num_cached_tokens, tokens_to_go(r, snapshot.max_request_tokens))
                 for r in pending)  # a cached prefix: less to prefill
        # stable: ties stay in arrival order, as the scheduler has them
        queue = sorted((*snapshot.queue, *added), key=lambda entry: (entry.priority, entry.ttft_deadline_s))
        keys = [(entry.priority, entry.ttft_deadline_s) for entry in queue]
        tbt = min((snapshot.tbt_limit_s, *(r.slo.tbt_s for r in pending if r.slo.tbt_s is not None)))
        tpot = min((snapshot.tpot_s, *(r.slo.tpot_s for r in pending if r.slo.tpot_s is not None)))
        due = snapshot.tpot_slack_s  # when the tightest TPOT decode's next token is due, from the snapshot
        budget = snapshot.token_budget
        decodes = _Decodes()
        for context, to_go in snapshot.decodes:
            decodes.add(context, to_go, 0)

        def pace() -> _Pace:
            return _Pace(tbt, tpot, 1 + latency.margin(decodes.count) if decodes.count else math.inf)

        def boundary(start_s: float, shape: BatchShape, room: int) -> Boundary:
            return Boundary(start_s, shape, room, decodes.shape, pace(), due)

        times = cls(keys, [(entry.num_to_prefill, entry.num_computed_tokens) for entry in queue], [], budget,
                    1 + latency.margin(), latency)
        if not queue and not decodes.count:  # idle: nothing in flight, nothing ahead
            times.boundaries.append(boundary(0.0, BatchShape(), budget))
            return times
        seconds, prefilled, index = 0.0, 0, 0
        todo, start = (queue[0].num_to_prefill, queue[0].num_computed_tokens) if queue else (0, 0)
        for iteration in range(MAX_ITERATIONS):
            shape, limit, room = decodes.shape, pace().limit_s(seconds, due), budget - decodes.count
            first_done, behind = index, []  # behind: (shape, room) right after each prompt this iteration finishes
            while index < len(queue) and room > 0:
                chunk = largest_chunk(latency, shape, start, min(todo, room), limit)
                if chunk == 0 and shape.num_prefill_tokens == 0:
                    chunk = min(MIN_CHUNK, todo, room)  # progress, as the scheduler makes it
                if chunk == 0:
                    break
                shape, room, prefilled = shape.with_chunk(chunk, start), room - chunk, prefilled + chunk
                if chunk < todo:
                    todo, start = todo - chunk, start + chunk
                    break
                if iteration:  # what a request queued right behind it would get of the iteration
                    behind.append((shape, largest_chunk(latency, shape, 0, room, limit)))
                index += 1
                if index < len(queue):
                    todo, start = queue[index].num_to_prefill, queue[index].num_computed_tokens
            decodes.step(iteration)
            done = queue[first_done:index]  # prompts whose first token this iteration gives: decodes from the next
            if iteration == 0:  # in flight at the snapshot, planned without the request: it all runs, the request
                for entry in done:  # joins the next iteration at best, and the prompts have this much left then
                    decodes.add(entry.num_computed_tokens + entry.num_to_prefill + 1, entry.num_to_go - 1, 1)
                times.boundaries.extend(boundary(seconds, shape, 0) for _ in range(1 + len(done)))
                times.prompts[:index] = [(0, 0)] * index
                if index < len(queue):
                    times.prompts[index] = (todo, start)
            else:  # a request behind a prompt takes the room of the prompts after it, which do not finish
                for entry, (after, room_behind) in zip(done, behind):
                    decodes.add(entry.num_computed_tokens + entry.num_to_prefill + 1, entry.num_to_go - 1,
                                iteration + 1)
                    times.boundaries.append(boundary(seconds, after, room_behind))
            seconds += latency.predict(shape)
            if decodes.count:
                due = pace().next_due_s(due, seconds, joined=bool(done))
            if index == len(queue):
                return times
        per_token_s = seconds / prefilled if prefilled else math.inf  # the rest, at the rate so far
        ahead = 0
        for i in range(index, len(queue)):
            ahead += todo if i == index else queue[i].num_to_prefill
            times.boundaries.append(boundary(seconds + ahead * per_token_s, BatchShape(), 0))
        return times

    def ttft_s(self, request: Request) -> float:
        index = bisect.bisect_right(self.keys, (request.slo.priority, request.ttft_deadline_s))
        at, tokens = self.boundaries[index], request.num_prompt_tokens - request.num_cached_tokens  # to prefill
        if not math.isfinite(at.start_s):
            return math.inf
        chunks = self._chunks.get(index) or self._chunks.setdefault(index, _Chunks.of(at, self.latency))
        while chunks.ends[-1] < tokens and not chunks.fits(tokens, self.latency, self.budget):
            if not chunks.extend(self.latency, self.budget):
                return math.inf
        k = bisect.bisect_left(chunks.ends, tokens)  # the iteration that gives its first token
        start = chunks.ends[k - 1] if k else 0
        shape = chunks.shapes[k].with_chunk(tokens - start, start + request.num_cached_tokens)
        shape = self._filled(shape, index, self.budget - shape.num_tokens, chunks.limit_s(k))  # the prompts behind
        return (chunks.seconds[k] + self.latency.predict(shape)) / self.scale

    def _filled(self, shape: BatchShape, index: int, room: int, limit_s: float) -> BatchShape:
        """`shape` with chunks of the prompts from `index` on packed into its `room`, as the scheduler packs them."""
        for todo, start in itertools.islice(self.prompts, index, None):
            if todo == 0:  # done in the iteration in flight
                continue
            chunk = largest_chunk(self.latency, shape, start, min(todo, room), limit_s) if room > 0 else 0
            if chunk == 0:
                break
            shape, room = shape.with_chunk(chunk, start), room - chunk
            if chunk < todo:
                break
        return shape


def predict_ttft(snapshot: QueueSnapshot, pending: Iterable[Request], request: Request,
                 latency: LatencyModel) -> float:
    """Seconds from the snapshot to the request's first token, behind the snapshot's queue and `pending`."""
    return QueueTimes.of(snapshot, latency, pending).ttft_s(request)


def waited_s(request: Request, now: float) -> float:
    return now - (request.arrival_s if request.arrival_s is not None else now)


def refusal(predicted_ttft_s: float, ttft_slo_s: float) -> SLOUnattainable:
    """The 429 for a request predicted to reach its first token at `predicted_ttft_s` (from arrival): Retry-After
    is the predicted excess (how long until the work ahead has drained enough), in whole seconds, at least 1."""
    excess = predicted_ttft_s - ttft_slo_s if math.isfinite(predicted_ttft_s) else 60.0
    return SLOUnattainable(predicted_ttft_s, ttft_slo_s, max(1, min(3600, math.ceil(excess))))


class QueueState(NamedTuple):
    """What an engine publishes after each iteration for admission elsewhere, as one value (a reader on another
    thread never sees half of it): its queue, and how many submitted requests it had taken in by then."""

    snapshot: QueueSnapshot | None = None
    num_taken: int = 0


class QueueView:
    """A replica's queue as admission sees it from outside the engine's thread or process: the snapshot of its
    latest iteration (`latest`, published by the engine side), plus the requests submitted since that the snapshot
    does not count yet (recorded by the submitting side)."""

    def __init__(self, latency: LatencyModel | None = None) -> None:
        self.latency = latency
        self.latest = QueueState()
        self._num_submitted = 0
        self._submitted: deque[tuple[int, Request]] = deque()
        # The queue played forward for (latest, _num_submitted): until the engine publishes again or a request is
        # submitted, every arrival reads the same play, so a burst of refused requests pays for it once.
        self._times: tuple[QueueState, int, QueueTimes] | None = None

    def submitted(self, request: Request) -> None:
        self._num_submitted += 1
        self._submitted.append((self._num_submitted, request))
        self._forget_taken(self.latest.num_taken)

    def pending(self, num_taken: int | None = None) -> list[Request]:
        """Submitted requests the engine had not taken in at its latest publication (or when it had taken
        `num_taken`: the count published with the snapshot they are added to)."""
        self._forget_taken(self.latest.num_taken if num_taken is None else num_taken)
        return [request for _, request in self._submitted]

    def _forget_taken(self, num_taken: int) -> None:
        while self._submitted and self._submitted[0][0] <= num_taken:
            self._submitted.popleft()

    def predicted_ttft_s(self, request: Request, extra: Sequence[Request] = ()) -> float | None:
        """Seconds from now to the request's first token if it were queued here (behind `extra` too); None if
        this engine does not predict (no latency model, or a policy without admission control)."""
        latest = self.latest  # one read: the engine thread replaces the tuple whole
        snapshot, num_taken = latest
        if snapshot is None or self.latency is None:
            return None
        if extra:
            return predict_ttft(snapshot, [*self.pending(num_taken), *extra], request, self.latency)
        if self._times is None or self._times[0] is not latest or self._times[1] != self._num_submitted:
            self._times = (latest, self._num_submitted, QueueTimes.of(snapshot, self.latency, self.pending(num_taken)))
        return self._times[2].ttft_s(request)

    def admit(self, request: Request, now: float, extra: Sequence[Request] = ()) -> None:
        """Raise SLOUnattainable if the request, queued here behind `extra` too, is predicted to miss its TTFT
        SLO; accept it if it has none, or if this engine does not predict."""
        ttft_slo = request.slo.ttft_s
        if ttft_slo is None:
            return
        ahead = self.predicted_ttft_s(request, extra)
        if ahead is None:
            return
        predicted = waited_s(request, now) + ahead
        if predicted > ttft_slo:
            raise refusal(predicted, ttft_slo)
