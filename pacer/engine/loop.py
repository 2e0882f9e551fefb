"""The engine's side of a served engine: `EngineLoop` takes commands, steps the engine while it has work, and after
each iteration hands its front end one `EngineUpdate`. How commands arrive and updates leave is the host's business
(engine/hosts.py: a thread or a process; cluster/replica.py: a Ray actor); the loop is the same in all three.

The engine is built and stepped in one thread, and only that thread touches it: OpenMP (libgomp) keeps a worker pool
per calling thread, and a second pool (say, the main thread's, left over from loading the weights) makes it count
more threads than cores and stop spinning between parallel regions, which cost 20 % of decode throughput here.
"""

from __future__ import annotations

import copy
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable

from pacer.engine.adoptions import Adoptions
from pacer.engine.engine import Engine, StepError
from pacer.engine.protocol import (
    Abort,
    Add,
    Adopt,
    Command,
    EngineLoad,
    EngineUpdate,
    Failure,
    Ready,
    Stop,
)
from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling.admission import QueueState

logger = logging.getLogger(__name__)

LATENCY_EVERY_S = 1.0  # how often an engine elsewhere sends its latency model, with its online correction, for admission


class EngineLoop:
    """Commands in (`Add`, `Adopt`, `Abort`, `Stop`), updates out. Only the thread running `serve` touches the engine.

    `latency_every_s`: how often an update carries a copy of the latency model (None: never, for a front end in the
    same process, which reads the live one)."""

    def __init__(self, engine: Engine, latency_every_s: float | None = LATENCY_EVERY_S) -> None:
        self.engine = engine
        self.num_taken = 0  # submitted requests taken in (published with the queue snapshot)
        self._requests: dict[str, Request] = {}
        self._adoptions = Adoptions()
        self._update = EngineUpdate()
        self._latency_every_s = latency_every_s
        self._latency_at = time.monotonic()

    def ready(self) -> Ready:
        """The record the front end starts from; the latency model is a copy unless this loop never sends one."""
        scheduler = self.engine.scheduler
        latency = scheduler.latency if self._latency_every_s is None else copy.deepcopy(scheduler.latency)
        load, queue_state = self.state()
        return Ready(scheduler.limits, latency, queue_state, load, scheduler.kv.prefix_cache_tokens, os.getpid(),
                     socket.gethostname())

    def serve(self, receive: Callable[[bool], list[Command]], publish: Callable[[EngineUpdate], None]) -> None:
        """Until a `Stop`: `receive(block)` the commands sent so far (waiting for one while idle), act on them, run an
        iteration if there is work, then `publish` the update. Aborts what is left, and publishes that too."""
        while True:
            commands = receive(not self.engine.has_unfinished)
            if any(isinstance(command, Stop) for command in commands):
                break
            for command in commands:
                self._act(command)
            if self.engine.has_unfinished:
                self._step()
                self._adopt_waiting()  # the step may have freed room
            publish(self.take_update())
        for request_id in list(self._requests):
            self.engine.abort(request_id)
            self._finished(request_id)
        self._fail(self._adoptions.request_ids(), "the engine stopped")
        self._adoptions = Adoptions()
        publish(self.take_update())

    def state(self) -> tuple[EngineLoad, QueueState]:
        """The load and queue after the latest iteration."""
        scheduler = self.engine.scheduler
        load = EngineLoad(len(scheduler.running), len(scheduler.waiting), scheduler.kv.usage,
                          scheduler.num_outstanding_tokens + self._adoptions.num_outstanding_tokens)
        return load, QueueState(scheduler.snapshot(), self.num_taken)

    def take_update(self) -> EngineUpdate:
        """What happened since the last update, with the state now and, every `latency_every_s`, a copy of the
        latency model with its online correction (so admission elsewhere predicts as this engine does)."""
        update, self._update = self._update, EngineUpdate()
        update.load, update.queue = self.state()
        every = self._latency_every_s
        if every is not None and time.monotonic() - self._latency_at >= every:
            update.latency, self._latency_at = copy.deepcopy(self.engine.scheduler.latency), time.monotonic()
        return update

    def _act(self, command: Command) -> None:
        if isinstance(command, Add):
            self.num_taken += len(command.requests)
            for request in command.requests:
                self._add(request)
        elif isinstance(command, Adopt):
            self.num_taken += 1
            self._adoptions.add(command.request, command.payload)
            self._adopt_waiting()
        elif isinstance(command, Abort):
            for request_id in command.request_ids:
                self._abort(request_id)

    def _add(self, request: Request) -> None:
        try:
            self.engine.add_request(request)
        except Exception as error:  # checked before queueing: this is a server fault
            logger.exception("request %s could not be added", request.request_id)
            self._fail([request.request_id], f"could not queue the request: {error}")
        else:
            self._requests[request.request_id] = request

    def _adopt_waiting(self) -> None:
        for request, error in self._adoptions.take(self.engine):
            if error is None:
                self._requests[request.request_id] = request
            else:
                logger.warning("request %s could not be adopted: %s", request.request_id, error)
                self._fail([request.request_id], f"the decode engine could not take the request over: {error}")

    def _abort(self, request_id: str) -> None:
        if self._adoptions.remove(request_id):  # never started here: its stream ends with an error, as a failed hand-over
            self._fail([request_id], "aborted while waiting to be taken over")
        output = self.engine.abort(request_id)
        self._finished(request_id)
        if output is not None:
            self._update.outputs.append(output)

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
            self._update.iterations.append((self.engine.last_iteration, outputs))
        for output in outputs:
            if output.finished:
                self._finished(output.request_id)
        self._update.outputs += [_expired(output) if output.finish_reason is FinishReason.EXPIRED else output
                                 for output in outputs]

    def _finished(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        # a prefill handed over to a decode replica is reported there, at its end
        if request is not None and not (request.export_kv and request.finish_reason is FinishReason.LENGTH):
            self._update.finished.append(request)

    def _fail(self, request_ids: list[str], message: str) -> None:
        self._update.outputs += [Failure(request_id, message) for request_id in request_ids]


def _expired(output: RequestOutput) -> Failure:
    """A request dropped unstarted (`--drop-expired`) ends its stream with an error, not a normal finish."""
    return Failure(output.request_id, "the request could not start before its TTFT deadline (ttft_slo_ms) and was "
                   "dropped", expired=True)


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


def drain(inbox: queue.SimpleQueue, block: bool) -> list[Command]:
    """The commands in `inbox` (an engine loop's `receive`), waiting for one first if `block`."""
    commands = [inbox.get()] if block else []
    while not inbox.empty():
        commands.append(inbox.get_nowait())
    return commands
