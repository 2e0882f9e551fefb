"""The front end's side of scale-out: N engine replicas as Ray actors behind one router, used by the OpenAI app
exactly as it uses one local AsyncEngine (generate, abort, load, limits, health).

Routing and admission are the simulator's (`scheduling.router.dispatch`): each replica is seen through its
latest queue snapshot plus what was sent to it since, so the front end decides at arrival without asking a
replica anything. Ray does the rest: placement, the streams, and restarting a replica that died
(`max_restarts`). What the front end adds is that nothing is lost silently when one dies: requests that had
no token yet go to another replica, streams already under way end with an error, and the router skips the
replica until it is ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pacer.cluster.replica import Replica, ReplicaInfo
from pacer.config import ClusterConfig, EngineConfig
from pacer.engine.async_engine import EngineError, EngineLoad, EngineObserver, EngineUpdate, Failure, RequestStream
from pacer.extras import require
from pacer.request import FinishReason, Request, RequestOutput
from pacer.scheduling.admission import QueueView, SLOUnattainable
from pacer.scheduling.base import RequestLimits
from pacer.scheduling.router import PrefixIndex, dispatch, router_class, with_hit

logger = logging.getLogger(__name__)

_REJOIN_POLL_S = 0.5


class ReplicaState(str, enum.Enum):
    UP = "up"
    RESTARTING = "restarting"  # died; Ray is restarting it
    DEAD = "dead"  # out of restarts


@dataclass
class _Flight:
    """A request sent to a replica and not finished yet."""

    request: Request  # the front end's copy: only its predicted cache hit changes, so it can be sent again
    outputs: asyncio.Queue
    replica: int
    started: bool = False  # has produced a token: it can no longer move to another replica
    handoff: bool = False  # sent to a prefill replica, to be handed to a decode replica after its first token
    adopted: object = None  # the decode replica's `adopt` call (an ObjectRef), which an abort must not overtake


class _Replica:
    """The front end's view of one replica (a `router.ReplicaView`)."""

    def __init__(self, index: int, actor: object, prefill_only: bool = False) -> None:
        self.index = index
        self.actor = actor
        self.prefill_only = prefill_only
        self.state = ReplicaState.RESTARTING
        self.queue = QueueView()
        self.load = EngineLoad()
        self.info: ReplicaInfo | None = None
        self.num_restarts = 0
        self.num_routed = 0
        self.flights: set[str] = set()
        self.task: asyncio.Task | None = None
        self.sent = PrefixIndex(0)  # its prefix cache, believed from what was sent here (it evicts on its own)

    def rejoin(self, info: ReplicaInfo) -> None:
        self.info = info
        self.queue = QueueView(info.latency)
        self.queue.latest = info.queue
        self.load = EngineLoad()
        self.sent = PrefixIndex.of_tokens(info.prefix_cache_tokens)  # (re)started: its cache is empty
        self.state = ReplicaState.UP

    @property
    def num_outstanding_tokens(self) -> int:
        return self.load.num_outstanding_tokens + sum(r.num_outstanding_tokens for r in self.queue.pending())

    def cached_prompt_tokens(self, request: Request) -> int:
        return self.sent.cached_prompt_tokens(request)

    def predicted_ttft_s(self, request: Request) -> float | None:
        return self.queue.predicted_ttft_s(with_hit(request, self.sent.cached_prompt_tokens(request)))


