"""The one HTTP client to the engine, and what its failures mean to a client.

httpx's API on aiohttp's transport by default: `bench/gateway_overhead.py` measures both
transports side by side (docs/benchmarks.md); aiohttp costs less CPU per relayed chunk.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import dataclass
from http.cookiejar import CookieJar
from typing import Any

import httpx

from lowvram.engine.probe import auth_headers
from lowvram.engine.replicas import Lease, Unreached
from lowvram.gateway.errors import (
    APIError,
    EngineUnavailable,
    UpstreamError,
    UpstreamTimeout,
    error_body,
)
from lowvram.gateway.settings import GatewaySettings

ENGINE_RETRY_AFTER = 10.0
KEEPALIVE_EXPIRY = 2.0
"""Seconds an idle connection to the engine is kept: below the engines' own idle timeouts
(5 s: uvicorn's in vLLM, cpp-httplib's in llama.cpp), so that the gateway closes an idle
connection before the engine does, and does not send on one the engine is closing."""


def create_client(settings: GatewaySettings) -> httpx.AsyncClient:
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=30.0,
        pool=settings.connect_timeout,
    )
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )
    transport: httpx.AsyncBaseTransport | None = None
    if settings.upstream_transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport(limits=limits, trust_env=False)
    # trust_env=False: the engine is on loopback; a proxy from the environment would break it.
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        transport=transport,
        trust_env=False,
        cookies=_NoCookies(),
    )


class _NoCookies(CookieJar):
    """Engines set no cookies; parsing every response for them cost ~50 us a request."""

    def extract_cookies(self, response: Any, request: Any) -> None:
        return None


@functools.lru_cache(maxsize=64)
def _url(base_url: str, path: str) -> httpx.URL:
    # Parsing the URL is a measurable part of httpx's per-request cost; engines keep theirs.
    return httpx.URL(base_url + path)


def map_transport_error(exc: httpx.HTTPError) -> APIError:
    if never_connected(exc):
        return EngineUnavailable(
            "The engine is not reachable right now; retry shortly.",
            retry_after=ENGINE_RETRY_AFTER,
        )
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout("The engine did not answer in time.")
    # httpx-aiohttp calls every broken aiohttp connection a ConnectTimeout: not a timeout.
    return UpstreamError(f"The engine's connection failed: {type(exc).__name__}.")


def engine_error(
    status: int, raw: bytes, request: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    """The engine said no: a client's mistake as a 400 (or the engine's 4xx) naming the
    parameter, anything else as a 502; never the engine's paths or tracebacks.

    A 401 from the engine is about our internal key, not the client's: a 502.
    """
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    message: object = None
    error: dict[str, Any] = {}
    if isinstance(data, dict):
        found = data.get("error")
        if isinstance(found, dict):
            error = found
            message = found.get("message")
        elif isinstance(found, str):
            message = found
        elif isinstance(data.get("detail"), (str, list)):
            message = data["detail"]  # FastAPI-style servers
    text = clean_message(str(message or raw[:300].decode(errors="replace") or f"HTTP {status}"))
    if status >= 500 and any(fault in text for fault in _CLIENT_FAULTS):
        status = 400  # the engine says it is the request; a 5xx would be retried as is
    if 400 <= status < 500 and status != 401:
        param = error.get("param")
        param = param if isinstance(param, str) else _param_in(text, request)
        code = error.get("code")
        body = error_body(
            text, "invalid_request_error", param, code if isinstance(code, str) else None
        )
        # Pydantic-style engines answer 422 where OpenAI answers 400; an engine's 404 is a
        # route or model it does not serve, which the client reached through a route we do.
        return (400 if status in (404, 422) else status), body
    if status >= 500 and _NOT_LOADED in text:  # llama.cpp's router: this model, not all
        body = error_body(
            f"The model is not serving: {text}.", "server_error", None, "engine_unavailable"
        )
        return 503, body
    return 502, error_body(f"The engine failed: {text}", "server_error", None, "upstream_error")


_NOT_LOADED = "failed to load"
"""What llama.cpp's router answers for a model whose server could not start: that model is
unavailable (a 503, like a vLLM engine that is down), the engine itself is fine."""
_PATH = re.compile(r"(?:/[\w.+-]+){2,}")
_CLIENT_FAULTS = ("Failed to parse tool call arguments", "Failed to parse messages")
"""What engines answer with a 500 about a request they could not read."""


def clean_message(message: str) -> str:
    """An engine's message without its tracebacks or file paths, and not too long."""
    message = message.split("Traceback (most recent call last)")[0].strip()
    message = _PATH.sub("<path>", message)
    return message[:500] or "no message"


