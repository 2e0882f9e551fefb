"""ProcessEngine: the engine loop alone in a process of its own, the server's front end in this one.

In one process the engine thread shares the GIL with the event loop that parses HTTP and writes SSE chunks. On a
CPU that costs little, because the kernels run long without the GIL; on a GPU a step is about a thousand short
torch calls, each giving the GIL up and winning it back, and a front end busy 10 % of the time made every step
1.5-1.9x as long on an H100 (benchmarks/RESULTS.md, "On a GPU"). vLLM moved its engine core into a process of its
own for the same reason. Here the child runs `EngineLoop` on its main thread and nothing else: it reads commands
from one pipe between iterations and writes one `EngineUpdate` per iteration to another. The parent keeps the
front-end half of `AsyncEngine` (admission, per-call queues, streams) and a reader thread that hands each update
to the event loop and the metrics.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import multiprocessing
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection

from pacer.engine.async_engine import (
    STOP,
    AsyncEngine,
    EngineError,
    EngineLoad,
    EngineLoop,
    EngineObserver,
    UpdateSink,
)
from pacer.engine.engine import Engine
from pacer.heap import freeze_startup_heap
from pacer.latency.model import LatencyModel
from pacer.scheduling.admission import QueueSnapshot
from pacer.scheduling.base import RequestLimits
from pacer.scheduling.router import PrefixIndex

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineReady:
    """The child's first message: what admission needs before the first iteration."""

    limits: RequestLimits
    latency: LatencyModel | None
    queue: tuple[QueueSnapshot | None, int]
    load: EngineLoad
    prefix_cache_tokens: int  # the KV a prefix cache can hold; 0 without one


class ProcessEngine(AsyncEngine):
    """An AsyncEngine whose engine loop runs in a child process (spawned, so CUDA can start there). `build` must
    pickle (a module-level function, or a partial of one): the child calls it to load the model."""

    def __init__(self, build: Callable[[], Engine], max_queued_requests: int | None = None,
                 observer: EngineObserver | None = None, log_level: int = logging.INFO, admission: bool = True) -> None:
        super().__init__(build, max_queued_requests, observer, admission)
        self._log_level = log_level
        self._process: multiprocessing.process.BaseProcess | None = None
        self._commands: Connection | None = None
        self._reader: threading.Thread | None = None
        self._limits: RequestLimits | None = None
        self._alive = False

    def start(self) -> None:
        """Spawn the engine process and wait until it has built the engine (re-raising its error here)."""
        if self._process is not None:
            return
        context = multiprocessing.get_context("spawn")
        commands_out, commands_in = context.Pipe(duplex=False)
        updates_out, updates_in = context.Pipe(duplex=False)
        process = context.Process(target=_engine_main, args=(self._build, commands_out, updates_in, self._log_level),
                                  name="pacer-engine", daemon=True)
        process.start()
        commands_out.close()
        updates_in.close()
        try:
            ready = updates_out.recv()
        except EOFError:
            process.join()
            raise EngineError(f"the engine process exited with code {process.exitcode} before it was ready") from None
        if isinstance(ready, BaseException):
            process.join()
            raise ready
        self._process, self._commands = process, commands_in
        self._limits = ready.limits
        self.queue.latency = ready.latency
        self.load, self.queue.latest = ready.load, ready.queue
        self._sent = PrefixIndex.of_tokens(ready.prefix_cache_tokens)
        self._alive = True
        self._reader = threading.Thread(target=self._read, args=(updates_out,), name="pacer-engine-reader",
                                        daemon=True)
        self._reader.start()

    async def stop(self) -> None:
        """Abort whatever is left, and wait for the engine process to end."""
        if self._process is None:
            return
        self._command(STOP)
        await asyncio.to_thread(self._reader.join)
        await asyncio.to_thread(self._process.join)
        self._commands.close()
        self._process = None

    @property
    def limits(self) -> RequestLimits:
        return self._limits

    @property
    def is_alive(self) -> bool:
        return self._alive

    def _command(self, command: tuple[str, object]) -> None:
        try:
            self._commands.send(command)
        except OSError:  # the engine process is gone; what was just queued fails with the rest
            self._alive = False
            self._call_soon(self._fail_all, "the engine process ended; see the server log")

    def _read(self, updates: Connection) -> None:
        """The reader thread: every update from the engine process, until it closes its end."""
        while True:
            try:
                update = updates.recv()
            except (EOFError, OSError):
                break
            if isinstance(update, str):  # the engine loop failed: the child's last words
                logger.error("the engine process failed: %s", update)
                break
            self.load, self.queue.latest = update.load, update.queue
            if update.latency is not None:
                self.queue.latency = update.latency
            update.report(self.observer)
            if update.outputs:
                self._call_soon(self._deliver, update.outputs)
        self._alive = False
        self._call_soon(self._fail_all, "the engine process ended; see the server log")


def _engine_main(build: Callable[[], Engine], commands: Connection, updates: Connection, log_level: int) -> None:
    """The engine process: build, say ready, then serve until a stop command or the parent's end of the pipe
    closes. Ctrl-C goes to the whole process group; the parent drains and then stops this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        engine = build()
    except BaseException as error:  # noqa: BLE001  (handed to the parent's start)
        try:
            updates.send(error)
        except Exception:  # noqa: BLE001  (an exception that does not pickle)
            updates.send(RuntimeError(repr(error)))
        return
    latency = engine.scheduler.latency
    sink = UpdateSink(latency)
    loop = EngineLoop(engine, sink)
    load, queue = loop.state()
    updates.send(EngineReady(engine.scheduler.limits, copy.deepcopy(latency), queue, load,
                             engine.scheduler.kv.prefix_cache_tokens))
    freeze_startup_heap()

    def receive(block: bool) -> list[tuple[str, object]]:
        try:
            received = [commands.recv()] if block else []
            while commands.poll():
                received.append(commands.recv())
        except (EOFError, OSError):  # the parent is gone
            received = [STOP]
        return received

    try:
        loop.serve(receive, lambda: updates.send(sink.take(loop)))
    except Exception as error:  # a scheduler bug: the parent fails every caller
        logger.exception("the engine loop died")
        updates.send(f"the engine loop died: {error!r}")
