"""Every error the gateway returns, and the one place that renders them as OpenAI JSON.

    APIError                      status  type
    ├── ClientError               4xx     invalid_request_error
    │   ├── BadRequest            400
    │   ├── AuthenticationError   401
    │   ├── NotFound              404     (ModelNotFound: code model_not_found)
    │   ├── RequestTimeout        408     (the body did not arrive in time)
    │   ├── PayloadTooLarge       413
    │   ├── RateLimited           429     rate_limit_error, with Retry-After
    │   └── ClientClosed          499     (logged; the client is gone)
    └── ServerError               5xx     server_error
        ├── UpstreamError         502
        ├── EngineUnavailable     503     with Retry-After
        ├── GatewayShuttingDown   503     (a stream cut when the drain time ran out)
        └── UpstreamTimeout       504

Clients (the OpenAI SDK, LangChain) pick their exception class from the status code and
show `error.message`, so both must be right; `param` names the offending field. On
Ollama's routes (`/api/...`) the same errors take Ollama's shape, `{"error": message}`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

logger = logging.getLogger(__name__)


class APIError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class ClientError(APIError):
    status_code = 400
    error_type = "invalid_request_error"


class BadRequest(ClientError):
    status_code = 400


class AuthenticationError(ClientError):
    status_code = 401
    default_code = "invalid_api_key"


class NotFound(ClientError):
    status_code = 404


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class RequestTimeout(ClientError):
    status_code = 408
    default_code = "request_timeout"


class PayloadTooLarge(ClientError):
    status_code = 413
    default_code = "request_too_large"


class RateLimited(ClientError):
    status_code = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class ClientClosed(ClientError):
    """The client hung up before its answer; nginx's 499, never seen by anyone."""

    status_code = 499
    default_code = "client_closed_request"


class ServerError(APIError):
    status_code = 500


class UpstreamError(ServerError):
    status_code = 502
    default_code = "upstream_error"


class EngineUnavailable(ServerError):
    status_code = 503
    default_code = "engine_unavailable"


class GatewayShuttingDown(ServerError):
    status_code = 503
    default_code = "gateway_shutting_down"


class UpstreamTimeout(ServerError):
    status_code = 504
    default_code = "upstream_timeout"


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def sse_error_event(error: APIError) -> bytes:
    """The SSE event that carries an error once a stream has started (status is sent)."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n"


def param_from_loc(loc: tuple[int | str, ...]) -> str:
    """('messages', 0, 'role') -> 'messages.[0].role', the form OpenAI uses."""
    parts = [f"[{p}]" if isinstance(p, int) else str(p) for p in loc if p != "body"]
    return ".".join(parts)


def _status_error_type(status: int) -> str:
    return "invalid_request_error" if status < 500 else "server_error"


def _render(
    request: Request, body: dict[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """OpenAI's error object, or Ollama's on its routes."""
    if request.url.path.startswith("/api/"):
        body = {"error": body["error"]["message"]}
    return JSONResponse(body, status_code=status, headers=headers)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return _render(request, exc.body(), exc.status_code, exc.headers())


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    param = param_from_loc(tuple(first.get("loc", ())))
    body = error_body(
        f"Invalid value for '{param}': {first['msg']}", "invalid_request_error", param
    )
    return _render(request, body, 400)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    body = error_body(str(exc.detail), _status_error_type(exc.status_code), None, code)
    return _render(request, body, exc.status_code, exc.headers)


async def _client_gone(request: Request, exc: Exception) -> JSONResponse:
    """The client hung up while its body was read: no one gets this answer."""
    return _render(request, ClientClosed("The client closed the request.").body(), 499)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    body = error_body("The gateway failed to handle this request.", "server_error", None, None)
    return _render(request, body, 500)


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(Exception, _unhandled)