def _param_in(message: str, request: dict[str, Any] | None) -> str | None:
    """The request's field that the engine's message names (longest names first)."""
    for name in sorted(request or (), key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message):
            return name
    return None


@dataclass(frozen=True)
class EngineCall:
    """One request to send to an engine."""

    path: str
    body: dict[str, Any]
    request_id: str
    stream: bool
    read_timeout: float
    """The longest wait for the engine's headers (a JSON answer's: for all of it)."""


async def open_upstream(
    client: httpx.AsyncClient, lease: Lease, call: EngineCall
) -> httpx.Response:
    """Send the request to the lease's member; return once its status and headers are in.

    A connection that could not be made is `Unreached` (nothing was sent: the pool may try
    another member). A stream's reads carry no timeout here: the relay's idle timer bounds
    its silences; the wait for the headers is bounded by `read_timeout` all the same, and
    ends at once if the pool takes the member out meanwhile.
    """
    base = client.timeout
    timeout = (
        base
        if not call.stream
        else httpx.Timeout(base.connect, read=None, write=base.write, pool=base.pool)
    )
    engine = lease.member
    request = client.build_request(
        "POST",
        _url(engine.base_url, call.path),
        content=json.dumps(call.body).encode(),
        headers={
            "content-type": "application/json",
            "x-request-id": call.request_id,
            **auth_headers(engine.api_key),
        },
        timeout=timeout,
    )
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(call.read_timeout) as deadline:
            lease.on_lost(lambda: deadline.reschedule(loop.time()))
            return await _send(client, request)
    except TimeoutError:
        if lease.lost:
            raise replica_lost() from None
        raise UpstreamTimeout("The engine did not start its answer in time.") from None
    finally:
        lease.on_lost(None)


async def _send(client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    try:
        return await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        if never_connected(exc):
            raise Unreached(map_transport_error(exc)) from exc
        if not closed_before_answering(exc):
            raise map_transport_error(exc) from exc
    # A kept-alive connection the engine closed as we sent: one more try, on a new
    # connection, to the same engine only (it may have been the request that made it
    # close). The client's idle expiry is below the engines' (create_client) to make this
    # rare.
    try:
        return await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise UpstreamError("The engine closed the connection without answering.") from exc


def replica_lost() -> EngineUnavailable:
    return EngineUnavailable(
        "The engine serving this request was taken out of service before it answered; retry.",
        retry_after=1,
    )


def never_connected(exc: httpx.HTTPError) -> bool:
    """Whether no connection to the engine was made, so nothing was sent: refused or no
    answer to connect (httpx-aiohttp calls a refused connection a ConnectTimeout, with
    aiohttp's ClientConnectorError as its cause), or no free connection in our own pool."""
    from aiohttp import ClientConnectorError

    if isinstance(exc, (httpx.ConnectError, httpx.PoolTimeout)):
        return True
    cause = exc.__cause__
    if isinstance(exc, httpx.ConnectTimeout):
        return cause is None or isinstance(cause, ClientConnectorError)
    return False


def closed_before_answering(exc: httpx.HTTPError) -> bool:
    """Whether the engine closed the connection before answering: how a reused keep-alive
    connection fails when the server closed it meanwhile. aiohttp says
    ServerDisconnectedError, or a reset (ClientOSError), which httpx-aiohttp passes on as
    a ConnectTimeout; httpx's own transport, RemoteProtocolError."""
    from aiohttp import ClientOSError, ServerDisconnectedError

    if isinstance(exc.__cause__ or exc.__context__, (ServerDisconnectedError, ClientOSError)):
        return True
    return isinstance(exc, httpx.RemoteProtocolError) and "without sending" in str(exc)
