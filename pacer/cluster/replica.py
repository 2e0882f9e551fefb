"""One engine replica inside a Ray actor: the same engine loop as `pacer serve`, fed by a front end in another
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
import queue
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pacer.config import EngineConfig
from pacer.engine.async_engine import EngineLoop, EngineUpdate, UpdateSink, drain, start_engine_thread
from pacer.engine.builder import build_engine
from pacer.heap import freeze_startup_heap
from pacer.latency.model import LatencyModel
from pacer.request import FinishReason, Request
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
    prefix_cache_tokens: int  # the KV its prefix cache can hold; 0 without one


class Replica:
    """The actor's class (`ray.remote` is applied by the front end, with the resources it asks for). Async: its
    methods run on the actor's event loop. The engine runs `EngineLoop` on a thread of its own, as in `pacer serve`,
    which also builds it (one OpenMP pool, see engine/async_engine.py); after each iteration the thread hands one
    `EngineUpdate` to the event loop, and `updates` streams them."""

    def __init__(self, config: EngineConfig) -> None:
        _normal_priority()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._updates: asyncio.Queue[EngineUpdate] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None  # known before the first command: every command comes
        # from an actor method, which sets it
        self._engine_loop: EngineLoop | None = None
        self._info: ReplicaInfo | None = None
        self._sink: _ReplicaSink | None = None
        start_engine_thread(lambda: self._setup(config), self._run)  # raised here: Ray reports the actor failed
        freeze_startup_heap()

    async def ready(self) -> ReplicaInfo:
        self._loop = asyncio.get_running_loop()
        return self._info

    async def submit(self, requests: list[Request], ages_s: list[float]) -> None:
        """Queue requests the front end has admitted. Arrival times are rebased on this process's clock from
        their age at sending, so deadlines hold across machines whose monotonic clocks differ."""
        self._loop = asyncio.get_running_loop()
        now = time.monotonic()
        for request, age in zip(requests, ages_s):
            request.arrival_s = now - age
        self._inbox.put(("add", requests))

    async def take_kv(self, request_id: str, num_held_tokens: int = 0) -> object:
        """The KV of a finished prefill (disaggregated serving), less the blocks of the first `num_held_tokens`
        tokens, which the decode replica is believed to hold. The front end passes the reference on to that
        replica, so the bytes go from this actor to that one through Ray's object store."""
        return self._engine_loop.engine.take_exported(request_id, num_held_tokens)  # KeyError if none was left

    async def adopt(self, request: Request, age_s: float, payload: object) -> None:
        """Decode a request another replica prefilled; Ray has fetched `payload` from the object store."""
        self._loop = asyncio.get_running_loop()
        request.arrival_s = time.monotonic() - age_s
        self._inbox.put(("adopt", (request, payload)))

    async def abort(self, request_ids: list[str], *adopted: None) -> None:
        """Abort requests; `adopted` are the results of the `adopt` calls that handed some of them over, which Ray
        waits for first, so that an abort never arrives before the request it cancels."""
        self._loop = asyncio.get_running_loop()
        self._inbox.put(("abort", list(request_ids)))

    async def updates(self) -> AsyncIterator[EngineUpdate]:
        """The replica's stream (call with `num_returns="streaming"`); it never ends on its own. Updates that
        queued while the last one was in flight go as one."""
        self._loop = asyncio.get_running_loop()
        while True:
            update = await self._updates.get()
            while not self._updates.empty():
                update.absorb(self._updates.get_nowait())
            yield update

    # ---- the engine thread --------------------------------------------------------------------------------

    def _setup(self, config: EngineConfig) -> None:
        engine = build_engine(config)[0]
        self._sink = _ReplicaSink(engine.scheduler.latency)
        self._engine_loop = EngineLoop(engine, self._sink)
        _, queue_latest = self._engine_loop.state()
        self._info = ReplicaInfo(engine.scheduler.limits, copy.deepcopy(engine.scheduler.latency), queue_latest,
                                 os.getpid(), socket.gethostname(), engine.scheduler.kv.prefix_cache_tokens)

    def _run(self) -> None:
        try:
            self._engine_loop.serve(self._receive, lambda: self._publish(self._sink.take(self._engine_loop)))
        except Exception:  # a scheduler bug: a replica without its engine loop is dead, so Ray restarts it
            logger.exception("the engine loop died; exiting so that Ray restarts this replica")
            logging.shutdown()
            os._exit(1)

    def _receive(self, block: bool) -> list[tuple[str, object]]:
        return drain(self._inbox, block)

    def _publish(self, update: EngineUpdate) -> None:
        try:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, update)
        except RuntimeError:  # the actor is shutting down
            pass


class _ReplicaSink(UpdateSink):
    def request_finished(self, request: Request) -> None:
        if not (request.export_kv and request.finish_reason is FinishReason.LENGTH):
            super().request_finished(request)  # a prefill handed over is reported by its decode replica, at its end


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
