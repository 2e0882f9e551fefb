"""Engine: add_request, abort, step. It conducts (schedule, execute, update); it does not decide."""

from __future__ import annotations

import time
from collections.abc import Callable

from pacer.engine.detokenizer import Detokenizer
from pacer.engine.executor import Executor
from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling import Scheduler


class Engine:
    """Single-threaded core loop; the async engine and the simulator both drive it by calling step().

    `clock` is the only source of time (the simulator passes its virtual clock).
    """

    def __init__(self, scheduler: Scheduler, executor: Executor, detokenizer: Detokenizer,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.detokenizer = detokenizer
        self.clock = clock

    def add_request(self, request: Request) -> None:
        """Queue a request (its arrival_s is stamped now if unset); ValueError if it can never run."""
        if request.arrival_s is None:
            request.arrival_s = self.clock()
        self.scheduler.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.finish(request_id, FinishReason.ABORT)
        return None if request is None else self.detokenizer.abort(request)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule(now=self.clock())
        if plan.is_empty:
            return []
        result = self.executor.execute(plan)
        finished = self.scheduler.update(plan, result, now=self.clock())
        outputs = self.detokenizer.outputs(plan, result, finished)
        for output in outputs:  # a stop string ends a request the scheduler still runs
            if output.finished and output.request_id in self.scheduler.requests:
                self.scheduler.finish(output.request_id, FinishReason.STOP)
        return outputs
