"""Hand-overs waiting for room on a decode engine (disaggregated serving), in one place for the engine loop that
serves a Ray replica and for the simulator's decode replicas, so that both hold back and take over alike."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Protocol

from pacer.request import Request
from pacer.scheduling import Scheduler


class Adopter(Protocol):
    """An engine that takes hand-overs (`Engine`, or the simulator's replica around one)."""

    scheduler: Scheduler

    @property
    def has_unfinished(self) -> bool: ...

    def adopt(self, request: Request, payload: object) -> None: ...


class Adoptions:
    """Requests another engine prefilled, with their KV, waiting in arrival order for a batch slot and KV blocks
    here: a full decode engine holds them back instead of failing them, and takes them as its requests end."""

    def __init__(self) -> None:
        self._waiting: deque[tuple[Request, object]] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, request: Request, payload: object) -> None:
        self._waiting.append((request, payload))

    def remove(self, request_id: str) -> bool:
        """Drop a waiting request (aborted before it started here); whether it was waiting."""
        waiting = [item for item in self._waiting if item[0].request_id == request_id]
        for item in waiting:
            self._waiting.remove(item)
        return bool(waiting)

    def request_ids(self) -> list[str]:
        return [request.request_id for request, _ in self._waiting]

    @property
    def num_outstanding_tokens(self) -> int:
        return sum(request.num_outstanding_tokens for request, _ in self._waiting)

    def take(self, engine: Adopter) -> Iterator[tuple[Request, Exception | None]]:
        """Adopt waiting requests in arrival order while the engine has room; yields each with None, or with the
        error that failed it alone: one that cannot fit even in an idle engine, or whose payload does not import."""
        while self._waiting:
            request, payload = self._waiting[0]
            if not engine.scheduler.has_room_for(request) and engine.has_unfinished:
                return  # room comes back as running requests end
            self._waiting.popleft()
            try:
                engine.adopt(request, payload)
            except Exception as error:  # noqa: BLE001  (too big, or a bad payload: this request's failure alone)
                yield request, error
            else:
                yield request, None
