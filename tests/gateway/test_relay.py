"""SSE relay: chunk by chunk, keep-alives, usage, disconnects and failures on either side."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import assert_openai_error, wait_for

Fake = tuple[FakeUpstream, str]
HELLO = [{"role": "user", "content": "hello there"}]


def stream(gateway: str, auth: dict[str, str], **fields: Any) -> httpx.Response:
    body = {"messages": HELLO, "stream": True} | fields
    return httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth, timeout=30)


def events(lines: Iterator[str]) -> Iterator[str]:
    """SSE lines that carry something: data and comments, not the blank separators."""
    return (line for line in lines if line)


def data_of(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


def test_each_chunk_is_relayed_as_it_arrives(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    body = {"messages": HELLO, "stream": True, "fake": {"tokens": 6, "delay": 0.3}}
    with httpx.stream(
        "POST", gateway + "/v1/chat/completions", json=body, headers=auth, timeout=30
    ) as response:
        lines = events(response.iter_lines())
        first = json.loads(next(lines)[6:])
        record = fake[0].last()
        # The engine is still generating while the client already holds its first token.
        assert first["choices"][0]["delta"]["content"] == "w0"
        assert not record.finished and record.chunks_sent < 6
        rest = list(lines)
    assert rest[-1] == "data: [DONE]"
    assert len(rest) == 6  # w1..w5 and [DONE]: one event per engine chunk, none merged


def test_keepalive_comments_flow_while_the_engine_is_silent(
    make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = make_gateway(keepalive_seconds=0.2)
    response = stream(gateway, auth, fake={"tokens": 1, "ttft": 1.5})
    lines = list(events(iter(response.text.splitlines())))
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data:"))
    assert first_data >= 3 and all(line.startswith(":") for line in lines[:first_data])
    assert lines[-1] == "data: [DONE]"


def test_usage_is_requested_upstream_and_stripped_when_not_asked(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    response = stream(gateway, auth, fake={"tokens": 3})
    assert fake[0].last().body["stream_options"] == {"include_usage": True}
    chunks = [json.loads(d) for d in data_of(response)[:-1]]
    assert len(chunks) == 3 and all("usage" not in c for c in chunks)


def test_usage_chunk_reaches_clients_that_ask(gateway: str, auth: dict[str, str]) -> None:
    response = stream(gateway, auth, fake={"tokens": 3}, stream_options={"include_usage": True})
    usage = json.loads(data_of(response)[-2])["usage"]
    assert usage == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_usage_is_counted_for_engines_that_do_not_report_it(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    fake[0].stream_usage = False  # ignores include_usage
    gateway = make_gateway()
    response = stream(gateway, auth, fake={"tokens": 4}, stream_options={"include_usage": True})
    last = json.loads(data_of(response)[-2])
    assert last["choices"] == [] and last["id"] == "chatcmpl-fake"
    # The prompt is counted by the engine's tokenizer ("hello there": 2 words + 3 for the
    # message, to the fake), the completion a token per chunk (4 chunks).
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}


def test_client_disconnect_mid_stream_aborts_the_engine_request(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    body = {"messages": HELLO, "stream": True, "fake": {"tokens": 200, "delay": 0.05}}
    with httpx.stream(
        "POST", gateway + "/v1/chat/completions", json=body, headers=auth, timeout=30
    ) as response:
        next(events(response.iter_lines()))
    record = fake[0].last()
    wait_for(lambda: record.aborted, 10, "the engine to see the gateway hang up")
    assert record.chunks_sent < 200 and not record.finished


def test_client_disconnect_while_waiting_for_a_json_answer_aborts_too(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    body = {"messages": HELLO, "fake": {"tokens": 1, "ttft": 30}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth, timeout=0.5)
    record = fake[0].last()
    wait_for(lambda: record.aborted, 10, "the engine to see the gateway hang up")


def test_engine_error_mid_stream_reaches_the_client_as_an_sse_error(
    gateway: str, auth: dict[str, str]
) -> None:
    response = stream(gateway, auth, fake={"tokens": 5, "error_after": 2})
    data = data_of(response)
    error = json.loads(data[-2])["error"]
    assert error["message"] == "The engine failed: scripted failure"
    assert (error["type"], error["code"]) == ("server_error", "upstream_error")
    assert data[-1] == "[DONE]" and len(data) == 4


def test_engine_crash_mid_stream_becomes_an_sse_error_then_done(
    gateway: str, auth: dict[str, str]
) -> None:
    response = stream(gateway, auth, fake={"tokens": 5, "drop_after": 2, "delay": 0.05})
    assert response.status_code == 200
    data = data_of(response)
    error = json.loads(data[-2])["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "server_error"
    assert data[-1] == "[DONE]" and len(data) == 4


@pytest.mark.parametrize(("engine_status", "client_status"), [(400, 400), (500, 502), (503, 502)])
def test_engine_refusal_before_the_stream_is_an_http_error(
    gateway: str, auth: dict[str, str], engine_status: int, client_status: int
) -> None:
    for streamed in (True, False):
        response = httpx.post(
            gateway + "/v1/chat/completions",
            json={"messages": HELLO, "stream": streamed, "fake": {"status": engine_status}},
            headers=auth,
        )
        error = assert_openai_error(response, client_status)
        assert "scripted" in error["message"]


def test_engine_that_hangs_gets_504(make_gateway: GatewayFactory, auth: dict[str, str]) -> None:
    gateway = make_gateway(read_timeout=0.5)
    body = {"messages": HELLO, "fake": {"hang": True}}
    response = httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth, timeout=10)
    assert_openai_error(response, 504, "upstream_timeout")


def test_request_id_is_accepted_generated_echoed_and_forwarded(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    body = {"messages": HELLO}
    given = httpx.post(
        gateway + "/v1/chat/completions", json=body, headers=auth | {"x-request-id": "abc-123"}
    )
    assert given.headers["x-request-id"] == "abc-123"
    assert fake[0].last().headers["x-request-id"] == "abc-123"
    made = httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth)
    assert len(made.headers["x-request-id"]) == 32
    unsafe = httpx.post(
        gateway + "/v1/chat/completions", json=body, headers=auth | {"x-request-id": "a b\tc"}
    )
    assert unsafe.headers["x-request-id"] != "a b\tc"


def test_completions_stream_too(gateway: str, auth: dict[str, str]) -> None:
    body = {"prompt": "one two", "stream": True, "fake": {"tokens": 3}}
    response = httpx.post(gateway + "/v1/completions", json=body, headers=auth)
    data = data_of(response)
    assert [json.loads(d)["choices"][0]["text"] for d in data[:-1]] == ["w0", " w1", " w2"]
    assert data[-1] == "[DONE]"


def test_embeddings_and_tokenize_pass_through(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    embedded = httpx.post(gateway + "/v1/embeddings", json={"input": "hi"}, headers=auth)
    assert embedded.json()["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    counted = httpx.post(gateway + "/tokenize", json={"prompt": "a b c"}, headers=auth)
    assert counted.json()["count"] == 3
    assert fake[0].last("/tokenize").body["model"] == "fake-model"


def test_an_engine_silent_mid_stream_is_cut_with_a_timeout_event(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    gateway = make_gateway(read_timeout=0.5)
    response = stream(gateway, auth, fake={"tokens": 3, "delay": 3})
    data = data_of(response)
    assert json.loads(data[0])["choices"][0]["delta"]["content"] == "w0"
    assert json.loads(data[-2])["error"]["code"] == "upstream_timeout"
    assert data[-1] == "[DONE]"
    record = fake[0].last()
    wait_for(lambda: record.aborted, 10, "the engine to see the gateway hang up")


def test_an_engine_gone_before_the_request_gets_503(auth: dict[str, str], tmp_path: Path) -> None:
    from contextlib import ExitStack

    from lowvram.gateway.app import create_app
    from tests.conftest import UPSTREAM_KEY, external, gateway_settings
    from tests.helpers import serve, wait_ready

    with ExitStack() as gateway_stack:
        with ExitStack() as upstream_stack:
            upstream = upstream_stack.enter_context(serve(FakeUpstream(api_key=UPSTREAM_KEY).app()))
            settings = gateway_settings(tmp_path / "g.sqlite3")
            app = create_app(settings, external(upstream, settings))
            gateway = gateway_stack.enter_context(serve(app))
            wait_ready(gateway)
        # The engine is gone; the gateway may not have noticed yet. Either way: 503.
        response = stream(gateway, auth)
        assert_openai_error(response, 503, "engine_unavailable")
        assert int(response.headers["Retry-After"]) >= 1


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_arrives_under_both_names_streamed_or_not(
    gateway: str, auth: dict[str, str], field: str
) -> None:
    """vLLM writes `reasoning`, llama.cpp `reasoning_content`: clients read either."""
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
    body["fake"] = {"think": field, "tokens": 3}
    answer = httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth).json()
    message = answer["choices"][0]["message"]
    assert message["reasoning"] == message["reasoning_content"] == "let me think"
    assert message["content"] == "w0 w1 w2"
    streamed = httpx.post(
        gateway + "/v1/chat/completions", json=body | {"stream": True}, headers=auth
    )
    deltas = [
        json.loads(line[6:])["choices"][0]["delta"]
        for line in streamed.text.splitlines()
        if line.startswith("data: {")
    ]
    thinking = [d for d in deltas if d.get("reasoning") or d.get("reasoning_content")]
    assert len(thinking) == 3 and all(d["reasoning"] == d["reasoning_content"] for d in thinking)
    assert "".join(d["reasoning"] for d in thinking) == "let me think "
    assert "".join(d.get("content") or "" for d in deltas) == "w0 w1 w2"
    assert not any("reasoning" in d for d in deltas if d.get("content"))  # untouched
