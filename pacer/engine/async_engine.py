"""AsyncEngine: Engine.step runs in one background thread; each generate() call has its own asyncio queue.

The event loop never waits on the model: it checks a request against the fixed limits and, for a
policy with admission control, against its SLO on the queue snapshot of the latest iteration
(scheduling/admission.py); then it queues it for the engine thread and awaits outputs, which the engine thread hands over with
`call_soon_threadsafe` once per iteration. Torch releases the GIL in its kernels, so HTTP parsing
and SSE writing overlap the forward pass.

The engine is also *built* in the engine thread, so every torch op of the process runs in that one
thread. OpenMP (libgomp) keeps a worker pool per calling thread; a second pool (say, the main
thread's, left over from loading the weights) makes it count more threads than cores and stop
spinning between parallel regions, which cost 20 % of decode throughput here (benchmarks/RESULTS.md).

What the engine thread does is `EngineLoop`, apart from how commands reach it and results leave it, so the same
loop also runs alone in a process of its own (engine/process.py).
"""

from __future__ import annotations

import asyncio
import copy
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, Self

from pacer.engine.engine import Engine, IterationStats, StepError
from pacer.latency.model import LatencyModel
from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling.admission import QueueSnapshot, QueueView
from pacer.scheduling.base import RequestLimits
from pacer.scheduling.router import PrefixIndex

logger = logging.getLogger(__name__)


