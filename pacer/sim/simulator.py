"""Discrete-event simulation in virtual time. The real Engine, Scheduler, KV manager, admission control and
router run unchanged; only the executor is simulated. Nothing here sleeps or reads the wall clock: pop the
earliest event, set the clock, handle it, push what it causes (Vidur's loop). With a decode pool, prefill and decode
run on separate replicas (disagg.py).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from pacer.bench.metrics import RequestRecord
from pacer.engine.engine import Engine
from pacer.request import SLO, FinishReason, Request, RequestOutput, SamplingParams
from pacer.scheduling import ModelOutput, SchedulerOutput
from pacer.scheduling.admission import SLOUnattainable
from pacer.scheduling.handover import decode_request, hands_over, prefill_only
from pacer.scheduling.router import RoundRobinRouter, Router, dispatch
from pacer.sim.disagg import DecodePool
from pacer.sim.replica import SimReplica

# Simultaneous events are handled in this order: an iteration ending at t frees its KV and emits its tokens,
# then requests arriving at t are routed and admitted, and prefilled requests whose KV arrives at t are handed to
# a decode replica, then the next iterations are planned at t (so they see all that). Among events of one kind,
# first pushed first.
_END, _ARRIVE, _HANDOFF, _START = 0, 1, 2, 3


class VirtualClock:
    """The simulator's time, in seconds; the engines read it as their clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulated workload. No text: lengths, timing and what its prompt shares with others matter
    to the scheduler."""

    index: int
    arrival_s: float | None  # None in closed loop: sent when a slot frees
    num_prompt_tokens: int
    max_tokens: int
    slo: SLO = field(default_factory=SLO)
    slo_class: str | None = None  # for the report, as the bench records it
    prefix: tuple[int, ...] = ()  # the head of its prompt that others share (token ids); the rest is its own
    # Multi-turn, as the bench sends it: a turn > 0 follows the request before it in the workload, think_s after
    # that one ends, and its prompt is that one's prompt and output, then its own num_prompt_tokens.
    turn: int = 0
    think_s: float = 0.0

    def prompt_token_ids(self) -> list[int]:
        """The shared head, then tokens no other request has: its index in base 255 (ids 1-255, so any model's
        vocabulary takes them, and small ints cost no memory of their own), then zeros."""
        own = self.num_prompt_tokens - len(self.prefix)
        if own <= 0:
            return list(self.prefix[:self.num_prompt_tokens])
        marker = [1 + self.index % 255, 1 + self.index // 255 % 255, 1 + self.index // 65025 % 255]
        return [*self.prefix, *marker[:own], *[0] * (own - len(marker))]


@dataclass(frozen=True)
class _Held:
    """KV blocks a prefill replica keeps for a prompt it sent, until a decode replica adopts the request."""

    replica: SimReplica
    blocks: list[int]


class Simulator:
    """Runs a workload through one or more engine replicas behind a router, in virtual time.

    Every request ends exactly once, as the bench client would record it: "ok", "rejected" (admission's 429)
    or "failed" (refused as too long: a 400; expired in the queue: a 503).

    With `decode`, `engines` only prefill: a request runs there to its first token, its KV moves to the decode
    pool in `decode.transfer.seconds`, and a decode replica adopts it (`Engine.adopt`), or, while none has room
    (KV blocks or batch slots), it waits in arrival order. Its KV stays on the prefill replica until adopted, and
    while any request waits so, the prefill pool pauses (backpressure): the wait then falls before the first token,
    where the TTFT SLO sees it, not between the first and second, where a request's P99 (or mean) gap would hide it.
    """

    def __init__(self, engines: Sequence[Engine], clock: VirtualClock, router: Router | None = None,
                 decode: DecodePool | None = None) -> None:
        if not engines:
            raise ValueError("the simulator needs at least one engine")
        self.clock = clock
        self.replicas = [SimReplica(engine) for engine in engines]
        self.router = router or RoundRobinRouter()
        self.decode = decode
        self._in_transfer: set[str] = set()  # prefilled, their first token out, their KV on its way
        self._held: dict[str, _Held] = {}  # by request id: arrived at a decode replica, waiting for room there
        self._paused: list[SimReplica] = []  # prefill replicas with work, held back while a hand-over waits
        self._events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self._records: dict[int, RequestRecord] = {}
        self._by_id: dict[str, RequestRecord] = {}  # by request id, as outputs name them
        self._live: dict[str, Request] = {}
        self._closed_loop: list[SimRequest] = []
        self._next_turn: dict[int, SimRequest] = {}  # by the index of the turn it follows
        self._history: dict[str, list[int]] = {}  # prompt + output ids of a turn that another follows, by request id

    def run(self, requests: Sequence[SimRequest], concurrency: int | None = None) -> list[RequestRecord]:
        """Simulate until every request has ended; records in request order. With `concurrency`, a closed loop:
        that many conversations (single requests are conversations of one turn) start at 0 and each one that ends
        sends the next (arrival times are ignored)."""
        self._records = {r.index: RequestRecord(r.index, r.num_prompt_tokens, r.max_tokens, r.arrival_s,
                                                slo_class=r.slo_class, turn=r.turn) for r in requests}
        if len(self._records) != len(requests):
            raise ValueError("request indices must be unique")
        self._by_id = {str(index): record for index, record in self._records.items()}
        self._next_turn = {before.index: r for before, r in itertools.pairwise(requests) if r.turn}
        starts = [r for i, r in enumerate(requests) if not (r.turn and i)]
        if concurrency is None:
            for request in starts:
                if request.arrival_s is None:
                    raise ValueError(f"request {request.index} has no arrival time (closed loop needs concurrency)")
                self._push(request.arrival_s, _ARRIVE, request)
        else:
            if concurrency < 1:
                raise ValueError(f"concurrency must be at least 1, got {concurrency}")
            self._closed_loop = list(reversed(starts))
            for _ in range(min(concurrency, len(starts))):
                self._push(self.clock.now, _ARRIVE, self._closed_loop.pop())
        while self._events:
            time_s, kind, _, data = heapq.heappop(self._events)
            self.clock.now = time_s
            if kind == _END:
                self._end(*data)  # type: ignore[misc]
            elif kind == _ARRIVE:
                self._arrive(data)  # type: ignore[arg-type]
            elif kind == _HANDOFF:
                self._handoff(*data)  # type: ignore[misc]
            else:
                self._start(data)  # type: ignore[arg-type]
        unfinished = [r.index for r in self._records.values() if r.finished_s is None]
        if unfinished:
            raise RuntimeError(f"simulation ended with {len(unfinished)} requests unfinished, e.g. {unfinished[:5]}")
        return [self._records[r.index] for r in requests]

    def _push(self, time_s: float, kind: int, data: object) -> None:
        heapq.heappush(self._events, (time_s, kind, next(self._order), data))

    @property
    def all_replicas(self) -> list[SimReplica]:
        return self.replicas + (self.decode.replicas if self.decode else [])

    # ---- event handlers -----------------------------------------------------------------------------------

    def _arrive(self, sim: SimRequest) -> None:
        now = self.clock.now
        record = self._records[sim.index]
        record.scheduled_s = record.sent_s = now
        prompt = self._history.pop(str(sim.index - 1), []) + sim.prompt_token_ids() if sim.turn else \
            sim.prompt_token_ids()
        record.num_prompt_tokens = len(prompt)
        if sim.index in self._next_turn:
            self._history[str(sim.index)] = list(prompt)
        request = Request(str(sim.index), prompt, _sampling(sim.max_tokens), sim.slo, arrival_s=now)
        try:
            self.replicas[0].engine.scheduler.check(request)  # what the server validates before queueing: a 400
            if self.decode is not None and hands_over(request):
                request = prefill_only(request)
            replica = self.replicas[dispatch([request], self.replicas, self.router, now)]
        except ValueError as error:
            return self._ended(record, "failed", "http_4xx", str(error))
        except SLOUnattainable as error:
            record.retry_after_s = error.retry_after_s
            return self._ended(record, "rejected", "http_429", str(error))
        replica.add_request(request)
        self._live[request.request_id] = request
        self._wake(replica)

    def _wake(self, replica: SimReplica) -> None:
        if self._held_back(replica):
            return
        if not replica.busy:
            replica.busy = True
            self._push(self.clock.now, _START, replica)

    def _start(self, replica: SimReplica) -> None:
        plan, dropped = replica.begin_step()
        self._emit(dropped)
        if plan.is_empty:
            replica.busy = False
            return
        result = replica.engine.executor.execute(plan)
        replica.num_iterations += 1
        self._push(self.clock.now + result.elapsed_s, _END, (replica, plan, result))

    def _end(self, replica: SimReplica, plan: SchedulerOutput, result: ModelOutput) -> None:
        outputs = replica.end_step(plan, result)
        if self.decode is not None:
            self._send_kv(replica)
            if len(replica.adoptions):  # a decode replica: it may have freed room
                self._adopt_waiting(replica)
        self._emit(outputs)
        replica.busy = False
        if replica.engine.has_unfinished:
            self._wake(replica)

    # ---- disaggregation: prefill replica -> KV transfer -> decode replica --------------------------------

    def _send_kv(self, replica: SimReplica) -> None:
        """Prompts a prefill replica has just finished: their KV leaves for the decode pool, and stays in the prefill
        replica's blocks until a decode replica has it (so a full decode pool slows the prefill pool down)."""
        assert self.decode is not None
        for request_id in list(replica.engine.exported):
            prefilled = self._live[request_id]
            self._in_transfer.add(request_id)
            self._by_id[request_id].server_scheduling_delay_s = prefilled.first_scheduled_s - prefilled.arrival_s
            held = _Held(replica, replica.hold_kv(prefilled.num_prompt_tokens))
            # the decode replica is chosen now, as the real front end does, and only the blocks it lacks move
            target, held_tokens = self.decode.choose(prefilled)
            payload = replica.engine.take_exported(request_id, held_tokens)
            moved = payload.num_tokens - payload.first_block * replica.engine.scheduler.kv.block_size
            self._push(self.clock.now + self.decode.transfer.seconds(moved), _HANDOFF,
                       (prefilled, payload, held, target))

    def _handoff(self, prefilled: Request, payload: object, held: _Held, target: SimReplica) -> None:
        """The KV has arrived: the decode replica adopts the request, or it waits there behind those already waiting
        (`Adoptions`, as a real decode replica's engine loop holds them)."""
        assert self.decode is not None
        sampling = _sampling(self._by_id[prefilled.request_id].max_tokens)
        request = decode_request(prefilled, sampling, prefilled.token_ids[-1:])
        self._live[request.request_id] = request
        self._in_transfer.discard(request.request_id)
        self._held[request.request_id] = held
        target.adoptions.add(request, payload)
        self._adopt_waiting(target)

    def _adopt_waiting(self, replica: SimReplica) -> None:
        for request, error in replica.adoptions.take(replica):
            held = self._held.pop(request.request_id)
            if error is None:
                self._wake(replica)
            else:  # it can never fit there: the client sees a failed stream after its first token
                self._live.pop(request.request_id)
                self._ended(self._by_id[request.request_id], "failed", "http_5xx", f"hand-over failed: {error}")
            held.replica.release_kv(held.blocks)
            if held.replica.engine.has_unfinished:  # it may have been waiting for those blocks
                self._wake(held.replica)
        if not self._held:  # none waiting: the prefill pool goes on
            paused, self._paused = self._paused, []
            for prefill in paused:
                self._wake(prefill)

    def _held_back(self, replica: SimReplica) -> bool:
        """Backpressure: a prefill replica waits while a prefilled request waits for room in the decode pool, rather
        than produce first tokens the decode pool cannot continue."""
        if not self._held or replica.busy or replica in self.decode.replicas:
            return False
        if replica not in self._paused:
            self._paused.append(replica)
        return True

    # ---- what the client would have seen ------------------------------------------------------------------

    def _emit(self, outputs: list[RequestOutput]) -> None:
        now = self.clock.now
        for output in outputs:
            record = self._by_id[output.request_id]
            record.token_times_s.extend([now] * len(output.new_token_ids))
            if output.request_id in self._history:  # the next turn's prompt holds this answer
                self._history[output.request_id].extend(output.new_token_ids)
            if not output.finished or output.request_id in self._in_transfer:
                continue
            request = self._live.pop(output.request_id)
            record.output_tokens = output.num_output_tokens
            if record.server_scheduling_delay_s is None and request.first_scheduled_s is not None \
                    and request.arrival_s is not None:
                record.server_scheduling_delay_s = request.first_scheduled_s - request.arrival_s
            if output.finish_reason is FinishReason.EXPIRED:
                self._ended(record, "failed", "http_5xx", "slo_expired: the TTFT deadline passed in the queue")
            elif output.finish_reason is FinishReason.ABORT:
                self._ended(record, "failed", "http_5xx", "aborted")
            else:
                self._ended(record, "ok", None, None)

    def _ended(self, record: RequestRecord, status: str, kind: str | None, error: str | None) -> None:
        """As the bench client ends a request: the conversation's next turn follows an answer after its think
        time, and is refused unsent (as are the turns after it) if this one was not answered."""
        record.status, record.error_kind, record.error = status, kind, error
        record.finished_s = self.clock.now
        follow = self._next_turn.pop(record.index, None)
        if follow is not None:
            if status == "ok":
                return self._push(self.clock.now + follow.think_s, _ARRIVE, follow)
            self._history.pop(str(record.index), None)
            return self._ended(self._records[follow.index], "rejected", "conversation_ended",
                               f"not sent: turn {record.turn} was {status} ({kind})")
        if self._closed_loop:
            self._push(self.clock.now, _ARRIVE, self._closed_loop.pop())


def _sampling(max_tokens: int) -> SamplingParams:
    """A simulated request's sampling: its length is all that matters (no EOS in virtual tokens)."""
    return SamplingParams(max_tokens=max_tokens, ignore_eos=True)
