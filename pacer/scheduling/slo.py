"""Deadline-aware stall-free batching: Sarathi-Serve's iteration, sized by a latency model (Clockwork).

1. Running decodes first, always.
2. The prefill tokens of an iteration are the most whose *predicted* iteration time fits the tightest
   slack among running requests (until its next token is due: TBT after its last, or on its TPOT pace
   since its first), less the model's learned error margin; `max_num_batched_tokens` is only a cap. A
   request ahead of its TPOT pace lends that slack to a long prefill chunk. A request starts only while
   the decodes, with it, leave room for a minimum chunk: the decode pace (TBT or TPOT) bounds the batch.
3. Prefills in priority order, then TTFT deadline (EDF), with aging so nothing starves; a prompt already
   under way is in the same order, so it yields its chunks to a more urgent one that arrives after it.
4. Under KV pressure, preempt the least important request with the least sunk work, and none more
   than `MAX_PREEMPTIONS` times while another can go.
5. With `drop_expired`, a request still waiting for its first chunk past its TTFT deadline is
   failed instead of using compute. Admission at arrival is `admission.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

from pacer.config import SchedulerConfig
from pacer.latency.model import BatchShape, largest_chunk
from pacer.request import FinishReason, Request, RequestStatus
from pacer.scheduling.admission import MIN_CHUNK, QueuedPrompt, QueueSnapshot, queue_key, tokens_to_go
from pacer.scheduling.base import ModelOutput, PlanContext, Scheduler, SchedulerOutput
from pacer.scheduling.registry import register
from pacer.speculation.length import DraftRow, draft_lengths

AGING_S = 10.0  # one priority level gained per 10 s of waiting
MAX_PREEMPTIONS = 3


@dataclass(frozen=True)
class SloPlanContext(PlanContext):
    """Decided once per iteration, before any request is placed."""

    # the tightest slack among running decodes, less the model's margin (`iteration_time_limit`); inf if none
    time_limit_s: float
    # Can that slack be kept at all, by one decode beside a minimum chunk? Then the decode pace bounds the batch:
    # requests start only while the decodes leave room, and no chunk overruns the slack. If not, it is lost
    # whatever we do, and prefills keep a minimum chunk each iteration rather than run one request at a time.
    tbt_bounds_batch: bool


@register("slo")
class SloScheduler(Scheduler):
    """The rules of the module docstring as hooks on the shared loop; every decision reads the latency
    model and `now`, never a clock, so the simulator drives it unchanged."""

    chunked_prefill = True
    needs_latency_model = True

    def __init__(self, config: SchedulerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.drop_expired = config.drop_expired
        self.updated_s = 0.0  # the `now` of the latest update: the snapshot's time, for the TPOT slack it gives

    @classmethod
    def default_token_budget(cls, max_model_len: int) -> int:
        return 2048  # a cap only: the latency model sizes each iteration

    def schedule(self, now: float) -> SchedulerOutput:
        expired = [r for r in self.waiting if r.first_scheduled_s is None and r.ttft_deadline_s < now] \
            if self.drop_expired else []
        for request in expired:
            self.finish(request.request_id, FinishReason.EXPIRED)
        plan = super().schedule(now)
        plan.dropped = expired
        return plan

    def begin_plan(self, now: float) -> SloPlanContext:
        limit = self.iteration_time_limit(now)
        bounds = self.latency.predict(BatchShape().with_decode(1).with_chunk(MIN_CHUNK, 0)) <= limit
        return SloPlanContext(now, limit, bounds)

    def update(self, plan: SchedulerOutput, output: ModelOutput, now: float) -> list[Request]:
        self.updated_s = now
        return super().update(plan, output, now)

    def iteration_time_limit(self, now: float) -> float:
        """The tightest slack among running decodes (time until each one's next token is due, by its TBT or its
        TPOT pace), less the latency model's error margin for as many decodes; inf when none has a decode SLO."""
        slacks = [due - now for due in (r.next_token_deadline_s for r in self.running) if due < math.inf]
        if not slacks:
            return math.inf
        return max(0.0, min(slacks)) / (1 + self.latency.margin(len(slacks)))

    def prefill_order(self, started: list[Request], waiting: Iterable[Request],
                      context: PlanContext) -> Iterable[Request]:
        """Started and waiting prompts in one deadline order, as admission predicts it: a long prompt already
        under way yields its chunks to a more urgent one that arrives after it."""
        return sorted(chain(started, waiting), key=lambda r: queue_key(r, context.now, AGING_S))

    def chunk_tokens(self, request: Request, plan: SchedulerOutput, context: SloPlanContext) -> int:
        cap = min(request.num_uncomputed_tokens, self.token_budget - plan.total_num_scheduled_tokens)
        started = request.status is RequestStatus.RUNNING
        if cap <= 0 or math.isinf(context.time_limit_s) or (started and not request.is_prefilling):
            return max(0, cap)  # running decodes always go (a one-token prompt is not one: it joins the batch)
        if context.tbt_bounds_batch and not started and not self.decodes_leave_room(request, plan, context):
            return 0
        shape = plan.shape
        chunk = largest_chunk(self.latency, shape, request.num_computed_tokens, cap, context.time_limit_s)
        if chunk == 0 and shape.num_prefill_tokens == 0 and not context.tbt_bounds_batch:
            chunk = min(cap, MIN_CHUNK)  # progress, when the decodes alone overrun a TBT that cannot be kept
        return chunk

    def draft_lengths(self, rows: list[DraftRow], plan: SchedulerOutput, context: SloPlanContext) -> list[int]:
        """The goodput-sized lengths, with the iteration kept within its time limit (the tightest slack)."""
        return draft_lengths(rows, plan.shape, plan.num_sampling_rows,
                             self.token_budget - plan.total_num_scheduled_tokens, self.latency.predict,
                             context.time_limit_s)

    def decodes_leave_room(self, request: Request, plan: SchedulerOutput, context: SloPlanContext) -> bool:
        """May `request` start? Once it and every started prefill decode beside this plan's decodes, an iteration
        with them and a `MIN_CHUNK` chunk must still fit the time limit, and the pace the decodes were promised
        (TBT or TPOT: slack lent now is not there for ever). Otherwise the batch would grow until the decodes
        alone overrun their pace (the progress chunk, which started requests always get, overruns first): the
        decode SLO bounds how many requests may decode at once, as KV bounds it for memory."""
        shape = plan.shape
        future = BatchShape(num_decodes=shape.num_decodes, decode_context=shape.decode_context)
        for other in self.running:
            if other.is_prefilling:
                future = future.with_decode(other.num_tokens)
        future = future.with_decode(request.num_tokens).with_chunk(MIN_CHUNK, 0)
        # (a TBT slack is never above its TBT; a TPOT slack may be, while the request is ahead of its pace)
        paces = [r.slo.tpot_s for r in (*self.running, request) if r.slo.tpot_s is not None]
        limit = min(context.time_limit_s, min(paces) / (1 + self.latency.margin(len(paces))) if paces else math.inf)
        return self.latency.predict(future) <= limit

    def victim(self, plan: SchedulerOutput) -> Request:
        candidates = [r for r in self.running if r.num_preemptions < MAX_PREEMPTIONS] or self.running
        return max(candidates, key=lambda r: (r.slo.priority, -r.num_computed_tokens))

    def snapshot(self) -> QueueSnapshot:
        """For admission (admission.py): the prompts to prefill (started ones first, so prompts of equal priority and
        deadline are in arrival order, as `queue_key` has them) and the running decodes."""
        queue, decodes, tbt, tpot, due = [], [], math.inf, math.inf, math.inf
        for request in chain(self.running, self.waiting):
            to_go = tokens_to_go(request, self.max_request_tokens)
            if request.status is RequestStatus.WAITING:  # it will start with its cached prefix
                cached = request.num_cached_tokens
                queue.append(QueuedPrompt(request.slo.priority, request.ttft_deadline_s,
                                          request.num_uncomputed_tokens - cached, cached, to_go))
            elif request.is_prefilling:
                queue.append(QueuedPrompt(request.slo.priority, request.ttft_deadline_s, request.num_uncomputed_tokens,
                                          request.num_computed_tokens, to_go))
            else:
                decodes.append((request.num_tokens, to_go))
                if request.slo.tpot_s is not None:
                    due = min(due, request.next_token_deadline_s)
            if request.slo.tbt_s is not None:
                tbt = min(tbt, request.slo.tbt_s)
            if request.slo.tpot_s is not None:
                tpot = min(tpot, request.slo.tpot_s)
        return QueueSnapshot(tuple(queue), tuple(decodes), tbt, self.token_budget, self.max_request_tokens, tpot,
                             due - self.updated_s)
