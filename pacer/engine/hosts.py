"""Where one engine loop runs for `pacer serve`: a thread of the server's process (`ThreadHost`, the default on a
CPU), or a process of its own (`ProcessHost`, `--engine-process`, the default on a GPU). Both speak the front end's
`Host` protocol; a Ray actor is the third host (cluster/replica.py).

Why a process: in one process the engine thread shares the GIL with the event loop that parses HTTP and writes SSE
chunks. On a CPU that costs little, because the kernels run long without the GIL; on a GPU a step is about a
thousand short torch calls, each giving the GIL up and winning it back, and a front end busy 10 % of the time made
every step 1.5-1.9x as long on an H100. vLLM moved its engine core into a process of its own for the same reason.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection

from pacer.engine.engine import Engine
from pacer.engine.handle import HostEvents
from pacer.engine.loop import EngineLoop, drain, start_engine_thread
from pacer.engine.protocol import Command, EngineError, Ready, Stop
from pacer.heap import freeze_startup_heap
from pacer.request import Request

logger = logging.getLogger(__name__)


class ThreadHost:
    """The engine loop on a thread of this process, which also builds the engine (one OpenMP pool, see
    engine/loop.py). The front end reads its KV for admission (a racy read: a prediction) and its live latency
    model, and gets one update per iteration. A thread whose loop died is not restarted: the engine it left may be
    in any state."""

    kind = "thread"
    restarts = False

    def __init__(self, build: Callable[[], Engine]) -> None:
        self._build = build
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._events: HostEvents | None = None
        self._thread: threading.Thread | None = None
        self.loop: EngineLoop | None = None

    def launch(self, events: HostEvents) -> None:
        self._events = events

    def ready(self) -> Ready:
        def setup() -> None:
            self.loop = EngineLoop(self._build(), latency_every_s=None)

        self._thread = start_engine_thread(setup, self._run)
        return self.loop.ready()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def send(self, command: Command) -> None:
        self._inbox.put(command)

    def cached_prompt_tokens(self, request: Request) -> int | None:
        return self.loop.engine.scheduler.kv.num_cached_tokens(request)

    async def stop(self) -> None:
        if self._thread is not None:
            self.send(Stop())
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    def _run(self) -> None:
        try:
            self.loop.serve(lambda block: drain(self._inbox, block), self._events.updated)
        except Exception:  # a scheduler bug: fail every caller loudly rather than leave them hanging
            logger.exception("the engine thread died")
            self._events.lost("the engine thread died; see the server log")


class ProcessHost:
    """The engine loop alone on the main thread of a child process (spawned, so CUDA can start there): it reads
    commands from one pipe between iterations and writes one update per iteration to another, which a reader thread
    here hands to the front end. A child that dies (killed, out of memory) is started again, up to `max_restarts`
    times, as Ray restarts a replica. `build` must pickle (a module-level function, or a partial of one)."""

    kind = "process"

    def __init__(self, build: Callable[[], Engine], log_level: int = logging.INFO, max_restarts: int = 3) -> None:
        self._build = build
        self._log_level = log_level
        self.max_restarts = max_restarts
        self._process: multiprocessing.process.BaseProcess | None = None
        self._commands: Connection | None = None
        self._updates: Connection | None = None
        self._events: HostEvents | None = None
        self._reader: threading.Thread | None = None
        self._stopping = False
        self._num_restarts = 0

    @property
    def restarts(self) -> bool:
        return self.max_restarts > 0

    def launch(self, events: HostEvents) -> None:
        self._events = events
        context = multiprocessing.get_context("spawn")
        commands_out, commands_in = context.Pipe(duplex=False)
        updates_out, updates_in = context.Pipe(duplex=False)
        self._process = context.Process(target=_engine_main, args=(self._build, commands_out, updates_in,
                                                                   self._log_level), name="pacer-engine", daemon=True)
        self._process.start()
        commands_out.close()
        updates_in.close()
        self._commands, self._updates = commands_in, updates_out

    def ready(self) -> Ready:
        try:
            ready = self._updates.recv()
        except EOFError:
            self._process.join()
            raise EngineError(f"the engine process exited with code {self._process.exitcode} before it was "
                              "ready") from None
        if isinstance(ready, BaseException):
            self._process.join()
            raise ready
        self._reader = threading.Thread(target=self._read, args=(self._process, self._updates),
                                        name="pacer-engine-reader", daemon=True)
        self._reader.start()
        return ready

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        pass

    def send(self, command: Command) -> None:
        try:
            self._commands.send(command)
        except OSError:  # the engine process is gone; its reader reports it
            pass

    def cached_prompt_tokens(self, request: Request) -> int | None:
        return None  # its KV is in the child: the front end believes what it sent

    async def stop(self) -> None:
        if self._process is not None:
            self._stopping = True
            self.send(Stop())
            await asyncio.to_thread(self._reader.join)  # its last update (what the stop aborted) delivered
            self._commands.close()
            self._process = None

    def _read(self, process: multiprocessing.process.BaseProcess, updates: Connection) -> None:
        """A reader thread: every update from one engine process, until it closes its end; then, unless the front
        end stopped it, the process is lost, and is started again while restarts remain."""
        while True:
            try:
                update = updates.recv()
            except (EOFError, OSError):
                break
            if isinstance(update, str):  # the engine loop failed: the child's last words
                logger.error("the engine process failed: %s", update)
                break
            self._events.updated(update)
        process.join()
        if self._stopping:
            return
        self._events.lost(f"the engine process ended (exit code {process.exitcode}); see the server log")
        self._restart()

    def _restart(self) -> None:
        while self._num_restarts < self.max_restarts and not self._stopping:
            self._num_restarts += 1
            logger.warning("restarting the engine process (%d of %d)", self._num_restarts, self.max_restarts)
            try:
                self.launch(self._events)
                self._events.rejoined(self.ready())
                return
            except Exception:  # it failed to build again: try while restarts remain
                logger.exception("the engine process could not be restarted")
        self._events.rejoined(None)


def _engine_main(build: Callable[[], Engine], commands: Connection, updates: Connection, log_level: int) -> None:
    """The engine process: build, say ready, then serve until a stop command or the parent's end of the pipe
    closes. Ctrl-C goes to the whole process group; the parent drains and then stops this process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loop = EngineLoop(build())
    except BaseException as error:  # noqa: BLE001  (handed to the parent's start)
        try:
            updates.send(error)
        except Exception:  # noqa: BLE001  (an exception that does not pickle)
            updates.send(RuntimeError(repr(error)))
        return
    updates.send(loop.ready())
    freeze_startup_heap()

    def receive(block: bool) -> list[Command]:
        try:
            received = [commands.recv()] if block else []
            while commands.poll():
                received.append(commands.recv())
        except (EOFError, OSError):  # the parent is gone
            received = [Stop()]
        return received

    try:
        loop.serve(receive, updates.send)
    except Exception as error:  # a scheduler bug: the parent fails every caller
        logger.exception("the engine loop died")
        updates.send(f"the engine loop died: {error!r}")
