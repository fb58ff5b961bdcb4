"""End to end: Ollama's API on `lowvram serve` with llama.cpp's server and the real 0.5B
model, asked by the official `ollama` Python client and by the seed article's curl.

The server runs keyless on loopback (GATEWAY_ALLOW_NO_KEY), as a private machine would;
a key is still accepted. What a 0.5B model writes varies: asserted are the shapes, the
grammar-constrained JSON, and what the gateway adds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from tests.helpers import WEATHER_TOOL, ServeProcess, lowvram_serve

pytestmark = [pytest.mark.e2e]

KEY = "e2e-ollama-key-0001"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_ALLOW_NO_KEY": "true",
        "ENGINE_BACKEND": "llamacpp",
        "ENGINE_CONTEXT": "2048",
    }
    with lowvram_serve(tmp_path_factory.mktemp("ollama"), env, ready_timeout=1800) as process:
        yield process


@pytest.fixture
def client(served: ServeProcess) -> Iterator[ollama.Client]:
    sdk = ollama.Client(host=served.url, timeout=120)  # no key: Ollama's clients send none
    yield sdk
    sdk.close()


def test_chat_not_streamed_and_streamed(client: ollama.Client) -> None:
    question = [{"role": "user", "content": "What is the capital of France? One word."}]
    reply = client.chat(
        model="qwen2.5-coder:0.5b",  # an Ollama name for the served model
        messages=question,
        stream=False,
        options={"temperature": 0, "num_predict": 8},
    )
    assert "Paris" in (reply.message.content or "")
    assert reply.done and reply.prompt_eval_count and reply.eval_count
    parts = list(
        client.chat(
            model="default",
            messages=question,
            stream=True,
            options={"temperature": 0, "num_predict": 8},
        )
    )
    assert "Paris" in "".join(p.message.content or "" for p in parts)
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")


def test_generate(client: ollama.Client) -> None:
    answer = client.generate(
        model="default",
        prompt="Complete: the capital of France is",
        system="Answer in one word.",
        options={"temperature": 0, "num_predict": 8},
    )
    assert answer.done and answer.response.strip()


def test_list_and_show(client: ollama.Client) -> None:
    models = client.list().models
    assert models and models[0].details is not None
    assert models[0].details.format == "gguf" and models[0].details.quantization_level == "Q4_K_M"
    assert models[0].size and models[0].size > 400_000_000
    shown = client.show(models[0].model or "")
    assert shown.modelinfo and any(k.endswith(".context_length") for k in shown.modelinfo)


def test_a_format_schema_is_held_by_the_grammar(client: ollama.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
    }
    reply = client.chat(
        model="default",
        messages=[{"role": "user", "content": "Name a city in France and its country as JSON."}],
        format=schema,
        stream=False,
        options={"temperature": 0, "num_predict": 80},
    )
    data = json.loads(reply.message.content or "")
    assert set(data) >= {"city", "country"}


def test_a_tool_request_is_served_and_any_call_has_object_arguments(
    client: ollama.Client,
) -> None:
    reply = client.chat(
        model="default",
        messages=[{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
        tools=[WEATHER_TOOL],
        stream=False,
        options={"temperature": 0, "num_predict": 96},
    )
    assert reply.done and reply.message.role == "assistant"
    for call in reply.message.tool_calls or ():  # the 0.5B model may answer in text instead
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)


def test_the_seed_articles_curl(served: ServeProcess) -> None:
    body = {"prompt": "What is the capital of France?", "temperature": 0.7, "max_tokens": 200}
    answer = httpx.post(served.url + "/api/chat", json=body, timeout=120)
    assert answer.status_code == 200 and set(answer.json()) == {"response"}
    assert answer.json()["response"].strip()


def test_a_key_still_works_and_metrics_still_need_the_admin_key(served: ServeProcess) -> None:
    keyed = httpx.get(served.url + "/api/tags", headers={"Authorization": f"Bearer {KEY}"})
    assert keyed.status_code == 200
    assert httpx.get(served.url + "/metrics").status_code == 401


def test_keyless_on_an_open_address_is_refused_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lowvram", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={
            "PATH": "",
            "HOME": str(tmp_path),
            "GATEWAY_ALLOW_NO_KEY": "true",
            "GATEWAY_HOST": "0.0.0.0",
        },
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "GATEWAY_ALLOW_NO_KEY_ON_NETWORK" in result.stderr
