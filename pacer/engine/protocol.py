"""What travels between a served engine and its front end, whatever carries it (a thread's queue, a process's pipe, a
Ray actor's calls): the commands in, the updates out, the record a replica sends when it is ready, and the errors a
caller of the front end sees. Plain frozen dataclasses: they pickle, and a reader on another thread never sees half
of one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pacer.engine.engine import IterationStats
from pacer.latency.model import LatencyModel
from pacer.request import Request, RequestOutput
from pacer.scheduling.admission import QueueState
from pacer.scheduling.base import RequestLimits

# ---- commands: front end -> engine loop -----------------------------------------------------------------------


@dataclass(frozen=True)
class Add:
    """Requests admitted by the front end, to queue in this order."""

    requests: list[Request]


@dataclass(frozen=True)
class Adopt:
    """A request another replica prefilled, with its KV (`Engine.adopt`); disaggregated serving."""

    request: Request
    payload: object


@dataclass(frozen=True)
class Abort:
    """End these requests now (their caller has gone, or the server is draining); their blocks are freed."""

    request_ids: list[str]


@dataclass(frozen=True)
class Stop:
    """Abort whatever is left and end the engine loop."""


Command = Add | Adopt | Abort | Stop

# ---- updates: engine loop -> front end ------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineLoad:
    """The engine's state after its latest iteration, readable from any thread."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_outstanding_tokens: int = 0  # the `least_tokens` router's load figure


@dataclass(frozen=True)
class Failure:
    """The engine failed this request (or dropped it, expired): the last item of its outputs."""

    request_id: str
    message: str
    expired: bool = False


class EngineObserver(Protocol):
    """Receives what the engine loop saw (the server's Prometheus metrics implement it)."""

    def iteration(self, stats: IterationStats, outputs: list[RequestOutput]) -> None: ...

    def request_finished(self, request: Request) -> None: ...


@dataclass
class EngineUpdate:
    """What the engine loop hands its front end after an iteration: the outputs since its last update, and its state
    after them."""

    outputs: list[RequestOutput | Failure] = field(default_factory=list)
    iterations: list[tuple[IterationStats, list[RequestOutput]]] = field(default_factory=list)  # for metrics
    finished: list[Request] = field(default_factory=list)  # for the request-level metrics
    load: EngineLoad = field(default_factory=EngineLoad)
    queue: QueueState = field(default_factory=QueueState)
    latency: LatencyModel | None = None  # a copy with its online correction, now and then (engine elsewhere)

    def report(self, observer: EngineObserver | None) -> None:
        """Hand the iterations and finished requests to the observer."""
        if observer is not None:
            for stats, outputs in self.iterations:
                observer.iteration(stats, outputs)
            for request in self.finished:
                observer.request_finished(request)

    def absorb(self, later: EngineUpdate) -> None:
        """Fold a later update into this one (a consumer that fell behind takes them as one)."""
        self.outputs += later.outputs
        self.iterations += later.iterations
        self.finished += later.finished
        self.load, self.queue = later.load, later.queue
        if later.latency is not None:
            self.latency = later.latency


@dataclass(frozen=True)
class Ready:
    """A replica's first message (again after a restart): what routing and admission need before its first update."""

    limits: RequestLimits
    latency: LatencyModel | None
    queue: QueueState
    load: EngineLoad
    prefix_cache_tokens: int  # the KV its prefix cache can hold; 0 without one
    pid: int
    host: str


# ---- what a caller of the front end sees ----------------------------------------------------------------------


class QueueFullError(Exception):
    """More requests are waiting than the server was told to queue; retry after `retry_after_s`."""

    def __init__(self, num_queued: int, retry_after_s: int) -> None:
        super().__init__(f"the server has {num_queued} requests queued, its limit; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineError(RuntimeError):
    """The engine failed while serving this request: a server fault, not the client's."""


class RequestExpired(EngineError):
    """The request never started before its TTFT deadline and was dropped (`--drop-expired`)."""
