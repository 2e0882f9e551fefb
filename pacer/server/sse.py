"""Server-sent events with a bound on a client that stops reading.

uvicorn's `send` waits while the connection's output is backed up (asyncio's 64 KiB write buffer, and the
socket's unsent bytes, which `launch.py` caps with TCP_NOTSENT_LOWAT), so a client that reads nothing stalls
its stream in `send` while the engine keeps generating for it. After `timeout_s` stalled there, the stream is
cut off: its requests are aborted (their KV freed) and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable

from starlette.responses import StreamingResponse
from starlette.types import Message, Send

logger = logging.getLogger(__name__)


class _Stalled(Exception):
    """The client accepted none of the stream's output for `timeout_s`."""


class EventStream(StreamingResponse):
    """A `text/event-stream` response whose every `send` must complete within `timeout_s` (0: no limit).

    Whichever way it ends (finished, client gone, stalled), the events generator is closed before the
    response returns, so the requests behind it are aborted at once rather than when it is collected.
    """

    def __init__(self, events: AsyncGenerator[str, None], name: str, timeout_s: float,
                 on_stall: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.name = name
        self.timeout_s = timeout_s
        self.on_stall = on_stall

    async def stream_response(self, send: Send) -> None:
        async def bounded_send(message: Message) -> None:
            try:
                async with asyncio.timeout(self.timeout_s or None):
                    await send(message)
            except TimeoutError:
                raise _Stalled from None

        try:
            await super().stream_response(bounded_send)
        except _Stalled:
            # Returning without finishing the response makes uvicorn close the connection (it logs that too).
            logger.warning("%s: the client read nothing for %.1f s; stream cut off, its requests aborted",
                           self.name, self.timeout_s)
            self.on_stall()
        finally:
            await self.body_iterator.aclose()