class ClusterEngine:
    """Replicas on Ray behind a router: the app's engine when `pacer serve --replicas N` (or --ray-address)."""

    def __init__(self, engine_config: EngineConfig, cluster: ClusterConfig, admission: bool = True) -> None:
        router_class(cluster.router)  # fail on a bad name before starting anything
        require("ray", "ray", "pacer serve --replicas/--ray-address (engine replicas on Ray)")
        self.engine_config = engine_config
        self.cluster = cluster
        self.admission = admission
        self.router = router_class(cluster.router)()
        self.observer: EngineObserver | None = None
        self.limits: RequestLimits | None = None
        self.replicas: list[_Replica] = []
        self.num_rerouted = 0
        self._flights: dict[str, _Flight] = {}
        self._started_ray = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start (or join) Ray and the replicas, and wait until they are ready; once inside the server's event
        loop (the app calls it again there), start consuming their streams."""
        if not self.replicas:
            self._launch()
        with contextlib.suppress(RuntimeError):
            self._loop = asyncio.get_running_loop()
        if self._loop is not None:
            for replica in self.replicas:
                if replica.task is None and replica.state is ReplicaState.UP:
                    replica.task = self._loop.create_task(self._consume(replica))

    def _launch(self) -> None:
        import ray

        cluster = self.cluster
        threads = (cluster.threads_per_replica or self.engine_config.model.threads
                   or max(1, (os.cpu_count() or 1) // cluster.replicas))
        if not ray.is_initialized():
            local = cluster.ray_address in (None, "local")
            # Ray starts workers at nice 15 by default: a replica then yields its cores to every other process
            # (the front end, the load), and its OpenMP threads stall at each barrier (-26 % throughput here).
            ray.init(address=cluster.ray_address, include_dashboard=False, log_to_driver=True,
                     num_cpus=max(os.cpu_count() or 1, cluster.replicas * threads) if local else None,
                     _system_config={"worker_niceness": 0} if local else None)
            self._started_ray = True
        config = dataclasses.replace(self.engine_config,
                                     model=dataclasses.replace(self.engine_config.model, threads=threads))
        gpus = 1 if self.engine_config.model.device == "cuda" else 0  # a replica per GPU
        actor_class = ray.remote(Replica).options(num_cpus=threads, num_gpus=gpus, max_restarts=cluster.max_restarts,
                                                  max_task_retries=0, max_concurrency=1000)
        # The first replica starts alone: if it has to measure a latency profile, it does so on a quiet machine
        # and caches it, and the others (same model, dtype, device and threads) then load it.
        def replica(i: int) -> _Replica:
            return _Replica(i, actor_class.remote(config), prefill_only=i < cluster.prefill_replicas)

        self.replicas = [replica(0)]
        infos = [ray.get(self.replicas[0].actor.ready.remote())]
        self.replicas += [replica(i) for i in range(1, cluster.replicas)]
        infos += ray.get([r.actor.ready.remote() for r in self.replicas[1:]])
        for replica, info in zip(self.replicas, infos):
            replica.rejoin(info)
        self.limits = infos[0].limits
        logger.info("%d replica(s) ready on Ray (%s threads each, router %s%s): %s", len(self.replicas), threads,
                    cluster.router, f", the first {cluster.prefill_replicas} prefill only" if cluster.prefill_replicas
                    else "", ", ".join(f"pid {i.pid} on {i.host}" for i in infos))

    async def stop(self) -> None:
        import ray

        self.abort_all()
        for replica in self.replicas:
            if replica.task is not None:
                replica.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await replica.task
            ray.kill(replica.actor, no_restart=True)
        self.replicas = []
        if self._started_ray:
            ray.shutdown()

    @property
    def is_alive(self) -> bool:
        return any(replica.state is ReplicaState.UP for replica in self.replicas)

    @property
    def num_in_flight(self) -> int:
        return len(self._flights)

    @property
    def load(self) -> EngineLoad:
        """The sum over replicas (KV usage: the mean of those up)."""
        up = [r.load for r in self.replicas if r.state is ReplicaState.UP]
        return EngineLoad(sum(s.num_running for s in up), sum(s.num_waiting for s in up),
                          sum(s.kv_cache_usage for s in up) / max(1, len(up)),
                          sum(s.num_outstanding_tokens for s in up))

    def health(self) -> dict[str, object]:
        return {"replicas": [{"replica": r.index, "state": r.state.value, "restarts": r.num_restarts,
                              "running": r.load.num_running, "waiting": r.load.num_waiting}
                             for r in self.replicas]}

    # ---- requests -----------------------------------------------------------------------------------------

    def generate(self, requests: list[Request]) -> RequestStream:
        """Route one call's requests (all to one replica, admitted on the first) and stream their outputs.
        Raises ValueError (never servable), SLOUnattainable (no replica can meet the TTFT SLO) or EngineError
        (no replica is up) before anything is sent."""
        for request in requests:
            self.limits.check(request)
        up = self._up()
        if not up:
            raise EngineError("no engine replica is up")
        # admitted on the prefill side
        replica = up[dispatch(requests[0], up, self.router, time.monotonic(), admit=self.admission)]
        outputs: asyncio.Queue = asyncio.Queue()
        self._send(replica, requests, outputs)
        return RequestStream(self, [r.request_id for r in requests], outputs)

    def abort(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[_Flight]] = {}
        for request_id in request_ids:
            flight = self._flights.get(request_id)
            if flight is not None:
                by_replica.setdefault(flight.replica, []).append(flight)
        for index, flights in by_replica.items():
            replica = self.replicas[index]
            if replica.state is ReplicaState.UP:
                # Ray runs a call only once its ObjectRef arguments are ready: passing the hand-overs' adopt calls
                # keeps the abort behind them (adopt itself waits for its KV, so it could otherwise come second)
                replica.actor.abort.remote([f.request.request_id for f in flights],
                                           *[f.adopted for f in flights if f.adopted is not None])

    def abort_all(self) -> None:
        self.abort(list(self._flights))

    def detach(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            flight = self._flights.pop(request_id, None)
            if flight is not None:
                self.replicas[flight.replica].flights.discard(request_id)

    def _up(self, prefill: bool = True) -> list[_Replica]:
        """The replicas up that take new requests (prefill=True: the prefill pool when disaggregated), or
        that take requests over for decoding (prefill=False)."""
        disaggregated = self.cluster.prefill_replicas > 0
        return [r for r in self.replicas if r.state is ReplicaState.UP
                and (not disaggregated or r.prefill_only == prefill)]

    def _send(self, replica: _Replica, requests: list[Request], outputs: asyncio.Queue) -> None:
        sent = []
        for request in requests:
            handoff = replica.prefill_only and request.sampling.max_tokens != 1
            request.num_cached_tokens = replica.sent.cached_prompt_tokens(request)  # its queue plans with the hit
            replica.sent.add(PrefixIndex.prompt_keys(request))
            self._flights[request.request_id] = _Flight(request, outputs, replica.index, handoff=handoff)
            replica.flights.add(request.request_id)
            if handoff:  # the prefill replica samples the first token, keeps the KV, and stops
                sampling = dataclasses.replace(request.sampling, max_tokens=1,
                                               min_tokens=min(1, request.sampling.min_tokens))
                request = dataclasses.replace(request, sampling=sampling, export_kv=True)
            replica.queue.submitted(request)
            sent.append(request)
        replica.num_routed += len(requests)
        replica.actor.submit.remote(sent, [_age(r) for r in sent])

    def _hand_over(self, prefill: _Replica, flight: _Flight, first: RequestOutput) -> None:
        """Move a prefilled request to the least loaded decode replica; its KV goes from actor to actor
        through Ray's object store (the front end only passes the reference), less the blocks that replica is
        believed to hold in its prefix cache."""
        request_id = flight.request.request_id
        prefill.flights.discard(request_id)
        decoders = self._up(prefill=False)
        if not decoders:
            self._flights.pop(request_id, None)
            flight.outputs.put_nowait(Failure(request_id, "no decode replica is up to continue this request"))
            prefill.actor.abort.remote([request_id])  # drops the KV it kept
            return
        target = min(decoders, key=lambda r: r.num_outstanding_tokens)
        held = target.sent.cached_prompt_tokens(flight.request)  # only the blocks it lacks move
        target.sent.add(PrefixIndex.prompt_keys(flight.request))
        request = dataclasses.replace(flight.request)  # a copy: the front end's stays as sent
        request.token_ids.extend(first.new_token_ids)
        request.num_computed_tokens = request.num_prompt_tokens
        flight.replica, flight.started, flight.handoff = target.index, True, False
        target.flights.add(request_id)
        target.num_routed += 1
        target.queue.submitted(request)  # counted in its load until its next update, as a submitted request is
        flight.adopted = target.actor.adopt.remote(request, _age(request), prefill.actor.take_kv.remote(request_id, held))

    # ---- each replica's stream ----------------------------------------------------------------------------

    async def _consume(self, replica: _Replica) -> None:
        import ray

        while True:
            try:
                async for ref in replica.actor.updates.options(num_returns="streaming").remote():
                    self._apply(replica, await ref)
            except ray.exceptions.RayError as error:
                logger.error("replica %d is lost: %s", replica.index, error)
            self._lost(replica)
            info = await self._rejoin(replica)
            if info is None:
                return
            replica.num_restarts += 1
            replica.rejoin(info)
            logger.info("replica %d rejoined (pid %d on %s)", replica.index, info.pid, info.host)

    def _apply(self, replica: _Replica, update: EngineUpdate) -> None:
        replica.load = update.load
        replica.queue.latest = update.queue
        if update.latency is not None:
            replica.queue.latency = update.latency
        update.report(self.observer)
        for item in update.outputs:
            flight = self._flights.get(item.request_id)
            if flight is None or flight.replica != replica.index:
                continue  # detached, or an abort's echo
            if flight.handoff and isinstance(item, RequestOutput) and item.finish_reason is FinishReason.LENGTH:
                flight.outputs.put_nowait(dataclasses.replace(item, finished=False, finish_reason=None))
                self._hand_over(replica, flight, item)
                continue
            if isinstance(item, Failure) or item.finished:
                self.detach([item.request_id])
            elif item.new_token_ids:
                flight.started = True
            flight.outputs.put_nowait(item)

    def _lost(self, replica: _Replica) -> None:
        """The replica died: re-route what had no token yet, fail what had, stop routing to it."""
        replica.state = ReplicaState.RESTARTING
        flights = [self._flights[rid] for rid in replica.flights if rid in self._flights]
        replica.flights.clear()
        up = self._up()
        for flight in flights:
            self._flights.pop(flight.request.request_id, None)
            if flight.started or not up:
                reason = "it had started streaming" if flight.started else "no other replica is up"
                flight.outputs.put_nowait(Failure(flight.request.request_id, f"engine replica {replica.index} "
                                                  f"died while serving this request, and {reason}"))
                continue
            try:
                target = up[dispatch(flight.request, up, self.router, time.monotonic())]
            except SLOUnattainable:  # it was admitted once: serve it late rather than drop it
                target = up[self.router.choose(flight.request, up)]
            self.num_rerouted += 1
            self._send(target, [flight.request], flight.outputs)

    async def _rejoin(self, replica: _Replica) -> ReplicaInfo | None:
        """Wait until Ray has restarted the replica (calls to a restarting actor wait for it); None once it has
        used up its restarts."""
        import ray

        while True:
            try:
                return await replica.actor.ready.remote()
            except ray.exceptions.ActorDiedError as error:
                if replica.num_restarts >= self.cluster.max_restarts:
                    logger.error("replica %d is dead for good: %s", replica.index, error)
                    replica.state = ReplicaState.DEAD
                    return None
            except ray.exceptions.RayError:
                pass
            await asyncio.sleep(_REJOIN_POLL_S)

    # ---- metrics ------------------------------------------------------------------------------------------

    def collect(self, model_name: str) -> Iterator[object]:
        """Per-replica series for /metrics (a prometheus_client collector's `collect`)."""
        labels = ["model_name", "replica"]
        families = {
            "up": GaugeMetricFamily("pacer:replica_up", "1 if the replica is serving, 0 if it is restarting or dead.",
                                    labels=labels),
            "running": GaugeMetricFamily("pacer:replica_num_requests_running", "Requests in the replica's batch.",
                                         labels=labels),
            "waiting": GaugeMetricFamily("pacer:replica_num_requests_waiting", "Requests waiting in the replica.",
                                         labels=labels),
            "kv": GaugeMetricFamily("pacer:replica_kv_cache_usage_perc", "The replica's KV-cache usage (1 = full).",
                                    labels=labels),
            "restarts": CounterMetricFamily("pacer:replica_restarts", "Times Ray restarted the replica.",
                                            labels=labels),
            "routed": CounterMetricFamily("pacer:replica_requests_routed", "Requests the router sent to the replica.",
                                          labels=labels),
        }
        for r in self.replicas:
            values = {"up": float(r.state is ReplicaState.UP), "running": r.load.num_running,
                      "waiting": r.load.num_waiting, "kv": r.load.kv_cache_usage, "restarts": r.num_restarts,
                      "routed": r.num_routed}
            for name, family in families.items():
                family.add_metric([model_name, str(r.index)], values[name])
        yield from families.values()
        rerouted = CounterMetricFamily("pacer:requests_rerouted", "Requests moved to another replica because "
                                       "theirs died before their first token.", labels=["model_name"])
        rerouted.add_metric([model_name], self.num_rerouted)
        yield rerouted


def _age(request: Request) -> float:
    """Seconds since the request arrived: sent instead of the arrival time, as clocks differ across machines."""
    now = time.monotonic()
    return now - (request.arrival_s if request.arrival_s is not None else now)
