"""A request body over the server's limit is refused with 413 before it is read, so its size costs nothing."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    def __init__(self, max_bytes: int) -> None:
        # Connection: close, so the server drops the connection instead of parsing the rest of the body to reuse it
        super().__init__(413, f"the request body is larger than this server's limit of {max_bytes} bytes",
                         headers={"Connection": "close"})


class BodySizeLimit:
    """ASGI middleware: `receive` raises BodyTooLarge at its first call when the Content-Length is over `max_bytes`
    (nothing of the body is read), and, for a chunked body, as soon as the bytes received pass it. The route's body
    parsing lets an HTTPException through, so the app's own handler answers with its error body; the server
    discards what the client still sends."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        received = 0

        async def receive_within_limit() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, receive_within_limit, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
