"""Request limits that hostile or broken clients meet before any work is done for them.

* Body size (``RANKER_MAX_BODY_BYTES``): a pure ASGI middleware answers 413 from the
  ``Content-Length`` header before reading anything, and counts the bytes of bodies that come
  without one (chunked) as they arrive, so no request makes the service buffer more than the
  limit. It is pure ASGI, not ``BaseHTTPMiddleware``, so it adds no task per request.
* Candidates per request (``RANKER_MAX_CANDIDATES``) and ``top_k``: :func:`check_rank_limits`,
  raising :class:`RequestError` (a 422 naming the field) from the rank endpoint.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ranker.errors import RequestError


class _BodyTooLarge(Exception):
    """Raised into the app from ``receive`` when a body without a length overruns the limit."""


async def _send_413(send: Send, limit: int) -> None:
    body = orjson.dumps({"detail": f"request body larger than {limit} bytes"})
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes``, checked from the header and while reading."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            # uvicorn has already refused malformed or conflicting Content-Length headers
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await _send_413(send, self.max_bytes)
                return
        received = 0
        over = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to the aborted read (a 400 or 500): ours replaces it
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        except Exception:
            if not over:
                raise
        if over and not started:
            await _send_413(send, self.max_bytes)


def check_rank_limits(n_candidates: int, top_k: int | None, max_candidates: int) -> None:
    """Refuses a rank request the service will not do the work for, naming the field.

    A ``top_k`` above the candidate count is fine (it returns them all); one above the most
    candidates any request may carry can only be a client bug.
    """
    if n_candidates > max_candidates:
        raise RequestError(f"candidates: {n_candidates} candidates, at most {max_candidates}")
    if top_k is not None and top_k > max_candidates:
        raise RequestError(f"top_k: {top_k} is more than the {max_candidates} candidates allowed")
