"""What one request may ask for: a body of at most MAX_BODY_BYTES (an ASGI middleware
refuses a larger one with a 413 before anything parses it), and at most
MAX_PROMPTS_PER_REQUEST prompts in one completions request (the routes answer 400)."""

from __future__ import annotations

from ..config import MAX_PROMPTS_PER_REQUEST
from .errors import error_response

MAX_BODY_BYTES = 8 << 20

__all__ = ["MAX_BODY_BYTES", "MAX_PROMPTS_PER_REQUEST", "BodyLimit"]


class BodyLimit:
    """A request body over `max_bytes` gets a 413 naming the limit, from its Content-Length
    or, for a chunked body, once that many bytes have arrived."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        if length is not None:
            return await self.app(scope, receive, send)
        messages, size = [], 0  # chunked: buffer up to the limit, then replay
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"the request body is over {self.max_bytes} bytes")
        await response(scope, receive, send)
