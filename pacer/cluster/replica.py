"""One engine replica inside a Ray actor: the same AsyncEngine as `pacer serve`, fed by a front end in another
process, its outputs streamed back with one Ray streaming generator per replica.

One stream multiplexes every request of the replica, one item per iteration (or per burst of outputs): a Ray
item costs about 0.7 ms here, which per token per request would eat a CPU iteration, but per iteration is
noise. Each item also carries what the front end routes and admits with: the replica's load, its queue
snapshot and, now and then, a copy of its latency model with its online correction.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pacer.config import EngineConfig
from pacer.engine.async_engine import LATENCY_EVERY_S, AsyncEngine, EngineUpdate
from pacer.engine.builder import build_engine
from pacer.engine.engine import IterationStats
from pacer.heap import freeze_startup_heap
from pacer.latency.model import LatencyModel
from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling.admission import QueueSnapshot
from pacer.scheduling.base import RequestLimits

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaInfo:
    """What a replica tells the front end when it is ready (again, after a restart)."""

    limits: RequestLimits
    latency: LatencyModel | None
    queue: tuple[QueueSnapshot | None, int]  # QueueView.latest: admission works before the first update
    pid: int
    host: str


_TICK = object()  # an iteration ended: send the state even if it emitted nothing (a prefill chunk)


class Replica:
    """The actor's class (`ray.remote` is applied by the front end, with the resources it asks for). Async: its
    methods run on the actor's event loop, the engine on its own thread, as in `pacer serve`."""

    def __init__(self, config: EngineConfig) -> None:
        _normal_priority()
        self._engine = AsyncEngine(lambda: build_engine(config)[0], observer=self)
        self._engine.start()
        freeze_startup_heap()
        self._outputs: asyncio.Queue = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()  # guards what the engine thread hands over below
        self._iterations: list[tuple[IterationStats, list[RequestOutput]]] = []
        self._finished: list[Request] = []
        self._latency: LatencyModel | None = None
        self._latency_at = 0.0

    async def ready(self) -> ReplicaInfo:
        self._loop = asyncio.get_running_loop()
        latency = self._engine.engine.scheduler.latency
        return ReplicaInfo(self._engine.limits, copy.deepcopy(latency), self._engine.queue.latest, os.getpid(),
                           socket.gethostname())

    async def submit(self, requests: list[Request], ages_s: list[float]) -> None:
        """Queue requests the front end has admitted. Arrival times are rebased on this process's clock from
        their age at sending, so deadlines hold across machines whose monotonic clocks differ."""
        self._loop = asyncio.get_running_loop()
        now = time.monotonic()
        for request, age in zip(requests, ages_s):
            request.arrival_s = now - age
        self._engine.submit(requests, self._outputs)

    async def take_kv(self, request_id: str) -> object:
        """The KV of a finished prefill (disaggregated serving). The front end passes the reference on to a
        decode replica, so the bytes go from this actor to that one through Ray's object store."""
        return self._engine.engine.exported.pop(request_id)  # KeyError if its prefill left none

    async def adopt(self, request: Request, age_s: float, payload: object) -> None:
        """Decode a request another replica prefilled; Ray has fetched `payload` from the object store."""
        request.arrival_s = time.monotonic() - age_s
        self._engine.adopt(request, payload, self._outputs)

    async def abort(self, request_ids: list[str]) -> None:
        self._engine.abort(request_ids)

    async def updates(self) -> AsyncIterator[EngineUpdate]:
        """The replica's stream (call with `num_returns="streaming"`); it never ends on its own."""
        self._loop = asyncio.get_running_loop()
        while True:
            items = [await self._outputs.get()]
            while not self._outputs.empty():
                items.append(self._outputs.get_nowait())
            with self._lock:
                iterations, self._iterations = self._iterations, []
                finished, self._finished = self._finished, []
                latency, self._latency = self._latency, None
            yield EngineUpdate([item for item in items if item is not _TICK], iterations, finished,
                                self._engine.load, self._engine.queue.latest, latency)

    # ---- EngineObserver: called on the engine thread -----------------------------------------------------

    def iteration(self, stats: IterationStats, outputs: list[RequestOutput]) -> None:
        latency = self._engine.engine.scheduler.latency
        with self._lock:
            self._iterations.append((stats, outputs))
            if latency is not None and time.monotonic() - self._latency_at >= LATENCY_EVERY_S:
                self._latency, self._latency_at = copy.deepcopy(latency), time.monotonic()  # no race: this thread
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._outputs.put_nowait, _TICK)
            except RuntimeError:  # the actor is shutting down
                pass

    def request_finished(self, request: Request) -> None:
        if request.export_kv and request.finish_reason is FinishReason.LENGTH:
            return  # handed over to a decode replica, which reports it when it ends
        with self._lock:
            self._finished.append(request)


def _normal_priority() -> None:
    """Undo Ray's default worker niceness (15) where allowed: a niced replica gives its cores away to any other
    process, and its OpenMP threads then wait at every barrier. On a cluster started without the permission,
    start Ray with `--system-config='{"worker_niceness": 0}'` instead."""
    niceness = os.nice(0)
    if niceness > 0:
        try:
            os.nice(-niceness)
        except PermissionError:
            logger.warning("this replica runs at nice %d (Ray's worker_niceness), which slows it when the machine "
                           "is busy; start Ray with worker_niceness 0", niceness)
