"""How the engine's refusals and transport failures reach a client: the mapping, as a table."""

from __future__ import annotations

import json

import httpx
import pytest

from lowvram.gateway.upstream import engine_error, map_transport_error

ENGINE_SAID = json.dumps(
    {"error": {"message": "bad top_k", "type": "BadRequestError", "param": "top_k", "code": 400}}
).encode()


@pytest.mark.parametrize(
    ("status", "raw", "expected_status", "expected_type", "message_has"),
    [
        # A client error the engine explains in OpenAI's shape keeps its status and words.
        (400, ENGINE_SAID, 400, "BadRequestError", "bad top_k"),
        (422, ENGINE_SAID, 422, "BadRequestError", "bad top_k"),
        # FastAPI-style {"detail": ...} and plain text become a 400 with the engine's words.
        (
            422,
            b'{"detail": "max_tokens must be positive"}',
            400,
            "invalid_request_error",
            "max_tokens must be positive",
        ),
        (400, b"prompt too long", 400, "invalid_request_error", "prompt too long"),
        (404, b"", 400, "invalid_request_error", "HTTP 404"),
        # The engine's 401 is about our internal key, never the client's.
        (401, ENGINE_SAID, 502, "server_error", "bad top_k"),
        # Server errors are the engine's failure: 502, however they are written.
        (500, ENGINE_SAID, 502, "server_error", "The engine failed"),
        (503, b"<html>busy</html>", 502, "server_error", "The engine failed"),
    ],
)
def test_engine_refusals(
    status: int,
    raw: bytes,
    expected_status: int,
    expected_type: str,
    message_has: str,
) -> None:
    mapped, body = engine_error(status, raw)
    assert mapped == expected_status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == expected_type and message_has in body["error"]["message"]


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (httpx.ConnectError("refused"), 503, "engine_unavailable"),
        (httpx.ConnectTimeout("slow"), 503, "engine_unavailable"),
        (httpx.PoolTimeout("full"), 503, "engine_unavailable"),
        (httpx.ReadTimeout("silent"), 504, "upstream_timeout"),
        (httpx.RemoteProtocolError("cut"), 502, "upstream_error"),
        (httpx.ReadError("reset"), 502, "upstream_error"),
    ],
)
def test_transport_failures(error: httpx.HTTPError, status: int, code: str) -> None:
    mapped = map_transport_error(error)
    assert (mapped.status_code, mapped.code) == (status, code)
