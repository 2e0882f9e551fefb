"""Discrete-event simulation in virtual time. The real Engine, Scheduler, KV manager, admission control and
router run unchanged; only the executor is simulated. Nothing here sleeps or reads the wall clock: pop the
earliest event, set the clock, handle it, push what it causes (Vidur's loop).
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
from pacer.scheduling.admission import SLOUnattainable, predict_ttft
from pacer.scheduling.router import RoundRobinRouter, Router, dispatch

# Simultaneous events are handled in this order: an iteration ending at t frees its KV and emits its tokens,
# then requests arriving at t are routed and admitted, then the next iterations are planned at t (so they see
# both). Among events of one kind, first pushed first.
_END, _ARRIVE, _START = 0, 1, 2


class VirtualClock:
    """The simulator's time, in seconds; the engines read it as their clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class SimRequest:
    """One request of a simulated workload (no text: only lengths and timing matter to the scheduler)."""

    index: int
    arrival_s: float | None  # None in closed loop: sent when a slot frees
    num_prompt_tokens: int
    max_tokens: int
    slo: SLO = field(default_factory=SLO)
    slo_class: str | None = None  # for the report, as the bench records it


class SimReplica:
    """One engine replica and whether it is working; what a router sees of it (`router.ReplicaView`)."""

    def __init__(self, engine: Engine, clock: VirtualClock) -> None:
        self.engine = engine
        self.clock = clock
        self.busy = False  # an iteration is running, or planned for now
        self.num_iterations = 0

    @property
    def num_outstanding_tokens(self) -> int:
        return self.engine.scheduler.num_outstanding_tokens

    def predicted_ttft_s(self, request: Request) -> float | None:
        """From the queue after the latest iteration, as the real front end sees a replica (it cannot see how far
        the running iteration has got either)."""
        scheduler = self.engine.scheduler
        snapshot = scheduler.snapshot()
        if snapshot is None or scheduler.latency is None:
            return None
        return predict_ttft(snapshot, (), request, scheduler.latency)


class Simulator:
    """Runs a workload through one or more engine replicas behind a router, in virtual time.

    Every request ends exactly once, as the bench client would record it: "ok", "rejected" (admission's 429)
    or "failed" (refused as too long: a 400; expired in the queue: a 503).
    """

    def __init__(self, engines: Sequence[Engine], clock: VirtualClock, router: Router | None = None) -> None:
        if not engines:
            raise ValueError("the simulator needs at least one engine")
        self.clock = clock
        self.replicas = [SimReplica(engine, clock) for engine in engines]
        self.router = router or RoundRobinRouter()
        self._events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self._records: dict[int, RequestRecord] = {}
        self._by_id: dict[str, RequestRecord] = {}  # by request id, as outputs name them
        self._live: dict[str, Request] = {}
        self._closed_loop: list[SimRequest] = []

    def run(self, requests: Sequence[SimRequest], concurrency: int | None = None) -> list[RequestRecord]:
        """Simulate until every request has ended; records in request order. With `concurrency`, a closed loop:
        that many requests start at 0 and each one that ends sends the next (arrival times are ignored)."""
        self._records = {r.index: RequestRecord(r.index, r.num_prompt_tokens, r.max_tokens, r.arrival_s,
                                                slo_class=r.slo_class) for r in requests}
        if len(self._records) != len(requests):
            raise ValueError("request indices must be unique")
        self._by_id = {str(index): record for index, record in self._records.items()}
        if concurrency is None:
            for request in requests:
                if request.arrival_s is None:
                    raise ValueError(f"request {request.index} has no arrival time (closed loop needs concurrency)")
                self._push(request.arrival_s, _ARRIVE, request)
        else:
            if concurrency < 1:
                raise ValueError(f"concurrency must be at least 1, got {concurrency}")
            self._closed_loop = list(reversed(requests))
            for _ in range(min(concurrency, len(requests))):
                self._push(self.clock.now, _ARRIVE, self._closed_loop.pop())
        while self._events:
            time_s, kind, _, data = heapq.heappop(self._events)
            self.clock.now = time_s
            if kind == _END:
                self._end(*data)  # type: ignore[misc]
            elif kind == _ARRIVE:
                self._arrive(data)  # type: ignore[arg-type]
            else:
                self._start(data)  # type: ignore[arg-type]
        unfinished = [r.index for r in self._records.values() if r.finished_s is None]
        if unfinished:
            raise RuntimeError(f"simulation ended with {len(unfinished)} requests unfinished, e.g. {unfinished[:5]}")
        return [self._records[r.index] for r in requests]

    def _push(self, time_s: float, kind: int, data: object) -> None:
        heapq.heappush(self._events, (time_s, kind, next(self._order), data))

    # ---- event handlers -----------------------------------------------------------------------------------

    def _arrive(self, sim: SimRequest) -> None:
        now = self.clock.now
        record = self._records[sim.index]
        record.scheduled_s = record.sent_s = now
        request = Request(str(sim.index), [0] * sim.num_prompt_tokens,
                          SamplingParams(max_tokens=sim.max_tokens, ignore_eos=True), sim.slo, arrival_s=now)
        try:
            self.replicas[0].engine.scheduler.check(request)  # what the server validates before queueing: a 400
            replica = self.replicas[dispatch(request, self.replicas, self.router, now)]
        except ValueError as error:
            return self._ended(record, "failed", "http_4xx", str(error))
        except SLOUnattainable as error:
            record.retry_after_s = error.retry_after_s
            return self._ended(record, "rejected", "http_429", str(error))
        replica.engine.add_request(request)
        self._live[request.request_id] = request
        if not replica.busy:
            replica.busy = True
            self._push(now, _START, replica)

    def _start(self, replica: SimReplica) -> None:
        plan, dropped = replica.engine.begin_step()
        self._emit(dropped)
        if plan.is_empty:
            replica.busy = False
            return
        result = replica.engine.executor.execute(plan)
        replica.num_iterations += 1
        self._push(self.clock.now + result.elapsed_s, _END, (replica, plan, result))

    def _end(self, replica: SimReplica, plan: SchedulerOutput, result: ModelOutput) -> None:
        self._emit(replica.engine.end_step(plan, result))
        if replica.engine.has_unfinished:
            self._push(self.clock.now, _START, replica)
        else:
            replica.busy = False

    # ---- what the client would have seen ------------------------------------------------------------------

    def _emit(self, outputs: list[RequestOutput]) -> None:
        now = self.clock.now
        for output in outputs:
            record = self._by_id[output.request_id]
            record.token_times_s.extend([now] * len(output.new_token_ids))
            if not output.finished:
                continue
            request = self._live.pop(output.request_id)
            record.output_tokens = output.num_output_tokens
            if request.first_scheduled_s is not None and request.arrival_s is not None:
                record.server_scheduling_delay_s = request.first_scheduled_s - request.arrival_s
            if output.finish_reason is FinishReason.EXPIRED:
                self._ended(record, "failed", "http_5xx", "slo_expired: the TTFT deadline passed in the queue")
            elif output.finish_reason is FinishReason.ABORT:
                self._ended(record, "failed", "http_5xx", "aborted")
            else:
                self._ended(record, "ok", None, None)

    def _ended(self, record: RequestRecord, status: str, kind: str | None, error: str | None) -> None:
        record.status, record.error_kind, record.error = status, kind, error
        record.finished_s = self.clock.now
        if self._closed_loop:
            self._push(self.clock.now, _ARRIVE, self._closed_loop.pop())
