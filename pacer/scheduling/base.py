"""The shared scheduling loop and the plan it produces; policies override a few hooks.

The scheduler is pure: it is given `now`, never reads a clock, never touches tensors. Each
iteration it decides how many tokens every request gets (prefill, chunk and decode are all "n
tokens for request R"), reserves their KV blocks, and after the executor ran, folds the sampled
tokens back in (`update`). The real engine and the simulator drive the same code.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import ClassVar

from pacer.config import SchedulerConfig
from pacer.kv import KVCacheManager
from pacer.latency.model import BatchShape, LatencyModel
from pacer.request import FinishReason, Request, RequestStatus
from pacer.scheduling.admission import QueueSnapshot
from pacer.speculation.acceptance import AcceptanceRate
from pacer.speculation.length import DraftRow, draft_lengths


@dataclass
class SchedulerOutput:
    """The plan for one iteration.

    Requests are in batch order (decodes first, then prefill chunks). Their `block_ids` are the
    block tables the executor reads and writes; `num_computed_tokens` is where each one's new
    tokens start (the scheduler advances it only in `update`, after the executor ran).
    """

    requests: list[Request] = field(default_factory=list)
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    total_num_scheduled_tokens: int = 0
    # Verify rows (speculative decoding): a decode given its drafts to check after its last token, so its
    # scheduled tokens are 1 + len(drafts), all sampled at; the executor says which drafts it accepted.
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # Preempted this iteration: their KV is gone, the executor drops any state it keeps for them.
    preempted_ids: list[str] = field(default_factory=list)
    # Finished or aborted since the previous plan, for the same reason.
    finished_ids: list[str] = field(default_factory=list)
    # Ended by the policy while planning (expired before they started): the engine gives each a final
    # output, as the executor never sees them.
    dropped: list[Request] = field(default_factory=list)
    # What the latency model expected this iteration to take (None without one); the executor's
    # measured time comes back in ModelOutput.elapsed_s, so prediction error is easy to log.
    predicted_s: float | None = None
    # The batch shape as running sums, kept up to date as requests join (`shape` reads them): what the
    # latency model predicts from and a policy sizes chunks against. Decodes are two integer sums, since
    # a plan adds hundreds of them every iteration.
    _chunks: BatchShape = field(default_factory=BatchShape, repr=False)
    _num_decodes: int = field(default=0, repr=False)
    _decode_context: int = field(default=0, repr=False)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def shape(self) -> BatchShape:
        chunks = self._chunks
        return BatchShape(chunks.num_prefill_tokens, chunks.prefill_attention, chunks.prefill_context,
                          self._num_decodes, self._decode_context)

    @shape.setter
    def shape(self, shape: BatchShape) -> None:
        self._chunks = shape._replace(num_decodes=0, decode_context=0)
        self._num_decodes, self._decode_context = shape.num_decodes, shape.decode_context

    def recount_shape(self) -> BatchShape:
        """The batch shape summed afresh over the requests: what `shape` keeps as running sums."""
        shape = BatchShape()
        for request in self.requests:
            shape = shape.with_chunk(self.num_scheduled_tokens[request.request_id], request.num_computed_tokens)
        return shape

    def add(self, request: Request, n: int) -> None:
        """Give `request` n tokens in this iteration (after its `num_computed_tokens` cached ones)."""
        self.requests.append(request)
        self.num_scheduled_tokens[request.request_id] = n
        self.total_num_scheduled_tokens += n
        if n == 1:
            self._num_decodes += 1
            self._decode_context += request.num_computed_tokens + 1
        else:
            self._chunks = self._chunks.with_chunk(n, request.num_computed_tokens)

    def add_drafts(self, request: Request, draft_ids: list[int]) -> None:
        """Make the request's decode a verify row of 1 + len(draft_ids) tokens. For the latency model it is a chunk
        of that many tokens after its context, which is what the forward pass computes."""
        rid, k = request.request_id, len(draft_ids)
        assert self.num_scheduled_tokens[rid] == 1, f"request {rid}: drafts join a decode, not a chunk"
        self.draft_token_ids[rid] = draft_ids
        self.num_scheduled_tokens[rid] = 1 + k
        self.total_num_scheduled_tokens += k
        self._num_decodes -= 1
        self._decode_context -= request.num_computed_tokens + 1
        self._chunks = self._chunks.with_chunk(1 + k, request.num_computed_tokens)

    @property
    def num_sampling_rows(self) -> int:
        """Requests that sample a token this iteration (decodes, and prompts whose last chunk this is)."""
        return sum(map(self.samples, self.requests))

    def samples(self, request: Request) -> bool:
        """Does this iteration reach the request's last token, so that a new token is sampled?"""
        # len(token_ids), not the num_tokens property: executors ask this of every request of every plan
        n = self.num_scheduled_tokens[request.request_id]
        if self.draft_token_ids:  # a verify row's drafts lie past its last token
            n -= len(self.draft_token_ids.get(request.request_id, ()))
        return request.num_computed_tokens + n == len(request.token_ids)


