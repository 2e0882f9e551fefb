"""Engine: add_request, abort, step. It conducts (schedule, execute, update); it does not decide."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from pacer.engine.detokenizer import Detokenizer
from pacer.engine.executor import Executor, KVHandover
from pacer.latency.model import BatchShape
from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling import ModelOutput, Scheduler, SchedulerOutput
from pacer.speculation.drafter import Drafter


class StepError(RuntimeError):
    """An iteration failed. A batched forward cannot tell which request caused it, so every
    request of the iteration is named; the caller aborts them and the engine stays usable."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"engine step failed for request(s) {', '.join(request_ids)}: {cause!r}")
        self.request_ids = request_ids


@dataclass(frozen=True)
class IterationStats:
    """What one iteration did, for metrics (and, later, latency-model calibration)."""

    num_requests: int
    num_prefill_tokens: int  # tokens of requests still in their prompt (chunks)
    num_decode_tokens: int
    num_preempted: int
    elapsed_s: float  # the executor's measured time
    predicted_s: float | None
    shape: BatchShape  # what the latency model predicts from
    # speculative decoding: decodes that verified drafts, their drafts, and the drafts accepted
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @classmethod
    def of(cls, plan: SchedulerOutput, result: ModelOutput) -> IterationStats:
        shape = plan.shape
        stats = cls(len(plan.requests), shape.num_prefill_tokens, shape.num_decodes, len(plan.preempted_ids),
                    result.elapsed_s, plan.predicted_s, shape)
        if not plan.draft_token_ids:
            return stats
        # a verify row is a chunk to the latency model, but its tokens are decode tokens here
        num_draft_tokens = sum(map(len, plan.draft_token_ids.values()))
        num_verified = len(plan.draft_token_ids) + num_draft_tokens
        return dataclasses.replace(
            stats, num_prefill_tokens=stats.num_prefill_tokens - num_verified,
            num_decode_tokens=stats.num_decode_tokens + num_verified, num_drafts=len(plan.draft_token_ids),
            num_draft_tokens=num_draft_tokens, num_accepted_tokens=sum(map(len, result.accepted_draft_ids.values())))


class Engine:
    """Single-threaded core loop; the async engine and the simulator both drive it by calling step().

    `clock` is the only source of time (the simulator passes its virtual clock). With a `drafter` (speculative
    decoding), the running decodes get drafts before each plan, for the scheduler to verify with their token.
    """

    def __init__(self, scheduler: Scheduler, executor: Executor, detokenizer: Detokenizer,
                 clock: Callable[[], float] = time.monotonic, drafter: Drafter | None = None) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.detokenizer = detokenizer
        self.clock = clock
        self.drafter = drafter
        self.last_iteration: IterationStats | None = None
        self.exported: dict[str, KVHandover] = {}  # request id -> KV payload of a finished prefill (export_kv)

    def add_request(self, request: Request) -> None:
        """Queue a request (its arrival_s is stamped now if unset); ValueError if it can never run."""
        if request.arrival_s is None:
            request.arrival_s = self.clock()
        self.scheduler.add(request)

    def adopt(self, request: Request, payload: KVHandover) -> None:
        """Decode a request prefilled elsewhere: `request.token_ids` holds its prompt and first token(s), its
        first `num_computed_tokens` have KV in `payload` (the other engine's `take_exported`), but for the blocks
        before the payload's `first_block`, which this engine's prefix cache was believed to hold."""
        if request.arrival_s is None:
            request.arrival_s = self.clock()
        held = self.scheduler.adopt(request, payload.first_block)
        if held is not None:  # else the cache had lost some: the scheduler recomputes, and the payload goes unused
            try:
                self.executor.import_kv(request.block_ids, payload.skip(held - payload.first_block))
            except Exception:
                self.scheduler.finish(request.request_id)
                raise
        request.first_scheduled_s = request.first_token_s = request.last_token_s = self.clock()
        self.detokenizer.adopt(request)

    def take_exported(self, request_id: str, num_held_tokens: int = 0) -> KVHandover:
        """The KV payload of a finished prefill (`export_kv`), less the full blocks of its first `num_held_tokens`
        tokens, which the receiving engine is believed to hold in its prefix cache. KeyError if there is none."""
        return self.exported.pop(request_id).skip(num_held_tokens // self.scheduler.kv.block_size)

    def abort(self, request_id: str) -> RequestOutput | None:
        self.exported.pop(request_id, None)
        request = self.scheduler.finish(request_id, FinishReason.ABORT)
        return None if request is None else self.detokenizer.ended(request)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def step(self) -> list[RequestOutput]:
        plan, dropped = self.begin_step()
        if plan.is_empty:
            return dropped
        try:
            result = self.executor.execute(plan)
        except Exception as error:
            raise StepError([r.request_id for r in plan.requests], error) from error
        return dropped + self.end_step(plan, result)

    def begin_step(self) -> tuple[SchedulerOutput, list[RequestOutput]]:
        """Plan the next iteration at the clock's now. Also returns the final outputs of requests the policy
        ended while planning (expired before they started). step() runs the halves back to back; the
        simulator runs the plan's iteration in virtual time in between."""
        if self.drafter is not None:
            self.drafter.propose(self.scheduler.running)
        plan = self.scheduler.schedule(now=self.clock())
        return plan, [self.detokenizer.ended(r) for r in plan.dropped]

    def end_step(self, plan: SchedulerOutput, result: ModelOutput) -> list[RequestOutput]:
        """Fold an executed plan back in at the clock's now: new tokens, finished requests, their outputs."""
        for request in plan.requests:
            if request.export_kv and request.num_output_tokens == 0 and request.request_id in result.sampled_token_ids:
                # its prompt is complete: copy the KV out before finishing frees the blocks
                self.exported[request.request_id] = self.executor.export_kv(request.block_ids,
                                                                            request.num_prompt_tokens)
        try:
            finished = self.scheduler.update(plan, result, now=self.clock())
            outputs = self.detokenizer.outputs(plan, result, finished)
        except Exception as error:
            raise StepError([r.request_id for r in plan.requests], error) from error
        self.last_iteration = IterationStats.of(plan, result)
        for output in outputs:  # a stop string ends a request the scheduler still runs
            if output.finished and output.request_id in self.scheduler.requests:
                self.scheduler.finish(output.request_id, FinishReason.STOP)
        return outputs
