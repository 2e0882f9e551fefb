"""One simulated engine replica, as a router sees it. A router reads every replica at every arrival, but a replica's
state changes only when it takes a request or an iteration starts or ends; so its load figures are computed once per
change and kept, and at 128 replicas most reads between two arrivals cost a lookup, not a pass over its requests.
"""

from __future__ import annotations

from collections.abc import Sequence

from pacer.engine.adoptions import Adoptions
from pacer.engine.engine import Engine
from pacer.request import Request, RequestOutput
from pacer.scheduling import ModelOutput, Scheduler, SchedulerOutput
from pacer.scheduling.admission import QueueTimes
from pacer.scheduling.router import PrefixIndex, with_hit


class SimReplica:
    """One engine replica and whether it is working; what a router sees of it (`router.ReplicaView`).

    The simulator changes the engine only through `add_request`, `adopt`, `hold_kv`, `release_kv`, `begin_step` and
    `end_step`, each of which drops the cached load figures, so a cached figure is always what the engine's state
    gives now.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # what the front end believes its prefix cache holds, as the real ones do
        self.sent = PrefixIndex.of_tokens(engine.scheduler.kv.prefix_cache_tokens)
        self.adoptions = Adoptions()  # hand-overs waiting for room here (a decode replica)
        self.busy = False  # an iteration is running, or planned for now
        self.num_iterations = 0
        self._outstanding: int | None = None
        self._queue_times: QueueTimes | None = None
        self._ttft: tuple[str, float | None] | None = None  # (request id, its prediction): dispatch asks twice

    # ---- the engine, through the only calls that change it ----------------------------------------------------

    def add_request(self, request: Request) -> None:
        self._changed()
        self.sent.add(PrefixIndex.prompt_keys(request))
        self.engine.add_request(request)

    @property
    def scheduler(self) -> Scheduler:
        return self.engine.scheduler

    @property
    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished

    def adopt(self, request: Request, payload: object) -> None:
        """A request prefilled elsewhere (`Engine.adopt`), taken from `adoptions` when there is room."""
        self._changed()
        self.sent.add(PrefixIndex.prompt_keys(request))
        self.engine.adopt(request, payload)

    def hold_kv(self, num_tokens: int) -> list[int]:
        """Blocks for the KV of a prompt this replica prefilled and is sending away: its scheduler sees them in use
        (and admits less) until `release_kv`. Called right after the request ended and freed at least as many."""
        self._changed()
        kv = self.engine.scheduler.kv
        return kv.pool.allocate(kv.blocks_for(num_tokens))

    def release_kv(self, blocks: list[int]) -> None:
        self._changed()
        self.engine.scheduler.kv.pool.release(blocks)

    def begin_step(self) -> tuple[SchedulerOutput, list[RequestOutput]]:
        self._changed()
        return self.engine.begin_step()

    def end_step(self, plan: SchedulerOutput, result: ModelOutput) -> list[RequestOutput]:
        self._changed()
        return self.engine.end_step(plan, result)

    def _changed(self) -> None:
        self._outstanding = self._queue_times = self._ttft = None

    # ---- what a router reads ---------------------------------------------------------------------------------

    @property
    def num_outstanding_tokens(self) -> int:
        if self._outstanding is None:
            self._outstanding = self.engine.scheduler.num_outstanding_tokens
        return self._outstanding

    def cached_prompt_tokens(self, request: Request) -> int:
        return self.sent.cached_prompt_tokens(request)

    def predicted_ttft_s(self, request: Request, ahead: Sequence[Request] = ()) -> float | None:
        """From the queue after the latest iteration, as the real front end sees a replica (it cannot see how far
        the running iteration has got either)."""
        if ahead:
            times = self._times(ahead)
            return None if times is None else times.ttft_s(self._with_hit(request))
        if self._ttft is None or self._ttft[0] != request.request_id:
            times = self._times()
            self._ttft = (request.request_id, None if times is None else times.ttft_s(self._with_hit(request)))
        return self._ttft[1]

    def _times(self, ahead: Sequence[Request] = ()) -> QueueTimes | None:
        """The queue played forward, behind `ahead` too; kept until the replica changes when nothing is ahead."""
        if self._queue_times is not None and not ahead:
            return self._queue_times
        scheduler = self.engine.scheduler
        snapshot = scheduler.snapshot() if scheduler.latency is not None else None
        if snapshot is None:
            return None
        times = QueueTimes.of(snapshot, scheduler.latency, [self._with_hit(r) for r in ahead])
        if not ahead:
            self._queue_times = times
        return times

    def _with_hit(self, request: Request) -> Request:
        return with_hit(request, self.cached_prompt_tokens(request))
