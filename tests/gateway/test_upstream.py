"""How the engine's refusals and transport failures reach a client: the mapping, as a table."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lowvram.engine.handle import EngineState, StateMixin
from lowvram.engine.replicas import Lease, Unreached, as_replicas
from lowvram.gateway.errors import APIError
from lowvram.gateway.upstream import EngineCall, engine_error, map_transport_error, open_upstream

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
        # llama.cpp's 500 about a history it cannot read is the client's: a 400, no retry.
        (
            500,
            b'{"error": {"code": 500, "message": "Failed to parse tool call arguments as JSON:'
            b' [json.exception.parse_error.101]", "type": "server_error"}}',
            400,
            "invalid_request_error",
            "Failed to parse tool call arguments",
        ),
        # llama.cpp's router: one model's server could not start; that model is down.
        (
            500,
            b'{"error": {"code": 500, "message": "model name=coder failed to load"}}',
            503,
            "server_error",
            "The model is not serving: model name=coder failed to load",
        ),
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


def lease() -> Lease:
    picked = as_replicas(Engine()).pick()
    assert picked is not None
    return picked


def call(*, stream: bool) -> EngineCall:
    return EngineCall("/v1/chat/completions", {}, "req-1", stream, read_timeout=5)


def refused_as_aiohttp_says_it() -> Exception:
    from aiohttp import ClientConnectorError
    from aiohttp.client_reqrep import ConnectionKey

    key = ConnectionKey("engine.test", 80, False, True, None, None, None)
    error = httpx.ConnectTimeout("Cannot connect")  # what httpx-aiohttp raises
    error.__cause__ = ClientConnectorError(key, ConnectionRefusedError(111, "refused"))
    return error


def disconnected_as_aiohttp_says_it() -> Exception:
    from aiohttp import ServerDisconnectedError

    error = httpx.ConnectTimeout("Server disconnected")  # what httpx-aiohttp raises
    error.__cause__ = ServerDisconnectedError()
    return error


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (httpx.ConnectError("refused"), 503, "engine_unavailable"),
        (httpx.ConnectTimeout("slow"), 503, "engine_unavailable"),
        (httpx.PoolTimeout("full"), 503, "engine_unavailable"),
        (httpx.ReadTimeout("silent"), 504, "upstream_timeout"),
        (disconnected_as_aiohttp_says_it(), 502, "upstream_error"),  # not a timeout at all
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


class Engine(StateMixin):
    """A TEST DOUBLE of an engine handle: where the request goes."""

    base_url = "http://engine.test"
    api_key = None
    model = None

    def __init__(self) -> None:
        super().__init__()
        self._set_state(EngineState.READY)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


def closing_once(first: Exception) -> tuple[httpx.AsyncClient, list[int]]:
    """A client whose first send fails with `first`, as a closed keep-alive connection does."""
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            raise first
        return httpx.Response(200, json={"ok": True})

    return httpx.AsyncClient(transport=httpx.MockTransport(handler)), calls


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
        response = await open_upstream(client, lease(), call(stream=True))
    assert response.status_code == 200 and len(calls) == 2


@pytest.mark.anyio
async def test_a_connection_closed_twice_is_a_502_never_sent_elsewhere() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise disconnected_as_aiohttp_says_it()

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(APIError) as raised:
            await open_upstream(client, lease(), call(stream=False))
    assert raised.value.status_code == 502 and len(calls) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("refusal", [httpx.ConnectError("refused"), refused_as_aiohttp_says_it()])
async def test_a_refused_connection_is_unreached_for_the_pool(refusal: Exception) -> None:
    client, calls = closing_once(refusal)
    async with client:
        with pytest.raises(Unreached) as raised:
            await open_upstream(client, lease(), call(stream=False))
    assert isinstance(raised.value.cause, APIError)
    assert raised.value.cause.status_code == 503 and len(calls) == 1  # the pool tries another


@pytest.mark.anyio
async def test_a_wait_for_headers_ends_at_once_when_the_engine_is_taken_out() -> None:
    started = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        await asyncio.sleep(60)
        return httpx.Response(200)

    held = lease()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        opening = asyncio.ensure_future(open_upstream(client, held, call(stream=True)))
        await started.wait()
        held._lose()
        with pytest.raises(APIError) as raised:
            await asyncio.wait_for(opening, 5)
    assert raised.value.status_code == 503 and raised.value.retry_after
