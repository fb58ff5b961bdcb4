"""Ollama's API on the gateway, asked by the official `ollama` client; the engine is the
fake upstream (a test double): what it is sent, and what the client gets back."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.conftest import ADMIN_KEY, CLIENT_KEY, GatewayFactory
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import wait_for

Fake = tuple[FakeUpstream, str]
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture
def client(gateway: str) -> Iterator[ollama.Client]:
    sdk = ollama.Client(host=gateway, headers=AUTH)
    yield sdk
    sdk.close()


def test_chat_answers_with_ollamas_fields_and_counts(client: ollama.Client, fake: Fake) -> None:
    reply = client.chat(
        model="fake-model:latest",  # an Ollama name for the served model
        messages=[{"role": "user", "content": "hello there"}],
        stream=False,
        options={"temperature": 0.3, "num_predict": 3, "seed": 7, "stop": ["x"], "num_ctx": 99},
    )
    assert reply.message.role == "assistant" and reply.message.content == "w0 w1 w2"
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count == 5 and reply.eval_count == 3 and reply.total_duration
    assert reply.model == "fake-model:latest"  # the name asked, as Ollama answers
    sent = fake[0].last().body
    assert (sent["temperature"], sent["max_tokens"], sent["seed"], sent["stop"]) == (
        0.3,
        3,
        7,
        ["x"],
    )
    assert "num_ctx" not in sent and "options" not in sent and sent["model"] == "fake-model"


def test_chat_streams_ndjson_by_default(gateway: str, client: ollama.Client) -> None:
    parts = list(
        client.chat(model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    )
    assert "".join(p.message.content or "" for p in parts) == "w0 w1 w2 w3 w4"
    assert [p.done for p in parts][-1] and not any(p.done for p in parts[:-1])
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 5
    raw = httpx.post(
        gateway + "/api/chat",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        headers=AUTH,
    )  # no "stream": Ollama streams
    assert raw.headers["content-type"].startswith("application/x-ndjson")
    lines = raw.text.splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)


def test_generate_with_a_system_prompt_and_raw(client: ollama.Client, fake: Fake) -> None:
    answer = client.generate(model="fake-model", prompt="Why is the sky blue?", system="Be terse.")
    assert answer.response == "w0 w1 w2 w3 w4" and answer.done
    messages = fake[0].last().body["messages"]
    assert messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Why is the sky blue?"},
    ]
    raw = client.generate(model="fake-model", prompt="<|im_start|>user\nhi", raw=True, stream=False)
    assert raw.response == "w0 w1 w2 w3 w4"
    assert fake[0].last("/v1/completions").body["prompt"] == "<|im_start|>user\nhi"
    streamed = "".join(
        p.response for p in client.generate(model="fake-model", prompt="hi", stream=True)
    )
    assert streamed == "w0 w1 w2 w3 w4"


def test_a_tool_call_comes_whole_with_object_arguments(client: ollama.Client, fake: Fake) -> None:
    for stream in (False, True):
        reply = client.chat(
            model="fake-model",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],
            stream=stream,
        )
        if stream:
            calls = [c for part in reply for c in (part.message.tool_calls or [])]
        else:
            calls = list(reply.message.tool_calls or [])
        assert len(calls) == 1 and calls[0].function.name == "get_weather"
        assert calls[0].function.arguments == {"city": "Paris"}
    # The call and its result sent back: arguments as JSON text, the result matched by order.
    client.chat(
        model="fake-model",
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": "sunny"},
        ],
        stream=False,
    )
    sent = fake[0].last().body["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Paris"}'
    assert sent[2]["tool_call_id"] == sent[1]["tool_calls"][0]["id"]


def test_format_json_and_a_schema_become_response_formats(
    client: ollama.Client, fake: Fake
) -> None:
    client.chat(
        model="fake-model", messages=[{"role": "user", "content": "x"}], format="json", stream=False
    )
    assert fake[0].last().body["response_format"] == {"type": "json_object"}
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    client.chat(
        model="fake-model", messages=[{"role": "user", "content": "x"}], format=schema, stream=False
    )
    assert fake[0].last().body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": schema},
    }


def test_the_model_routes(client: ollama.Client) -> None:
    listed = client.list()
    assert [m.model for m in listed.models] == ["fake-model"]
    shown = client.show("fake-model:latest")
    assert shown.modelinfo is not None and "tools" in (shown.capabilities or [])
    assert client.ps().models[0].model == "fake-model"
    with pytest.raises(ollama.ResponseError) as missing:
        client.show("llama3:70b")
    assert missing.value.status_code == 404 and "not found" in missing.value.error


def test_errors_take_ollamas_shape(gateway: str) -> None:
    keyless = httpx.post(gateway + "/api/chat", json={"model": "fake-model", "messages": []})
    assert keyless.status_code == 401 and isinstance(keyless.json()["error"], str)
    bad = httpx.post(gateway + "/api/generate", json={"model": "fake-model"}, headers=AUTH)
    assert bad.status_code == 400 and "prompt" in bad.json()["error"]
    unknown = httpx.post(
        gateway + "/api/chat",
        json={"model": "mistral:7b", "messages": [{"role": "user", "content": "x"}]},
        headers=AUTH,
    )
    assert unknown.status_code == 404 and isinstance(unknown.json()["error"], str)
    assert httpx.get(gateway + "/api/version", headers=AUTH).json()["version"]
    assert httpx.get(gateway + "/").text == "Ollama is running"


def test_the_seed_articles_api_chat_shape(gateway: str, fake: Fake) -> None:
    """Its curl: {"prompt", "temperature", "max_tokens"} -> {"response": text}."""
    body = {"prompt": "Explain vLLM in one sentence.", "temperature": 0.7, "max_tokens": 200}
    answer = httpx.post(gateway + "/api/chat", json=body, headers=AUTH)
    assert answer.status_code == 200 and answer.json() == {"response": "w0 w1 w2 w3 w4"}
    sent = fake[0].last().body
    assert sent["messages"] == [{"role": "user", "content": "Explain vLLM in one sentence."}]
    assert sent["temperature"] == 0.7 and sent["max_tokens"] == 200


def test_usage_rows_and_limits_are_the_gateways(client: ollama.Client, tmp_path: Path) -> None:
    client.chat(model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=False)
    list(client.generate(model="fake-model", prompt="hi", stream=True))

    def rows() -> list[Any]:
        with sqlite3.connect(tmp_path / "gateway.sqlite3") as db:
            return db.execute("SELECT endpoint, status FROM usage ORDER BY id").fetchall()

    wait_for(lambda: len(rows()) == 2, 5, "two usage rows")
    assert rows() == [("ollama_chat", 200), ("ollama_generate", 200)]


def test_keyless_access_when_the_operator_allows_it(make_gateway: GatewayFactory) -> None:
    gateway = make_gateway(allow_no_key=True)
    for headers in ({}, {"Authorization": "Bearer ollama"}):  # none, or a placeholder
        keyless = ollama.Client(host=gateway, headers=headers)
        reply = keyless.chat(
            model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=False
        )
        keyless.close()
        assert reply.message.content
    metrics = httpx.get(gateway + "/metrics")
    assert metrics.status_code == 401  # the admin key is still needed
    assert (
        httpx.get(
            gateway + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ).status_code
        == 200
    )
