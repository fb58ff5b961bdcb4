"""How the engine's refusals and transport failures reach a client: the mapping, as a table."""

from __future__ import annotations

import json

import httpx
import pytest

from lowvram.gateway.errors import APIError
from lowvram.gateway.upstream import engine_error, map_transport_error, open_upstream

ENGINE_SAID = json.dumps(
    {"error": {"message": "bad top_k", "type": "BadRequestError", "param": "top_k", "code": 400}}
).encode()


@pytest.mark.parametrize(
    ("status", "raw", "expected_status", "expected_type", "message_has"),
    [
        # A client error the engine explains in OpenAI's shape keeps its words; 422 is 400.
        (400, ENGINE_SAID, 400, "invalid_request_error", "bad top_k"),
        (422, ENGINE_SAID, 400, "invalid_request_error", "bad top_k"),
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


def test_an_engine_validation_error_names_the_parameter_it_mentions() -> None:
    raw = json.dumps(
        {
            "error": {
                "message": "1 validation error for ChatCompletionRequest\nlogit_bias\n  Input "
                "should be a valid dictionary",
                "type": "BadRequestError",
                "param": None,
                "code": 400,
            }
        }
    ).encode()
    request = {"model": "m", "messages": [], "logit_bias": 3, "bias": 1}
    status, body = engine_error(400, raw, request)
    assert status == 400 and body["error"]["param"] == "logit_bias"


def test_engine_internals_never_reach_the_client() -> None:
    raw = (
        b'{"error": {"message": "failed to open /root/.local/share/lowvram/models/m.gguf\n'
        b'Traceback (most recent call last):\n  File \\"/usr/lib/x.py\\""}}'
    )
    for status in (400, 500):
        _, body = engine_error(status, raw)
        message = body["error"]["message"]
        assert "/root" not in message and "Traceback" not in message and "<path>" in message


# --- a kept-alive connection the engine closed ----------------------------------------------


class Engine:
    """A TEST DOUBLE of an engine handle: where the request goes."""

    base_url = "http://engine.test"
    api_key = None


def closing_once(first: Exception) -> tuple[httpx.AsyncClient, list[int]]:
    """A client whose first send fails with `first`, as a closed keep-alive connection does."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise first
        return httpx.Response(200, json={"ok": True})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), calls


def disconnected_as_aiohttp_says_it() -> Exception:
    from aiohttp import ServerDisconnectedError

    error = httpx.ConnectTimeout("Server disconnected")  # what httpx-aiohttp raises
    error.__cause__ = ServerDisconnectedError()
    return error


@pytest.mark.anyio
@pytest.mark.parametrize(
    "first",
    [
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
        disconnected_as_aiohttp_says_it(),
    ],
)
async def test_a_closed_keep_alive_connection_is_retried_once(first: Exception) -> None:
    client, calls = closing_once(first)
    async with client:
        response = await open_upstream(
            client, Engine(), "/v1/chat/completions", {}, "req-1", stream=True, read_timeout=5
        )
    assert response.status_code == 200 and len(calls) == 2


@pytest.mark.anyio
async def test_a_refused_connection_is_not_retried_here() -> None:
    client, calls = closing_once(httpx.ConnectError("refused"))
    async with client:
        with pytest.raises(APIError) as raised:
            await open_upstream(
                client, Engine(), "/v1/chat/completions", {}, "req-1", stream=False, read_timeout=5
            )
    assert raised.value.status_code == 503 and len(calls) == 1  # the pool tries another replica
