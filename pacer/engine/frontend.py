"""The front end of a served engine: what the OpenAI app calls (generate, abort, load, limits, health). A single
engine is a cluster of one replica, so one front end serves `pacer serve` (one replica in a thread or a process) and
`pacer serve --replicas N` (replicas as Ray actors) alike.

Each replica is seen through a `ReplicaHandle`: its latest queue snapshot plus what was sent to it since, its load,
and the prefix cache it is believed to hold. Routing and admission are the simulator's (`router.dispatch`, all of
one call's `n` choices together), decided at arrival without asking a replica anything. How commands reach a replica
and its updates come back is its `Host`'s business (engine/hosts.py, cluster/replica.py). The front end adds that
nothing is lost silently when a replica dies: requests with no token yet go to another replica, streams under way
end with an error, and the router skips the replica until it is ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pacer.engine.handle import HandsOver, Host, ReplicaHandle, ReplicaState
from pacer.engine.protocol import (
    Abort,
    Add,
    Adopt,
    EngineError,
    EngineLoad,
    EngineObserver,
    EngineUpdate,
    Failure,
    QueueFullError,
    Ready,
)
from pacer.engine.stream import RequestStream
from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling.admission import SLOUnattainable
from pacer.scheduling.base import RequestLimits
from pacer.scheduling.handover import choose_decoder, decode_request, hands_over, prefill_only
from pacer.scheduling.router import LeastTokensRouter, PrefixIndex, RoundRobinRouter, Router, dispatch

logger = logging.getLogger(__name__)

_RATE_WINDOW = 64  # recent completions used to estimate how fast the queue drains


@dataclass
class _Flight:
    """A request sent to a replica and not finished yet."""

    request: Request  # the front end's copy: only its predicted cache hit changes, so it can be sent again
    outputs: asyncio.Queue
    replica: int | None  # None: held while the replicas restart
    started: bool = False  # has produced a token: it can no longer move to another replica
    handoff: bool = False  # sent to a prefill replica, to be handed to a decode replica after its first token


class Frontend:
    """Replicas behind a router, each reached through its host: the OpenAI app's engine.

    `prefill_replicas`: the first that many only prefill, and hand each request over to a decode replica (the others)
    after its first token. `max_queued_requests`: a cap on requests waiting across replicas (429 beyond it).
    Invariant: a request id is in `_flights` from submission until its final output (or failure) has been delivered,
    or its caller has gone; `num_in_flight` counts them."""

    def __init__(self, hosts: Sequence[Host], router: Router | None = None, prefill_replicas: int = 0,
                 admission: bool = True, max_queued_requests: int | None = None,
                 shutdown: Callable[[], None] | None = None) -> None:
        if not hosts:
            raise ValueError("the front end needs at least one replica")
        if not all(isinstance(host, HandsOver) for host in hosts[:prefill_replicas]):
            raise ValueError("prefill-only replicas need hosts that hand requests over (replicas on Ray)")
        self.replicas = [ReplicaHandle(i, host, prefill_only=i < prefill_replicas) for i, host in enumerate(hosts)]
        self.router = router or RoundRobinRouter()
        self.decode_router: Router = LeastTokensRouter()  # decode load is tokens to generate; TTFT is settled
        self.disaggregated = prefill_replicas > 0
        self.admission = admission  # refuse what is predicted to miss its TTFT SLO (off: serve everything)
        self.max_queued_requests = max_queued_requests
        self.observer: EngineObserver | None = None
        self.limits: RequestLimits | None = None
        self.num_rerouted = 0
        self._flights: dict[str, _Flight] = {}
        self._held: list[_Flight] = []  # no token yet when their replica died, none up: sent again once one is
        self._finish_times: deque[float] = deque(maxlen=_RATE_WINDOW)
        self._shutdown = shutdown
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the replicas and wait until they are ready (re-raising a build error); called again inside the
        server's event loop (the app does), attach their hosts to it."""
        if self.limits is None:
            # The first replica starts alone: if it has to measure a latency profile, it does so on a quiet machine
            # and caches it, and the others (same model, dtype, device and threads) then load it.
            for group in (self.replicas[:1], self.replicas[1:]):
                for replica in group:
                    replica.host.launch(_Events(self, replica))
                for replica in group:
                    replica.rejoin(replica.host.ready())
            self.limits = self.replicas[0].info.limits
            if len(self.replicas) > 1:
                logger.info("%d replica(s) ready: %s", len(self.replicas),
                            ", ".join(f"pid {r.info.pid} on {r.info.host}" for r in self.replicas))
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            if loop is not self._loop:
                self._loop = loop
                for replica in self.replicas:
                    replica.host.attach(loop)

    async def stop(self) -> None:
        """Abort whatever is left and end every replica."""
        self.abort_all()
        for replica in self.replicas:
            if replica.state is not ReplicaState.STARTING:
                await replica.host.stop()
        if self._shutdown is not None:
            self._shutdown()
            self._shutdown = None

    @property
    def is_alive(self) -> bool:
        return any(replica.state is ReplicaState.UP for replica in self.replicas)

    @property
    def num_in_flight(self) -> int:
        return len(self._flights)

    @property
    def load(self) -> EngineLoad:
        """The sum over replicas up (KV usage: their mean)."""
        up = [r.load for r in self.replicas if r.state is ReplicaState.UP]
        return EngineLoad(sum(s.num_running for s in up), sum(s.num_waiting for s in up),
                          sum(s.kv_cache_usage for s in up) / max(1, len(up)),
                          sum(s.num_outstanding_tokens for s in up))

    def health(self) -> dict[str, object] | None:
        """Details for /health beyond up or down: each replica's state, for replicas on Ray."""
        if not any(replica.host.kind == "ray" for replica in self.replicas):
            return None
        return {"replicas": [{"replica": r.index, "state": r.state.value, "restarts": r.num_restarts,
                              "running": r.load.num_running, "waiting": r.load.num_waiting}
                             for r in self.replicas]}

    # ---- requests (event loop side) -----------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> RequestStream:
        """Route and admit `requests` together (one HTTP call's choices: one replica) and stream their outputs.

        Raises ValueError (never servable), QueueFullError, SLOUnattainable (no replica can meet the TTFT SLO) or
        EngineError (no replica up) here, before anything is sent, so the server can answer before it starts a
        response. Closing the stream early (client gone) aborts the unfinished requests at once, which frees their
        KV blocks."""
        up = self._up()
        if not up:
            raise EngineError("the engine is not running" if len(self.replicas) == 1 else "no engine replica is up")
        for request in requests:
            self.limits.check(request)
        if self.max_queued_requests is not None:
            num_queued = max(0, self.num_in_flight - self.load.num_running)
            if num_queued + len(requests) > self.max_queued_requests:
                raise QueueFullError(num_queued, self.retry_after_s(num_queued))
        replica = up[dispatch(requests, up, self.router, time.monotonic(), admit=self.admission)]
        self._loop = self._loop or asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        self._send(replica, requests, outputs)
        return RequestStream(self, [r.request_id for r in requests], outputs)

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests on their replicas; each still-open stream gets a final output with reason abort."""
        by_replica: dict[int, list[str]] = {}
        for request_id in request_ids:
            flight = self._flights.get(request_id)
            if flight is not None and flight.replica is None:  # held: it ends here
                self._held.remove(flight)
                self._flights.pop(request_id)
                flight.outputs.put_nowait(Failure(request_id, "aborted while the engine restarted"))
            elif flight is not None:
                by_replica.setdefault(flight.replica, []).append(request_id)
        for index, ids in by_replica.items():
            if self.replicas[index].state is ReplicaState.UP:
                self.replicas[index].host.send(Abort(ids))

    def abort_all(self) -> None:
        self.abort(list(self._flights))

    def detach(self, request_ids: list[str]) -> None:
        """Deliver nothing more for these requests (their caller has gone)."""
        for request_id in request_ids:
            flight = self._flights.pop(request_id, None)
            if flight is not None and flight.replica is not None:
                self.replicas[flight.replica].flights.discard(request_id)

    def retry_after_s(self, num_queued: int) -> int:
        """When a queued request could be taken: the queue over the recent completion rate."""
        times = self._finish_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 1
        rate = (len(times) - 1) / (times[-1] - times[0])
        return max(1, min(3600, math.ceil((num_queued + 1) / rate)))

    def _up(self, prefill: bool = True) -> list[ReplicaHandle]:
        """The replicas up that take new requests (prefill=True: the prefill pool when disaggregated), or that take
        requests over for decoding (prefill=False)."""
        return [r for r in self.replicas if r.state is ReplicaState.UP
                and (not self.disaggregated or r.prefill_only == prefill)]

    def _send(self, replica: ReplicaHandle, requests: list[Request], outputs: asyncio.Queue) -> None:
        sent = []
        for request in requests:
            request.num_cached_tokens = replica.cached_prompt_tokens(request)  # its queue plans with the hit
            replica.sent.add(PrefixIndex.prompt_keys(request))
            handoff = replica.prefill_only and hands_over(request)
            self._flights[request.request_id] = _Flight(request, outputs, replica.index, handoff=handoff)
            replica.flights.add(request.request_id)
            if handoff:  # the prefill replica samples the first token, keeps the KV, and stops
                request = prefill_only(request)
            replica.queue.submitted(request)
            sent.append(request)
        replica.num_routed += len(requests)
        replica.host.send(Add(sent))

    def _hand_over(self, prefill: ReplicaHandle, flight: _Flight, first: RequestOutput) -> None:
        """Move a prefilled request to a decode replica; only the KV of the blocks it is not believed to hold moves
        (on Ray, from actor to actor: the front end passes the reference on)."""
        request_id = flight.request.request_id
        prefill.flights.discard(request_id)
        decoders = self._up(prefill=False)
        if not decoders:
            self._flights.pop(request_id, None)
            flight.outputs.put_nowait(Failure(request_id, "no decode replica is up to continue this request"))
            prefill.host.send(Abort([request_id]))  # drops the KV it kept
            return
        index, held = choose_decoder(flight.request, decoders, self.decode_router)
        target = decoders[index]
        target.sent.add(PrefixIndex.prompt_keys(flight.request))
        request = decode_request(flight.request, flight.request.sampling, first.new_token_ids)
        flight.replica, flight.started, flight.handoff = target.index, True, False
        target.flights.add(request_id)
        target.num_routed += 1
        target.queue.submitted(request)  # counted in its load until its next update, as a submitted request is
        target.host.send(Adopt(request, prefill.host.take_kv(request_id, held)))

    # ---- what the hosts report (on the event loop) --------------------------------------------------------

    def _apply(self, replica: ReplicaHandle, update: EngineUpdate) -> None:
        replica.apply(update)
        update.report(self.observer)
        now = time.monotonic()
        for item in update.outputs:
            flight = self._flights.get(item.request_id)
            if flight is None or flight.replica != replica.index:
                continue  # detached, or an abort's echo
            if flight.handoff and isinstance(item, RequestOutput) and item.finish_reason is FinishReason.LENGTH:
                flight.outputs.put_nowait(replace(item, finished=False, finish_reason=None))
                self._hand_over(replica, flight, item)
                continue
            if isinstance(item, Failure) or item.finished:
                self.detach([item.request_id])
                self._finish_times.append(now)
            elif item.new_token_ids:
                flight.started = True
            flight.outputs.put_nowait(item)

    def _lost(self, replica: ReplicaHandle, message: str) -> None:
        """The replica died: re-route what had no token yet (or hold it while replicas restart), fail what had, stop
        routing to it."""
        replica.state = ReplicaState.RESTARTING if replica.host.restarts else ReplicaState.DEAD
        flights = [self._flights[rid] for rid in replica.flights if rid in self._flights]
        replica.flights.clear()
        movable = bool(self._up()) or any(r.state is ReplicaState.RESTARTING for r in self.replicas)
        for flight in flights:
            if not flight.started and movable:
                flight.replica = None
                self._held.append(flight)
                continue
            if len(self.replicas) > 1:
                reason = "it had started streaming" if flight.started else "no other replica is up"
                message = f"engine replica {replica.index} died while serving this request, and {reason}"
            self._flights.pop(flight.request.request_id, None)
            flight.outputs.put_nowait(Failure(flight.request.request_id, message))
        self._send_held()

    def _rejoined(self, replica: ReplicaHandle, ready: Ready | None) -> None:
        if ready is None:
            replica.state = ReplicaState.DEAD
            logger.error("replica %d is dead for good", replica.index)
            if not any(r.state in (ReplicaState.UP, ReplicaState.RESTARTING) for r in self.replicas):
                for flight in self._held:
                    self._flights.pop(flight.request.request_id, None)
                    flight.outputs.put_nowait(Failure(flight.request.request_id, "the engine died and could not "
                                                      "be restarted; see the server log"))
                self._held = []
            return
        replica.num_restarts += 1
        replica.rejoin(ready)
        logger.info("replica %d rejoined (pid %d on %s)", replica.index, ready.pid, ready.host)
        self._send_held()

    def _send_held(self) -> None:
        """Requests held for a replica: to the replicas up now (admitted once, they are served late rather than
        dropped)."""
        up = self._up()
        if not up:
            return
        held, self._held = self._held, []
        for flight in held:
            try:
                target = up[dispatch([flight.request], up, self.router, time.monotonic())]
            except SLOUnattainable:
                target = up[self.router.choose(flight.request, up)]
            self.num_rerouted += 1
            self._send(target, [flight.request], flight.outputs)

    def _call_soon(self, callback: Callable, *args: object) -> None:
        """Run `callback` on the event loop; before there is one (no request yet), at once: nothing awaits it."""
        if self._loop is None:
            callback(*args)
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: shutdown
            self._loop.call_soon_threadsafe(callback, *args)


@dataclass(frozen=True)
class _Events:
    """One replica's `HostEvents`: whatever thread the host reports from, the front end acts on its event loop."""

    frontend: Frontend
    replica: ReplicaHandle

    def updated(self, update: EngineUpdate) -> None:
        self.frontend._call_soon(self.frontend._apply, self.replica, update)

    def lost(self, message: str) -> None:
        logger.error("replica %d is lost: %s", self.replica.index, message)
        self.frontend._call_soon(self.frontend._lost, self.replica, message)

    def rejoined(self, ready: Ready | None) -> None:
        self.frontend._call_soon(self.frontend._rejoined, self.replica, ready)