@dataclass(frozen=True)
class PlanContext:
    """What the hooks know while one plan is built, made once per iteration by `begin_plan`: the time, and in a
    policy's subclass whatever it decides once before it places any request (the `slo` policy's time limit)."""

    now: float


@dataclass
class TokenLogprobs:
    """Log-probability of the sampled token and, if asked for, the top-k alternatives."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ModelOutput:
    """What an executor returns: one sampled token per request that reached its last token. For a verify row, the
    drafts it accepted (a prefix of the plan's) come first, and the sampled token is the one after them."""

    sampled_token_ids: dict[str, int]
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    elapsed_s: float = 0.0
    accepted_draft_ids: dict[str, list[int]] = field(default_factory=dict)


class Scheduler:
    """Continuous batching with a per-iteration token budget.

    Invariants: a request is in exactly one of `waiting` (no KV blocks) or `running` (blocks for
    all its computed tokens); a step never schedules more than `token_budget` tokens or more than
    `max_num_seqs` requests. When KV runs out the newest running request is preempted by
    recompute: it frees its blocks and goes back to the head of the queue, outputs kept.

    Speculative decoding: once every decode has its token and every prompt its chunk, the decodes with drafts
    (`Request.spec_token_ids`) get as many of them as `draft_lengths` says, all decided together and verified in the
    same iteration: drafts take only the budget and free KV left, never a decode's or a prompt's place. `update`
    gives back the KV of those the model rejected and keeps each request's acceptance rate (`acceptance`), which
    sizes its next rows.

    Policies override the hooks: `begin_plan`, `prefill_order`, `chunk_tokens`, `draft_lengths`, `victim`,
    `prefill_first`; the hooks of one iteration share its `PlanContext`, not attributes of the scheduler.
    With a latency model, every plan carries its predicted time and `update` feeds the measured one
    back (the model corrects itself online).
    """

    # May a prompt be split over several iterations (Sarathi-Serve's chunked prefill)?
    chunked_prefill: ClassVar[bool] = True
    # Do waiting prompts run before, and instead of, the decodes (vLLM v0's prefill-first)?
    prefill_first: ClassVar[bool] = False
    # Does the policy plan with predicted iteration times (then the engine must give it a latency model)?
    needs_latency_model: ClassVar[bool] = False

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int,
                 eos_token_id: int | None = None, latency: LatencyModel | None = None) -> None:
        if self.needs_latency_model and latency is None:
            raise ValueError(f"scheduler {type(self).__name__} needs a latency model")
        self.kv = kv
        self.latency = latency
        self.max_num_seqs = config.max_num_seqs
        self.max_model_len = max_model_len
        self.token_budget = config.max_num_batched_tokens or self.default_token_budget(max_model_len)
        self.eos_token_id = eos_token_id
        # A request alone must always fit, so preemption can never cycle on one request.
        self.max_request_tokens = min(max_model_len, kv.capacity_tokens)
        if not self.chunked_prefill:
            self.max_request_tokens = min(self.max_request_tokens, self.token_budget)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.num_recomputed_tokens = 0  # KV thrown away by preemption, to be computed again
        self._finished_ids: list[str] = []
        # speculative decoding: each request's acceptance rate (from its first verify row on), and the totals
        self.acceptance: dict[str, AcceptanceRate] = {}
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    # ---- policy hooks -------------------------------------------------------------------------

    @classmethod
    def default_token_budget(cls, max_model_len: int) -> int:
        return 512 if cls.chunked_prefill else max(max_model_len, 2048)

    def begin_plan(self, now: float) -> PlanContext:
        """The context every hook of this iteration's plan receives."""
        return PlanContext(now)

    def prefill_order(self, started: list[Request], waiting: Iterable[Request],
                      context: PlanContext) -> Iterable[Request]:
        """The order in which prompts get chunks: `started` ones (running, part of the prompt computed) and
        `waiting` ones. By default a started prompt finishes first, and waiting ones come first served."""
        return chain(started, waiting)

    def chunk_tokens(self, request: Request, plan: SchedulerOutput, context: PlanContext) -> int:
        """How many of the request's uncomputed tokens to run now, joining `plan` as it stands."""
        budget = self.token_budget - plan.total_num_scheduled_tokens
        remaining = request.num_uncomputed_tokens
        if self.chunked_prefill:
            return min(remaining, budget)
        return remaining if remaining <= budget else 0

    def draft_lengths(self, rows: list[DraftRow], plan: SchedulerOutput, context: PlanContext) -> list[int]:
        """How many drafts each decode of `rows` verifies, joining `plan` as it stands: with a latency model, the
        lengths that maximise predicted goodput within the token budget (speculation/length.py); without one, the
        drafts that fit the budget for decodes whose acceptance rate is not low."""
        predict = self.latency.predict if self.latency is not None else None
        return draft_lengths(rows, plan.shape, plan.num_sampling_rows,
                             self.token_budget - plan.total_num_scheduled_tokens, predict)

    def snapshot(self) -> QueueSnapshot | None:
        """The queue as admission control sees it (admission.py); None: this policy admits everything."""
        return None

    def victim(self, plan: SchedulerOutput) -> Request:
        """The running request to preempt when KV runs out: the newest (vLLM's choice)."""
        return self.running[-1]

    # ---- requests in and out ------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a request; refuse at once (ValueError) one that could never be served."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check(request)
        request.status = RequestStatus.WAITING
        request.num_cached_tokens = self.kv.num_cached_tokens(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def adopt(self, request: Request, num_unsent_blocks: int = 0) -> int | None:
        """Run a request whose prompt another engine prefilled (disaggregated serving); the KV of its first
        `num_unsent_blocks` blocks was not sent, since this engine's prefix cache was believed to hold it. It starts
        with its cached prefix (as a new request does), its other blocks are allocated for the caller to fill, it
        joins the running batch as a decode, and the number of blocks taken from the cache is returned. If the cache
        holds fewer than were not sent (evicted since), it queues to recompute what it lacks, as a preempted request
        does, and None says the payload is not needed. ValueError if it does not fit now (KV blocks or batch
        slots)."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.check(request)
        if not self.has_room_for(request):
            raise ValueError(f"request {request.request_id}: no room to adopt it now "
                             f"({len(self.running)} running, {self.kv.num_free_blocks} free KV blocks)")
        request.num_cached_blocks = 0  # blocks of this engine: none published yet
        self.requests[request.request_id] = request
        prefilled, request.num_computed_tokens = request.num_computed_tokens, 0
        if len(self.kv.cached_prefix(request)) < num_unsent_blocks:
            request.status = RequestStatus.WAITING
            request.num_cached_tokens = self.kv.num_cached_tokens(request)
            self.waiting.appendleft(request)
            return None
        held = self.kv.take_cached_prefix(request) // self.kv.block_size
        request.num_computed_tokens = prefilled
        self.kv.allocate(request, 0)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return held

    def has_room_for(self, request: Request) -> bool:
        """Could `adopt` take this request now: a batch slot and KV blocks for all its tokens so far?"""
        return len(self.running) < self.max_num_seqs and self.kv.can_allocate(request, 0)

    def check(self, request: Request) -> None:
        """ValueError if the request could never be served, whatever the load. Reads only fixed
        limits, so the server may call it from another thread before it queues the request."""
        self.limits.check(request)

    def finish(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> Request | None:
        """End a request wherever it is and free its blocks; unknown or finished ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.kv.free(request)
        else:
            self.waiting.remove(request)
        self.acceptance.pop(request_id, None)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._finished_ids.append(request_id)
        return request

    @property
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- one iteration ------------------------------------------------------------------------

    def schedule(self, now: float) -> SchedulerOutput:
        context = self.begin_plan(now)
        plan = SchedulerOutput()
        if self.prefill_first:
            self._schedule_prompts(plan, context)
            if plan.is_empty:
                self._schedule_decodes(plan, context)
        else:
            self._schedule_decodes(plan, context)
            self._schedule_prompts(plan, context)
        self._schedule_drafts(plan, context)
        if not plan.is_empty:  # an empty plan is not executed: keep the ids for the next one
            plan.finished_ids, self._finished_ids = self._finished_ids, []
            if self.latency is not None:
                plan.predicted_s = self.latency.predict(plan.shape)
        return plan

    def _schedule_decodes(self, plan: SchedulerOutput, context: PlanContext) -> None:
        """Running decodes first: they never wait for a prefill."""
        for request in [r for r in self.running if not r.is_prefilling]:
            if request.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            n = self.chunk_tokens(request, plan, context)
            if n > 0 and self._reserve(request, n, plan):
                plan.add(request, n)

    def _schedule_drafts(self, plan: SchedulerOutput, context: PlanContext) -> None:
        """Give the plan's decodes their drafts from what the decodes and prompts left, all lengths decided in one
        pass (`draft_lengths`). A request drafts no further than its max_tokens and context allow, and only into KV
        that is free now (checked again as each takes its blocks: they share the free ones)."""
        decodes, rows = [], []
        for request in plan.requests:
            drafts = request.spec_token_ids
            if not drafts or plan.num_scheduled_tokens[request.request_id] != 1 or request.is_prefilling:
                continue
            limit = min(len(drafts), self.max_request_tokens - request.num_tokens,
                        (request.sampling.max_tokens or self.max_request_tokens) - request.num_output_tokens - 1,
                        self.kv.num_free_slots(request) - 1)  # its own token's slot is reserved already
            if limit > 0:
                decodes.append(request)
                rows.append(DraftRow(request.num_computed_tokens, limit, self.acceptance_rate(request)))
        if not rows:
            return
        for request, k in zip(decodes, self.draft_lengths(rows, plan, context)):
            k = min(k, self.kv.num_free_slots(request) - 1)
            if k > 0:
                self.kv.allocate(request, 1 + k)
                plan.add_drafts(request, request.spec_token_ids[:k])

    def acceptance_rate(self, request: Request) -> float:
        """The chance that the request's next draft is accepted: its running estimate, or the prior before its first
        verify row."""
        rate = self.acceptance.get(request.request_id)
        return (rate or AcceptanceRate()).rate(request.num_tokens)

    def _schedule_prompts(self, plan: SchedulerOutput, context: PlanContext) -> None:
        """Prompt chunks in policy order, over started prompts and waiting ones.

        A started prompt takes its chunk as a decode does (preempting if KV runs out). A waiting one is
        admitted only while the batch, the budget and free KV allow and nothing was preempted this iteration
        (KV is short: don't admit what would be preempted next); the first that cannot go ends admission, so
        none overtakes it, while started prompts after it in the order still get their chunks. The order is
        read lazily and the admitted leave the queue after the loop, so an iteration costs what it admits, not
        the length of the queue (which grows without bound under overload)."""
        started = [r for r in self.running if r.is_prefilling]
        unvisited = {r.request_id for r in started}
        admitting = True
        admitted = []
        for request in self.prefill_order(started, self.waiting, context):
            if request.request_id in unvisited:
                unvisited.remove(request.request_id)
                if request.status is RequestStatus.RUNNING:  # not preempted earlier in this loop
                    n = self.chunk_tokens(request, plan, context)
                    if n > 0 and self._reserve(request, n, plan):
                        plan.add(request, n)
            elif admitting and self._admit(request, plan, context):
                admitted.append(request)
            elif not unvisited:
                break
            else:
                admitting = False
        for request in admitted:
            # In FIFO order each is at the head: O(1). One admitted here and then preempted by a later started
            # prompt's reservation was also queued again at the head; this removes that copy, leaving one.
            self.waiting.remove(request)

    def _admit(self, request: Request, plan: SchedulerOutput, context: PlanContext) -> bool:
        """Start a waiting request with its first chunk, if it may go now."""
        if plan.preempted_ids or len(self.running) >= self.max_num_seqs:
            return False
        num_hit_tokens = self.kv.take_cached_prefix(request)  # a hit is n fewer tokens to prefill
        n = self.chunk_tokens(request, plan, context)
        if n == 0 or not self.kv.can_allocate(request, n):
            self.kv.free(request)
            request.num_computed_tokens = 0
            return False
        self.kv.allocate(request, n)
        self.running.append(request)
        request.status = RequestStatus.RUNNING
        if request.first_scheduled_s is None:
            request.first_scheduled_s = context.now
            request.num_cached_tokens = num_hit_tokens
        plan.add(request, n)
        return True

    def _reserve(self, request: Request, n: int, plan: SchedulerOutput) -> bool:
        """Allocate KV for n more tokens, preempting the newest requests if needed.

        Returns False if `request` itself had to be preempted.
        """
        if self.kv.num_new_blocks(request, n) == 0:
            return True  # most decodes: the last block still has room
        while not self.kv.can_allocate(request, n):
            victim = self.victim(plan)
            self._preempt(victim, plan)
            if victim is request:
                return False
        self.kv.allocate(request, n)
        return True

    def _preempt(self, request: Request, plan: SchedulerOutput) -> None:
        """Preempt by recompute: drop the KV, keep the tokens, requeue at the head."""
        self.running.remove(request)
        self.kv.free(request)
        self.num_recomputed_tokens += request.num_computed_tokens
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        if request.request_id in plan.num_scheduled_tokens:
            plan.requests.remove(request)
            plan.total_num_scheduled_tokens -= plan.num_scheduled_tokens.pop(request.request_id)
            plan.draft_token_ids.pop(request.request_id, None)
            plan.shape = plan.recount_shape()  # rare: recount what is left
        plan.preempted_ids.append(request.request_id)

    # ---- after the executor -------------------------------------------------------------------

    def update(self, plan: SchedulerOutput, output: ModelOutput, now: float) -> list[Request]:
        """Advance counters, append sampled tokens, finish requests that hit a stop condition."""
        if self.latency is not None and plan.predicted_s is not None and output.elapsed_s > 0:
            self.latency.observe(plan.shape, plan.predicted_s, output.elapsed_s)
        finished = []
        scheduled, sampled, running = plan.num_scheduled_tokens, output.sampled_token_ids, RequestStatus.RUNNING
        drafted, accepted = plan.draft_token_ids, output.accepted_draft_ids
        for request in plan.requests:
            if request.status is not running:
                continue
            token = sampled.get(request.request_id)
            reason = None
            if drafted and request.request_id in drafted:
                verified = accepted.get(request.request_id, [])
                self._observe_drafts(request, len(drafted[request.request_id]), len(verified))
                reason = self._fold_verified(request, verified)
            else:
                request.num_computed_tokens += scheduled[request.request_id]
                self.kv.cache_computed(request)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            if request.spec_token_ids:
                request.spec_token_ids = []  # guesses after the tokens it had: stale now
            if reason is None:  # else a stop among the accepted drafts ended it, and the token after is dropped
                request.token_ids.append(token)
                reason = self._stop_reason(request, token)
            if request.first_token_s is None:
                request.first_token_s = now
            request.last_token_s = now
            if reason is not None:
                self.finish(request.request_id, reason)
                finished.append(request)
        return finished

    def _observe_drafts(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        rate = self.acceptance.setdefault(request.request_id, AcceptanceRate(at_token=request.num_tokens))
        rate.observe(num_drafts, num_accepted, request.num_tokens)
        self.num_draft_tokens += num_drafts
        self.num_accepted_tokens += num_accepted

    def _fold_verified(self, request: Request, accepted: list[int]) -> FinishReason | None:
        """A verify row's accepted drafts join the request's tokens, one by one up to the first stop, and the KV
        reserved for the rejected ones goes back; only verified tokens are ever published to the prefix cache.
        Returns the stop reason if one of them ended the request."""
        request.num_computed_tokens += 1  # its last token, which the drafts followed
        reason = None
        for token in accepted:
            request.token_ids.append(token)
            request.num_computed_tokens += 1  # its KV was written when it was checked as a draft
            reason = self._stop_reason(request, token)
            if reason is not None:
                break
        self.kv.trim(request, request.num_computed_tokens)
        self.kv.cache_computed(request)
        return reason

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        sampling = request.sampling
        if (token == self.eos_token_id and not sampling.ignore_eos) or token in sampling.stop_token_ids:
            return FinishReason.STOP
        num_tokens = len(request.token_ids)
        max_tokens = sampling.max_tokens or math.inf
        if num_tokens - len(request.prompt_token_ids) >= max_tokens or num_tokens >= self.max_request_tokens:
            return FinishReason.LENGTH
        return None

    @property
    def limits(self) -> RequestLimits:
        if self.max_request_tokens == self.max_model_len:
            name = "context length"
        elif self.max_request_tokens == self.kv.capacity_tokens:
            name = "KV cache capacity"
        else:
            name = "token budget of this non-chunking scheduler"
        return RequestLimits(self.max_model_len, self.max_request_tokens, name)

    @property
    def num_outstanding_tokens(self) -> int:
        """Prompt tokens still to prefill plus output tokens still to generate (at most), over all requests:
        the load figure of the `least_tokens` router."""
        return sum(r.num_outstanding_tokens for r in self.requests.values())


@dataclass(frozen=True)
class RequestLimits:
    """The fixed limits a request must fit, whatever the load: plain data, so a front end in another process can
    refuse a request (400) before it sends it to a replica."""

    max_model_len: int
    max_request_tokens: int
    limit_name: str

    def check(self, request: Request) -> None:
        wanted = request.num_prompt_tokens + (request.sampling.max_tokens or 1)
        if wanted > self.max_request_tokens:
            raise ValueError(
                f"request {request.request_id}: {request.num_prompt_tokens} prompt tokens + "
                f"{request.sampling.max_tokens or 1} output tokens exceed the "
                f"{self.limit_name} of {self.max_request_tokens} tokens")
