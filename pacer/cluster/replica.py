"""One engine replica inside a Ray actor: the same engine loop as `pacer serve`, fed by the front end in another
process, its updates streamed back with one Ray streaming generator per replica.

One stream multiplexes every request of the replica, one item per iteration (or per burst of outputs): a Ray
item costs about 0.7 ms here, which per token per request would eat a CPU iteration, but per iteration is
noise. Each item also carries what the front end routes and admits with: the replica's load, its queue
snapshot and, now and then, a copy of its latency model with its online correction.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import time
from collections.abc import AsyncIterator

from pacer.config import EngineConfig
from pacer.engine.builder import build_engine
from pacer.engine.loop import EngineLoop, drain, start_engine_thread
from pacer.engine.protocol import Abort, Add, Adopt, Command, EngineUpdate, Ready
from pacer.heap import freeze_startup_heap
from pacer.request import Request

logger = logging.getLogger(__name__)


class Replica:
    """The actor's class (`ray.remote` is applied by the front end, with the resources it asks for). Async: its
    methods run on the actor's event loop. The engine runs `EngineLoop` on a thread of its own, as in `pacer serve`,
    which also builds it (one OpenMP pool, see engine/loop.py); after each iteration the thread hands one
    `EngineUpdate` to the event loop, and `updates` streams them."""

    def __init__(self, config: EngineConfig) -> None:
        _normal_priority()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._updates: asyncio.Queue[EngineUpdate] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None  # known before the first command: every command comes
        # from an actor method, which sets it
        self._engine_loop: EngineLoop | None = None
        self._ready: Ready | None = None
        start_engine_thread(lambda: self._setup(config), self._run)  # raised here: Ray reports the actor failed
        freeze_startup_heap()

    async def ready(self) -> Ready:
        self._loop = asyncio.get_running_loop()
        return self._ready

    async def submit(self, requests: list[Request], ages_s: list[float]) -> None:
        """Queue requests the front end has admitted. Arrival times are rebased on this process's clock from
        their age at sending, so deadlines hold across machines whose monotonic clocks differ."""
        self._loop = asyncio.get_running_loop()
        now = time.monotonic()
        for request, age in zip(requests, ages_s):
            request.arrival_s = now - age
        self._command(Add(requests))

    async def take_kv(self, request_id: str, num_held_tokens: int = 0) -> object:
        """The KV of a finished prefill (disaggregated serving), less the blocks of the first `num_held_tokens`
        tokens, which the decode replica is believed to hold. The front end passes the reference on to that
        replica, so the bytes go from this actor to that one through Ray's object store."""
        return self._engine_loop.engine.take_exported(request_id, num_held_tokens)  # KeyError if none was left

    async def adopt(self, request: Request, age_s: float, payload: object) -> None:
        """Decode a request another replica prefilled; Ray has fetched `payload` from the object store."""
        self._loop = asyncio.get_running_loop()
        request.arrival_s = time.monotonic() - age_s
        self._command(Adopt(request, payload))

    async def abort(self, request_ids: list[str], *adopted: None) -> None:
        """Abort requests; `adopted` are the results of the `adopt` calls that handed some of them over, which Ray
        waits for first, so that an abort never arrives before the request it cancels."""
        self._loop = asyncio.get_running_loop()
        self._command(Abort(list(request_ids)))

    async def updates(self) -> AsyncIterator[EngineUpdate]:
        """The replica's stream (call with `num_returns="streaming"`); it never ends on its own. Updates that
        queued while the last one was in flight go as one."""
        self._loop = asyncio.get_running_loop()
        while True:
            update = await self._updates.get()
            while not self._updates.empty():
                update.absorb(self._updates.get_nowait())
            yield update

    def _command(self, command: Command) -> None:
        self._inbox.put(command)

    # ---- the engine thread --------------------------------------------------------------------------------

    def _setup(self, config: EngineConfig) -> None:
        self._engine_loop = EngineLoop(build_engine(config)[0])
        self._ready = self._engine_loop.ready()

    def _run(self) -> None:
        try:
            self._engine_loop.serve(self._receive, self._publish)
        except Exception:  # a scheduler bug: a replica without its engine loop is dead, so Ray restarts it
            logger.exception("the engine loop died; exiting so that Ray restarts this replica")
            logging.shutdown()
            os._exit(1)

    def _receive(self, block: bool) -> list[Command]:
        return drain(self._inbox, block)

    def _publish(self, update: EngineUpdate) -> None:
        try:
            self._loop.call_soon_threadsafe(self._updates.put_nowait, update)
        except RuntimeError:  # the actor is shutting down
            pass


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
