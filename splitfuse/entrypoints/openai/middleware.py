"""ASGI middleware run before any route: API-key check on /v1 and a request-body size limit.

Plain ASGI (not Starlette's BaseHTTPMiddleware) so streaming responses and the
http.disconnect messages that abort requests pass through untouched.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Awaitable, Callable, Optional

from splitfuse.entrypoints.openai.errors import error_body

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# A declared body this many times over the limit is refused without reading it; smaller
# excess is read and dropped first, so the client is not cut off mid-upload and sees the 413.
_DRAIN_FACTOR = 8


async def _send_error(send: Send, status: int, message: str, code: str,
                      extra_headers: Optional[list[tuple[bytes, bytes]]] = None) -> None:
    body = json.dumps(error_body(message, status, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Requires ``Authorization: Bearer <key>`` on every /v1 route (health, metrics, version stay open)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1") or scope.get("method") == "OPTIONS":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not secrets.compare_digest(given, self._expected):  # constant time: no key guessing by timing
            reason = "missing" if not given else "invalid"
            await _send_error(send, 401, f"{reason} API key; send 'Authorization: Bearer <key>'",
                              "invalid_api_key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answers 413 for a request body over ``max_body_bytes`` (declared or streamed in chunks)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            declared_bytes = int(declared) if declared is not None else None
        except ValueError:
            declared_bytes = None
        if declared_bytes is not None and declared_bytes > self.max_body_bytes * _DRAIN_FACTOR:
            await self._too_large(send)
            return
        # Read the body here (the route would read it anyway) so chunked uploads are counted too.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size <= self.max_body_bytes:
                chunks.append(body)
            more = message.get("more_body", False)
        if size > self.max_body_bytes:
            await self._too_large(send)
            return
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _too_large(self, send: Send) -> None:
        await _send_error(send, 413, f"request body is larger than {self.max_body_bytes} bytes",
                          "request_too_large")


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands out the buffered body once, then the real messages (e.g. disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
