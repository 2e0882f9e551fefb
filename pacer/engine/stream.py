"""The outputs of one `generate` call, as the server reads them."""

from __future__ import annotations

import asyncio
from typing import Protocol, Self

from pacer.engine.protocol import EngineError, Failure, RequestExpired
from pacer.request import RequestOutput


class StreamSource(Protocol):
    """What a stream needs of the front end that feeds it."""

    def abort(self, request_ids: list[str]) -> None: ...

    def detach(self, request_ids: list[str]) -> None: ...


class RequestStream:
    """The outputs of one `generate` call, in order per request.

    Raises EngineError if the engine failed on any of its requests. `close()` (also on leaving `with`, or on
    cancellation inside it) aborts whatever has not finished.
    """

    def __init__(self, frontend: StreamSource, request_ids: list[str], outputs: asyncio.Queue) -> None:
        self._frontend = frontend
        self._request_ids = request_ids
        self._unfinished = set(request_ids)
        self._outputs = outputs

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if not self._unfinished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, Failure):
            self._unfinished.discard(item.request_id)
            self.close()
            raise (RequestExpired if item.expired else EngineError)(item.message)
        if item.finished:
            self._unfinished.discard(item.request_id)
        return item

    def close(self) -> None:
        if self._unfinished:  # before detaching: the front end finds a request's replica through what detach forgets
            self._frontend.abort(list(self._unfinished))
            self._unfinished.clear()
        self._frontend.detach(self._request_ids)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