class QueueFullError(Exception):
    """More requests are waiting than the server was told to queue; retry after `retry_after_s`."""

    def __init__(self, num_queued: int, retry_after_s: int) -> None:
        super().__init__(f"the server has {num_queued} requests queued, its limit; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineError(RuntimeError):
    """The engine failed while serving this request: a server fault, not the client's."""


class RequestExpired(EngineError):
    """The request never started before its TTFT deadline and was dropped (`--drop-expired`)."""


class EngineObserver(Protocol):
    """Receives what the engine thread saw (the server's Prometheus metrics implement it)."""

    def iteration(self, stats: IterationStats, outputs: list[RequestOutput]) -> None: ...

    def request_finished(self, request: Request) -> None: ...


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


LATENCY_EVERY_S = 1.0  # how often an engine elsewhere sends its latency model, with its online correction, for admission


@dataclass
class EngineUpdate:
    """What an engine in another process sends after an iteration (an engine process's pipe, a Ray replica's stream):
    the outputs since its last update, and its state after them."""

    outputs: list[RequestOutput | Failure] = field(default_factory=list)
    iterations: list[tuple[IterationStats, list[RequestOutput]]] = field(default_factory=list)  # for metrics
    finished: list[Request] = field(default_factory=list)  # for the request-level metrics
    load: EngineLoad = field(default_factory=EngineLoad)
    queue: tuple[QueueSnapshot | None, int] = (None, 0)  # QueueView.latest
    latency: LatencyModel | None = None  # at most every LATENCY_EVERY_S

    def report(self, observer: EngineObserver | None) -> None:
        """Hand the iterations and finished requests to the observer, as an engine thread would have."""
        if observer is not None:
            for stats, outputs in self.iterations:
                observer.iteration(stats, outputs)
            for request in self.finished:
                observer.request_finished(request)

    def absorb(self, later: EngineUpdate) -> None:
        """Fold a later update into this one (a consumer that fell behind sends them as one)."""
        self.outputs += later.outputs
        self.iterations += later.iterations
        self.finished += later.finished
        self.load, self.queue = later.load, later.queue
        if later.latency is not None:
            self.latency = later.latency


STOP = ("stop", None)  # the command that ends the engine loop
_RATE_WINDOW = 64  # recent completions used to estimate how fast the queue drains


class AsyncEngine:
    """Owns the engine thread. Commands go in through a thread-safe inbox; outputs come back per call.

    Invariant: a request id is in `_queues` from submission until its final output (or failure)
    has been delivered, or its caller has gone; `num_in_flight` counts them.
    """

    def __init__(self, build: Callable[[], Engine], max_queued_requests: int | None = None,
                 observer: EngineObserver | None = None, admission: bool = True) -> None:
        """`build` makes the Engine; it runs in the engine thread (see the module docstring)."""
        self._build = build
        self.engine: Engine | None = None
        self.max_queued_requests = max_queued_requests
        self.admission = admission  # refuse what is predicted to miss its TTFT SLO (off: serve everything)
        self.observer = observer
        self.load = EngineLoad()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._queues: dict[str, asyncio.Queue] = {}
        self._finish_times: deque[float] = deque(maxlen=_RATE_WINDOW)
        # Admission control: the scheduler's queue after the latest iteration (published by the engine thread
        # with how many submitted requests it had taken in by then) and the ones submitted since.
        self.queue = QueueView()
        # What this front end sent, for an engine whose KV it cannot read (another process): its cached prefixes,
        # believed (the engine evicts on its own), so admission predicts a hit as the scheduler will plan it.
        self._sent = PrefixIndex()
        self._engine_loop: EngineLoop | None = None  # engine thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the engine thread and wait until it has built the engine (re-raising its error)."""
        if self._thread is not None:
            return

        def setup() -> None:
            self.engine = self._build()
            self._engine_loop = EngineLoop(self.engine, self)
            self.queue.latency = self.engine.scheduler.latency
            self._publish_load()  # admission control has a snapshot before the first request

        self._thread = start_engine_thread(setup, self._run)

    async def stop(self) -> None:
        """Abort whatever is left and join the engine thread."""
        if self._thread is None:
            return
        self._command(STOP)
        await asyncio.to_thread(self._thread.join)
        self._thread = None

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    @property
    def limits(self) -> RequestLimits:
        return self.engine.scheduler.limits

    def health(self) -> dict[str, object] | None:
        """Details for /health beyond up or down: none for one local engine."""
        return None

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- requests (event loop side) -----------------------------------------------------------

    def generate(self, requests: list[Request]) -> RequestStream:
        """Queue `requests` together (one HTTP call's choices) and return the stream of their outputs.

        Raises ValueError (never servable) or QueueFullError here, before anything is queued, so
        the server can answer 4xx before it starts a response. Closing the stream early (client
        gone) aborts the unfinished requests at once, which frees their KV blocks.
        """
        self._admit(requests)
        outputs: asyncio.Queue = asyncio.Queue()
        self.submit(requests, outputs)
        return RequestStream(self, [r.request_id for r in requests], outputs)

    def submit(self, requests: list[Request], outputs: asyncio.Queue) -> None:
        """Queue `requests` without admission control (the caller decided): their outputs, and a `Failure` for
        each one the engine fails, go to `outputs` in order."""
        self._loop = self._loop or asyncio.get_running_loop()
        for request in requests:
            self._queues[request.request_id] = outputs
            self.queue.submitted(request)
        self._command(("add", requests))

    def adopt(self, request: Request, payload: object, outputs: asyncio.Queue) -> None:
        """Queue a request prefilled by another engine, with its KV (`Engine.adopt`); outputs as `submit`."""
        self._loop = self._loop or asyncio.get_running_loop()
        self._queues[request.request_id] = outputs
        self.queue.submitted(request)  # the engine thread counts it taken, like a submitted request
        self._command(("adopt", (request, payload)))

    def detach(self, request_ids: list[str]) -> None:
        """Deliver nothing more for these requests (their caller has gone)."""
        for request_id in request_ids:
            self._queues.pop(request_id, None)

    def abort(self, request_ids: list[str]) -> None:
        """Abort from the event loop; each still-open stream gets a final output with reason abort."""
        self._command(("abort", list(request_ids)))

    def abort_all(self) -> None:
        self.abort(list(self._queues))

    def _admit(self, requests: list[Request]) -> None:
        if not self.is_alive:
            raise EngineError("the engine is not running")
        for request in requests:
            self.limits.check(request)  # fixed limits only: safe from this thread
        if self.max_queued_requests is not None:
            num_queued = max(0, self.num_in_flight - self.load.num_running)
            if num_queued + len(requests) > self.max_queued_requests:
                raise QueueFullError(num_queued, self.retry_after_s(num_queued))
        now = time.monotonic()
        kv = self.engine.scheduler.kv if self.engine is not None else None  # an engine in this process
        for i, request in enumerate(requests):  # SLOUnattainable: the server answers 429
            # its cached prefix is that much less to prefill: read from the KV here (a racy read: a prediction),
            # else believed from what was sent
            request.num_cached_tokens = kv.num_cached_tokens(request) if kv is not None else \
                self._sent.cached_prompt_tokens(request)
            if self.admission:
                self.queue.admit(request, now, extra=requests[:i])
        if kv is None:
            for request in requests:
                self._sent.add(PrefixIndex.prompt_keys(request))

    def _command(self, command: tuple[str, object]) -> None:
        self._inbox.put(command)

    def retry_after_s(self, num_queued: int) -> int:
        """A first estimate of when a queued request could be taken: the queue over the recent
        completion rate (the SLO scheduler replaces it with its latency model's prediction)."""
        times = self._finish_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 1
        rate = (len(times) - 1) / (times[-1] - times[0])
        return max(1, min(3600, math.ceil((num_queued + 1) / rate)))

    def _deliver(self, outputs: list[RequestOutput | Failure]) -> None:
        now = time.monotonic()
        for item in outputs:
            target = self._queues.get(item.request_id)
            if isinstance(item, Failure) or item.finished:
                self._queues.pop(item.request_id, None)
                self._finish_times.append(now)
            if target is not None:
                target.put_nowait(item)

    # ---- engine thread ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._engine_loop.serve(lambda block: drain(self._inbox, block), self._publish_load)
        except Exception:  # a scheduler bug: fail every caller loudly rather than leave them hanging
            logger.exception("the engine thread died")
            self._call_soon(self._fail_all, "the engine thread died; see the server log")

    def _fail_all(self, message: str) -> None:
        self._deliver([Failure(rid, message) for rid in list(self._queues)])

    # EngineSink, on the engine thread

    def send(self, items: list[RequestOutput | Failure]) -> None:
        self._call_soon(self._deliver, items)

    def iteration(self, stats: IterationStats, outputs: list[RequestOutput]) -> None:
        if self.observer is not None:
            self.observer.iteration(stats, outputs)

    def request_finished(self, request: Request) -> None:
        if self.observer is not None:
            self.observer.request_finished(request)

    def _call_soon(self, callback: Callable, *args: object) -> None:
        """Run `callback` on the event loop, which may not exist yet (no request) or be gone (shutdown)."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(callback, *args)
            except RuntimeError:
                pass

    def _publish_load(self) -> None:
        self.load, self.queue.latest = self._engine_loop.state()


def start_engine_thread(setup: Callable[[], None], run: Callable[[], None]) -> threading.Thread:
    """Start the engine thread: `setup` (build the engine there, see the module docstring), then `run`. Returns once
    setup is done, re-raising its error here."""
    built = threading.Event()
    failure: list[BaseException] = []

    def main() -> None:
        try:
            setup()
        except BaseException as error:  # noqa: BLE001  (handed to the caller)
            failure.append(error)
            return
        finally:
            built.set()
        run()

    thread = threading.Thread(target=main, name="pacer-engine", daemon=True)
    thread.start()
    built.wait()
    if failure:
        raise failure[0]
    return thread


def drain(inbox: queue.SimpleQueue, block: bool) -> list[tuple[str, object]]:
    """The commands in `inbox` (an engine loop's `receive`), waiting for one first if `block`."""
    commands = [inbox.get()] if block else []
    while not inbox.empty():
        commands.append(inbox.get_nowait())
    return commands


class EngineSink(Protocol):
    """Where the engine loop's results go: the event loop of its own process, or a pipe to another."""

    def send(self, items: list[RequestOutput | Failure]) -> None: ...

    def iteration(self, stats: IterationStats, outputs: list[RequestOutput]) -> None: ...

    def request_finished(self, request: Request) -> None: ...


class EngineLoop:
    """The engine's side of a served engine: takes commands (add, adopt, abort, stop), steps the engine while it
    has work, and hands outputs and failures to a sink. Only the thread running `serve` touches the engine."""

    def __init__(self, engine: Engine, sink: EngineSink) -> None:
        self.engine = engine
        self.sink = sink
        self.num_taken = 0  # submitted requests taken in (QueueView.latest pairs it with the snapshot)
        self._requests: dict[str, Request] = {}
        # Prefilled elsewhere, waiting in arrival order for a batch slot and KV blocks here: a full decode engine
        # holds hand-overs back instead of failing them.
        self._adoptions: deque[tuple[Request, object]] = deque()

    def serve(self, receive: Callable[[bool], list[tuple[str, object]]], publish: Callable[[], None]) -> None:
        """Until a stop command: `receive(block)` the commands sent so far (waiting for one while idle), act on
        them, run an iteration if there is work, then `publish()` the state (`state`). Aborts what is left."""
        while True:
            commands = receive(not self.engine.has_unfinished)
            if STOP in commands:
                break
            for kind, payload in commands:
                if kind == "add":
                    self.num_taken += len(payload)
                    self._add(payload)
                elif kind == "adopt":
                    self.num_taken += 1
                    self._adopt(*payload)
                else:
                    for request_id in payload:
                        self._abort(request_id)
            if self.engine.has_unfinished:
                self._step()
                self._adopt_waiting()  # the step may have freed room
            publish()
        for request_id in list(self._requests):
            self.engine.abort(request_id)
            self._finished(request_id)
        self._fail([request.request_id for request, _ in self._adoptions], "the engine stopped")
        self._adoptions.clear()
        publish()

    def state(self) -> tuple[EngineLoad, tuple[QueueSnapshot, int]]:
        """The load and `QueueView.latest` after the latest iteration."""
        scheduler = self.engine.scheduler
        waiting = sum(request.num_outstanding_tokens for request, _ in self._adoptions)  # hand-overs held back
        load = EngineLoad(len(scheduler.running), len(scheduler.waiting), scheduler.kv.usage,
                          scheduler.num_outstanding_tokens + waiting)
        return load, (scheduler.snapshot(), self.num_taken)

    def _add(self, requests: list[Request]) -> None:
        for request in requests:
            try:
                self.engine.add_request(request)
            except Exception as error:  # checked before queueing: this is a server fault
                logger.exception("request %s could not be added", request.request_id)
                self._fail([request.request_id], f"could not queue the request: {error}")
            else:
                self._requests[request.request_id] = request

    def _adopt(self, request: Request, payload: object) -> None:
        self._adoptions.append((request, payload))
        self._adopt_waiting()

    def _adopt_waiting(self) -> None:
        """Take over waiting hand-overs, in arrival order, while there is room; one that cannot fit even in an
        idle engine, or whose payload does not import, fails alone."""
        while self._adoptions:
            request, payload = self._adoptions[0]
            if not self.engine.scheduler.has_room_for(request) and self.engine.has_unfinished:
                return  # room comes back as running requests end
            self._adoptions.popleft()
            try:
                self.engine.adopt(request, payload)
            except Exception as error:  # noqa: BLE001  (too big, or a bad payload: this request's failure alone)
                logger.warning("request %s could not be adopted: %s", request.request_id, error)
                self._fail([request.request_id], f"the decode engine could not take the request over: {error}")
            else:
                self._requests[request.request_id] = request

    def _abort(self, request_id: str) -> None:
        waiting = [a for a in self._adoptions if a[0].request_id == request_id]
        for adoption in waiting:  # never started here: its stream ends with an error, like a failed hand-over
            self._adoptions.remove(adoption)
            self._fail([request_id], "aborted while waiting to be taken over")
        output = self.engine.abort(request_id)
        self._finished(request_id)
        if output is not None:
            self.sink.send([output])

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as error:
            logger.exception("engine iteration failed; aborting its requests and serving on")
            for request_id in error.request_ids:
                self.engine.abort(request_id)
                self._finished(request_id)
            self._fail(error.request_ids, f"the engine failed while serving this request: {error.__cause__!r}")
            return
        if self.engine.last_iteration is not None:
            self.sink.iteration(self.engine.last_iteration, outputs)
        for output in outputs:
            if output.finished:
                self._finished(output.request_id)
        if outputs:
            self.sink.send([_expired(output) if output.finish_reason is FinishReason.EXPIRED else output
                            for output in outputs])

    def _finished(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.sink.request_finished(request)

    def _fail(self, request_ids: list[str], message: str) -> None:
        if request_ids:
            self.sink.send([Failure(rid, message) for rid in request_ids])


def _expired(output: RequestOutput) -> Failure:
    """A request dropped unstarted (`--drop-expired`) ends its stream with an error, not a normal finish."""
    return Failure(output.request_id, "the request could not start before its TTFT deadline (ttft_slo_ms) and was "
                   "dropped", expired=True)


class UpdateSink:
    """The EngineSink of an engine loop whose results leave its thread as `EngineUpdate`s (an engine process's
    pipe, a Ray replica's stream): gathers what happened since the last `take`."""

    def __init__(self, latency: LatencyModel | None) -> None:
        self._latency = latency
        self._latency_at = time.monotonic()
        self._update = EngineUpdate()

    def send(self, items: list[RequestOutput | Failure]) -> None:
        self._update.outputs += items

    def iteration(self, stats: IterationStats, outputs: list[RequestOutput]) -> None:
        self._update.iterations.append((stats, outputs))

    def request_finished(self, request: Request) -> None:
        self._update.finished.append(request)

    def take(self, loop: EngineLoop) -> EngineUpdate:
        """What was gathered, with the loop's state now and, every LATENCY_EVERY_S, a copy of the latency model
        with its online correction (so admission elsewhere predicts as this engine does). On the loop's thread."""
        update, self._update = self._update, EngineUpdate()
        update.load, update.queue = loop.state()
        if self._latency is not None and time.monotonic() - self._latency_at >= LATENCY_EVERY_S:
            update.latency, self._latency_at = copy.deepcopy(self._latency), time.monotonic()
        return update


class EngineClient(Protocol):
    """What the OpenAI app needs of an engine: one local AsyncEngine, or replicas on Ray (cluster.ClusterEngine)."""

    observer: EngineObserver | None

    @property
    def limits(self) -> RequestLimits: ...

    @property
    def load(self) -> EngineLoad: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def num_in_flight(self) -> int: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...

    def generate(self, requests: list[Request]) -> RequestStream: ...

    def abort_all(self) -> None: ...

    def health(self) -> dict[str, object] | None: ...


class StreamSource(Protocol):
    """What a RequestStream needs of the engine that feeds it (AsyncEngine, or the cluster's front end)."""

    def detach(self, request_ids: list[str]) -> None: ...

    def abort(self, request_ids: list[str]) -> None: ...


class RequestStream:
    """The outputs of one `generate` call, in order per request.

    Raises EngineError if the engine failed on any of its requests. `close()` (also on leaving
    `with`, or on cancellation inside it) aborts whatever has not finished.
    """

    def __init__(self, engine: StreamSource, request_ids: list[str], outputs: asyncio.Queue) -> None:
        self._engine = engine
        self._request_ids = request_ids
        self._unfinished = set(request_ids)
        self._outputs = outputs

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, Failure):
            self._unfinished.discard(item.request_id)
            self.close()
            raise (RequestExpired if item.expired else EngineError)(item.message)
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def close(self) -> None:
        if self._unfinished:  # before detaching: the cluster finds a request's replica through what detach forgets
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()
        self._engine.detach(self._request_ids)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
