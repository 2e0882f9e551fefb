"""Deadline-aware stall-free batching: Sarathi-Serve's iteration, sized by a latency model (Clockwork).

1. Running decodes first, always.
2. The prefill tokens of an iteration are the most whose *predicted* iteration time fits the tightest
   TBT slack among running requests, less the model's learned error margin; `max_num_batched_tokens`
   is only a cap.
3. Prefills in priority order, then TTFT deadline (EDF), with aging so nothing starves.
4. Under KV pressure, preempt the least important request with the least sunk work, and none more
   than `MAX_PREEMPTIONS` times while another can go.
5. With `drop_expired`, a request still waiting for its first chunk past its TTFT deadline is
   failed instead of using compute. Admission at arrival is `admission.py`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pacer.config import SchedulerConfig
from pacer.latency.model import BatchShape, largest_chunk
from pacer.request import FinishReason, Request
from pacer.scheduling.admission import MIN_CHUNK, QueueSnapshot, queue_key
from pacer.scheduling.base import Scheduler, SchedulerOutput
from pacer.scheduling.registry import register

AGING_S = 10.0  # one priority level gained per 10 s of waiting
MAX_PREEMPTIONS = 3


@register("slo")
class SloScheduler(Scheduler):
    """The rules of the module docstring as hooks on the shared loop; every decision reads the latency
    model and `now`, never a clock, so the simulator drives it unchanged."""

    chunked_prefill = True
    needs_latency_model = True

    def __init__(self, config: SchedulerConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        self.drop_expired = config.drop_expired
        self._time_limit_s = math.inf

    @classmethod
    def default_token_budget(cls, max_model_len: int) -> int:
        return 2048  # a cap only: the latency model sizes each iteration

    def schedule(self, now: float) -> SchedulerOutput:
        expired = [r for r in self.waiting if r.first_scheduled_s is None and r.ttft_deadline_s < now] \
            if self.drop_expired else []
        for request in expired:
            self.finish(request.request_id, FinishReason.EXPIRED)
        self._time_limit_s = self.iteration_time_limit(now)
        plan = super().schedule(now)
        plan.dropped = expired
        return plan

    def iteration_time_limit(self, now: float) -> float:
        """The tightest TBT slack among running decodes (time until each one's next token is due), less the
        latency model's error margin; inf when no running request has a TBT SLO."""
        slacks = [r.last_token_s + r.slo.tbt_s - now for r in self.running
                  if r.slo.tbt_s is not None and r.last_token_s is not None]
        if not slacks:
            return math.inf
        return max(0.0, min(slacks)) / (1 + self.latency.margin)

    def prefill_order(self, waiting: Iterable[Request], now: float) -> Iterable[Request]:
        return sorted(waiting, key=lambda r: queue_key(r, now, AGING_S))

    def chunk_tokens(self, request: Request, plan: SchedulerOutput, now: float) -> int:
        cap = min(request.num_uncomputed_tokens, self.token_budget - plan.total_num_scheduled_tokens)
        if not request.is_prefilling or cap <= 0 or math.isinf(self._time_limit_s):
            return max(0, cap)
        shape = plan.shape
        chunk = largest_chunk(self.latency, shape, request.num_computed_tokens, cap, self._time_limit_s)
        if chunk == 0 and shape.num_prefill_tokens == 0:
            chunk = min(cap, MIN_CHUNK)  # progress: the queue must drain even when decodes fill the limit
        return chunk

    def victim(self, plan: SchedulerOutput) -> Request:
        candidates = [r for r in self.running if r.num_preemptions < MAX_PREEMPTIONS] or self.running
        return max(candidates, key=lambda r: (r.slo.priority, -r.num_computed_tokens))

    def snapshot(self) -> QueueSnapshot:
        """For admission (admission.py): the queue in prefill order and the decode load."""
        decodes = BatchShape()
        queue = []
        for request in self.running:
            if request.is_prefilling:
                queue.append((request.slo.priority, request.ttft_deadline_s, request.num_uncomputed_tokens))
            else:
                decodes = decodes.with_decode(request.num_tokens)
        queue += [(r.slo.priority, r.ttft_deadline_s, r.num_uncomputed_tokens) for r in self.waiting]
        tbt = min((r.slo.tbt_s for r in self.running if r.slo.tbt_s is not None), default=math.inf)
        return QueueSnapshot(tuple(queue), decodes, tbt, self.token_budget)
