"""How the front end sees one replica: the `Host` that reaches it (a thread, a process, a Ray actor), and the
`ReplicaHandle` that routing and admission read (a `router.ReplicaView`)."""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from pacer.engine.protocol import Command, EngineLoad, EngineUpdate, Ready
from pacer.request import Request
from pacer.scheduling.admission import QueueView
from pacer.scheduling.router import PrefixIndex, with_hit


class HostEvents(Protocol):
    """What a host reports about its replica, from any thread."""

    def updated(self, update: EngineUpdate) -> None: ...

    def lost(self, message: str) -> None:
        """The replica died (its host restarts it if it can); `message` says how, for the requests it fails."""
        ...

    def rejoined(self, ready: Ready | None) -> None:
        """The replica is back after a restart, or (None) out of restarts."""
        ...


class Host(Protocol):
    """How one replica is reached: it starts the replica, carries commands to its engine loop, and reports through
    the `HostEvents` it was launched with."""

    kind: str  # "thread", "process" or "ray"
    restarts: bool  # a replica that dies is started again (while it has restarts left); otherwise it is gone

    def launch(self, events: HostEvents) -> None:
        """Start the replica without waiting for it."""
        ...

    def ready(self) -> Ready:
        """Wait until the replica has built its engine (re-raising its error here)."""
        ...

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The front end's event loop runs now: start what consumes the replica's updates on it, if anything."""
        ...

    def send(self, command: Command) -> None: ...

    def cached_prompt_tokens(self, request: Request) -> int | None:
        """The request's prompt tokens the replica's prefix cache holds, where the host can read its KV (the same
        process); None: the front end believes what it sent."""
        ...

    async def stop(self) -> None:
        """Abort what is left and end the replica."""
        ...


@runtime_checkable
class HandsOver(Protocol):
    """A host whose replica can prefill for another (disaggregated serving: replicas on Ray)."""

    def take_kv(self, request_id: str, num_held_tokens: int) -> object:
        """The exported KV of a prefilled request, less the first `num_held_tokens` tokens', for `Adopt` elsewhere."""
        ...


class ReplicaState(str, enum.Enum):
    STARTING = "starting"
    UP = "up"
    RESTARTING = "restarting"  # died; its host is restarting it
    DEAD = "dead"  # gone for good


class ReplicaHandle:
    """The front end's view of one replica (a `router.ReplicaView`): its queue as admission sees it, its load, the
    prefix cache it is believed to hold, and its requests in flight."""

    def __init__(self, index: int, host: Host, prefill_only: bool = False) -> None:
        self.index = index
        self.host = host
        self.prefill_only = prefill_only
        self.state = ReplicaState.STARTING
        self.info: Ready | None = None
        self.queue = QueueView()
        self.load = EngineLoad()
        self.sent = PrefixIndex(0)  # its prefix cache, believed from what was sent here (it evicts on its own)
        self.flights: set[str] = set()
        self.num_restarts = 0
        self.num_routed = 0

    def rejoin(self, info: Ready) -> None:
        """(Re)started: its state as it reported it, and a prefix cache believed empty."""
        self.info = info
        self.queue = QueueView(info.latency)
        self.queue.latest = info.queue
        self.load = info.load
        self.sent = PrefixIndex.of_tokens(info.prefix_cache_tokens)
        self.state = ReplicaState.UP

    def apply(self, update: EngineUpdate) -> None:
        self.load = update.load
        self.queue.latest = update.queue
        if update.latency is not None:
            self.queue.latency = update.latency

    @property
    def num_outstanding_tokens(self) -> int:
        return self.load.num_outstanding_tokens + sum(r.num_outstanding_tokens for r in self.queue.pending())

    def cached_prompt_tokens(self, request: Request) -> int:
        exact = self.host.cached_prompt_tokens(request)
        return self.sent.cached_prompt_tokens(request) if exact is None else exact

    def predicted_ttft_s(self, request: Request, ahead: Sequence[Request] = ()) -> float | None:
        return self.queue.predicted_ttft_s(with_hit(request, self.cached_prompt_tokens(request)),
                                           [with_hit(r, self.cached_prompt_tokens(r)) for r in ahead])
