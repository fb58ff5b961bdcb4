"""Pure ASGI middleware: request ids, the access log and the body's limits (size, time).

Pure ASGI rather than BaseHTTPMiddleware, which would wrap every streamed chunk in an
extra task and queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lowvram.gateway.errors import PayloadTooLarge, RequestTimeout
from lowvram.gateway.exchange import access_fields
from lowvram.logs import request_id_var

access_logger = logging.getLogger("lowvram.access")

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class RequestContextMiddleware:
    """A request's id and its access log line.

    Accepts a sane `x-request-id` or makes one, echoes it, exposes it to every log line,
    and logs one line when the last byte is sent (for a stream, at its end). One wrapper
    around `send` serves both: it is called for every streamed chunk.
    """

    QUIET_PATHS = ("/health", "/ready", "/metrics")

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = _header(scope, b"x-request-id")
        request_id = incoming if incoming and _SAFE_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        fields: dict[str, object] = {}
        fields_token = access_fields.set(fields)
        raw_id = request_id.encode()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", raw_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, status, time.perf_counter() - started, fields)
            access_fields.reset(fields_token)
            request_id_var.reset(token)

    def _log(
        self, scope: Scope, status: int, latency: float, exchange_fields: dict[str, object]
    ) -> None:
        """One line per request; an API request's exchange has added its own fields."""
        fields: dict[str, object] = {
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "latency_ms": round(latency * 1000, 2),
            **exchange_fields,
        }
        # Probes poll these every few seconds, answered 503 while the engine starts.
        quiet = scope["path"] in self.QUIET_PATHS and status != 401
        access_logger.log(logging.DEBUG if quiet else logging.INFO, "request", extra=fields)


class ShutdownMiddleware:
    """A request cancelled by the server's shutdown ends here, quietly.

    uvicorn cancels what still runs when its drain time is over, or at once on a second
    Ctrl-C; a cancelled request would otherwise reach it as "Exception in ASGI application"
    with a traceback. Streams have already sent their error event by then (relay.py).
    Nothing else cancels a request's task: a client hanging up is a disconnect message.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if scope["type"] == "lifespan":
                raise
            logging.getLogger("lowvram.gateway").info(
                "a request was cut by the shutdown", extra={"path": scope.get("path")}
            )


class BodyLimitMiddleware:
    """A request body within limits of size and time.

    Over `max_bytes`: 413, by Content-Length at once, or while reading a chunked one. Not
    all in within `body_seconds` of the first read: 408. Either closes the connection
    (`connection: close`): the rest of the body is never read, so it cannot be reused.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, body_seconds: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.body_seconds = body_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        deadline: float | None = None
        body_done = False
        refused = False

        async def guarded_receive() -> Message:
            nonlocal received, deadline, body_done, refused
            if body_done:  # what the relay waits for later: the client hanging up
                return await receive()
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.body_seconds
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                refused = True
                raise RequestTimeout(
                    f"The request body did not arrive within {self.body_seconds:g} s."
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    raise PayloadTooLarge(self._message())
                body_done = not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            if refused and message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        await self.app(scope, guarded_receive, closing_send)

    def _message(self) -> str:
        return f"The request body is larger than the gateway's limit of {self.max_bytes} bytes."

    async def _reject(self, send: Send) -> None:
        body = json.dumps(PayloadTooLarge(self._message()).body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
