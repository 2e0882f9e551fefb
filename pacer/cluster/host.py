"""Scale-out on Ray: each engine replica is an actor (cluster/replica.py) reached through a `RayHost`, and
`ray_frontend` puts N of them behind the same front end as one local engine (engine/frontend.py). Ray does the
rest: placement, the streams, and restarting a replica that died (`max_restarts`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time

from pacer.cluster.replica import Replica
from pacer.config import ClusterConfig, EngineConfig
from pacer.engine.frontend import Frontend
from pacer.engine.handle import HostEvents
from pacer.engine.protocol import Abort, Add, Adopt, Command, Ready
from pacer.extras import require
from pacer.request import Request
from pacer.scheduling.router import router_class

logger = logging.getLogger(__name__)

_REJOIN_POLL_S = 0.5
_PRUNE_ADOPTIONS = 64  # hand-over calls kept for aborts to wait on, before the finished ones are dropped


def ray_frontend(engine_config: EngineConfig, cluster: ClusterConfig, admission: bool = True) -> Frontend:
    """Start (or join) Ray and return the front end of `cluster.replicas` replica actors (not started yet)."""
    ray = require("ray", "ray", "pacer serve --replicas/--ray-address (engine replicas on Ray)")

    router = router_class(cluster.router)()  # fail on a bad name before starting anything
    threads = (cluster.threads_per_replica or engine_config.model.threads
               or max(1, (os.cpu_count() or 1) // cluster.replicas))
    started_ray = False
    if not ray.is_initialized():
        local = cluster.ray_address in (None, "local")
        # Ray starts workers at nice 15 by default: a replica then yields its cores to every other process
        # (the front end, the load), and its OpenMP threads stall at each barrier (-26 % throughput here).
        ray.init(address=cluster.ray_address, include_dashboard=False, log_to_driver=True,
                 num_cpus=max(os.cpu_count() or 1, cluster.replicas * threads) if local else None,
                 _system_config={"worker_niceness": 0} if local else None)
        started_ray = True
    config = dataclasses.replace(engine_config, model=dataclasses.replace(engine_config.model, threads=threads))
    gpus = 1 if engine_config.model.device == "cuda" else 0  # a replica per GPU
    actor_class = ray.remote(Replica).options(num_cpus=threads, num_gpus=gpus, max_restarts=cluster.max_restarts,
                                              max_task_retries=0, max_concurrency=1000)
    logger.info("starting %d replica(s) on Ray (%d threads each, router %s%s)", cluster.replicas, threads,
                cluster.router, f", the first {cluster.prefill_replicas} prefill only" if cluster.prefill_replicas
                else "")
    hosts = [RayHost(lambda: actor_class.remote(config), cluster.max_restarts) for _ in range(cluster.replicas)]
    return Frontend(hosts, router, prefill_replicas=cluster.prefill_replicas, admission=admission,
                    shutdown=ray.shutdown if started_ray else None)


class RayHost:
    """One replica actor: commands are its method calls, updates its stream, consumed by a task on the front end's
    event loop; when the actor dies, the task waits for Ray to restart it and reports it back."""

    kind = "ray"
    restarts = True

    def __init__(self, create: object, max_restarts: int) -> None:
        self._create = create
        self.max_restarts = max_restarts
        self.actor: object = None
        self._events: HostEvents | None = None
        self._task: asyncio.Task | None = None
        self._num_restarts = 0
        # Hand-over calls by request id: an abort waits for the one it cancels (Ray runs a call once its ObjectRef
        # arguments are ready, and adopt waits for its KV, so the abort could otherwise come first).
        self._adoptions: dict[str, object] = {}

    def launch(self, events: HostEvents) -> None:
        self._events = events
        self.actor = self._create()

    def ready(self) -> Ready:
        import ray

        return ray.get(self.actor.ready.remote())

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is None or self._task.get_loop() is not loop:
            self._task = loop.create_task(self._consume())

    def send(self, command: Command) -> None:
        if isinstance(command, Add):
            self.actor.submit.remote(command.requests, [_age(r) for r in command.requests])
        elif isinstance(command, Adopt):
            request = command.request
            self._adoptions[request.request_id] = self.actor.adopt.remote(request, _age(request), command.payload)
            if len(self._adoptions) > _PRUNE_ADOPTIONS:
                self._prune()
        elif isinstance(command, Abort):
            adopted = [self._adoptions.pop(rid) for rid in command.request_ids if rid in self._adoptions]
            self.actor.abort.remote(command.request_ids, *adopted)

    def take_kv(self, request_id: str, num_held_tokens: int) -> object:
        """A reference to the KV (the bytes go from actor to actor through Ray's object store)."""
        return self.actor.take_kv.remote(request_id, num_held_tokens)

    def cached_prompt_tokens(self, request: Request) -> int | None:
        return None  # its KV is in the actor: the front end believes what it sent

    async def stop(self) -> None:
        import ray

        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        ray.kill(self.actor, no_restart=True)

    def _prune(self) -> None:
        import ray

        done, _ = ray.wait(list(self._adoptions.values()), num_returns=len(self._adoptions), timeout=0)
        done = set(done)
        self._adoptions = {rid: ref for rid, ref in self._adoptions.items() if ref not in done}

    async def _consume(self) -> None:
        import ray

        while True:
            try:
                async for ref in self.actor.updates.options(num_returns="streaming").remote():
                    self._events.updated(await ref)
            except ray.exceptions.RayError as error:
                self._events.lost(str(error))
            else:
                self._events.lost("its stream of updates ended")
            self._adoptions.clear()
            ready = await self._rejoin()
            self._events.rejoined(ready)
            if ready is None:
                return

    async def _rejoin(self) -> Ready | None:
        """Wait until Ray has restarted the actor (calls to a restarting actor wait for it); None once it has used
        up its restarts."""
        import ray

        while True:
            try:
                ready = await self.actor.ready.remote()
                self._num_restarts += 1
                return ready
            except ray.exceptions.ActorDiedError:
                if self._num_restarts >= self.max_restarts:
                    return None
            except ray.exceptions.RayError:
                pass
            await asyncio.sleep(_REJOIN_POLL_S)


def _age(request: Request) -> float:
    """Seconds since the request arrived: sent instead of the arrival time, as clocks differ across machines."""
    now = time.monotonic()
    return now - (request.arrival_s if request.arrival_s is not None else now)
