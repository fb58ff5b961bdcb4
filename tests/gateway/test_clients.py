"""The real OpenAI SDK and LangChain clients through the gateway (fake upstream behind it)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.conftest import CLIENT_KEY
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import wait_for

pytestmark = pytest.mark.anyio
Fake = tuple[FakeUpstream, str]
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def sdk(gateway: str) -> Iterator[Callable[..., openai.OpenAI]]:
    """Make SDK clients for the gateway; each is closed after the test."""
    clients: list[openai.OpenAI] = []

    def make(key: str = CLIENT_KEY) -> openai.OpenAI:
        clients.append(openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0))
        return clients[-1]

    yield make
    for client in clients:
        client.close()


def test_sdk_non_streaming(sdk: Callable[..., openai.OpenAI]) -> None:
    completion = sdk().chat.completions.create(
        model="fake-model", messages=HELLO, extra_body={"fake": {"tokens": 3}}
    )
    assert completion.choices[0].message.content == "w0 w1 w2"
    assert completion.usage is not None and completion.usage.completion_tokens == 3


def test_sdk_streaming_with_usage(sdk: Callable[..., openai.OpenAI]) -> None:
    chunks = list(
        sdk().chat.completions.create(
            model="fake-model",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"fake": {"tokens": 4}},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "w0 w1 w2 w3"
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (5, 4)


async def test_sdk_async_streaming(gateway: str) -> None:
    client = openai.AsyncOpenAI(base_url=gateway + "/v1", api_key=CLIENT_KEY, max_retries=0)
    stream = await client.chat.completions.create(
        model="fake-model", messages=HELLO, stream=True, extra_body={"fake": {"tokens": 2}}
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices]
    assert "".join(p or "" for p in pieces) == "w0 w1"
    await client.close()


def test_sdk_completions_and_models(sdk: Callable[..., openai.OpenAI]) -> None:
    client = sdk()
    assert (
        client.completions.create(model="fake-model", prompt="a b", max_tokens=2).choices[0].text
        == "w0 w1"
    )
    assert [m.id for m in client.models.list()] == ["fake-model"]


def test_sdk_sees_errors_as_its_own_exception_classes(sdk: Callable[..., openai.OpenAI]) -> None:
    with pytest.raises(openai.AuthenticationError):
        sdk(key="wrong-key-42").models.list()
    with pytest.raises(openai.NotFoundError) as missing:
        sdk().chat.completions.create(model="gpt-9", messages=HELLO)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk().chat.completions.create(model="fake-model", messages=HELLO, temperature=9)
    assert bad.value.param == "temperature"


def test_sdk_raises_on_an_error_mid_stream(sdk: Callable[..., openai.OpenAI]) -> None:
    stream = sdk().chat.completions.create(
        model="fake-model",
        messages=HELLO,
        stream=True,
        extra_body={"fake": {"tokens": 5, "drop_after": 2, "delay": 0.05}},
    )
    received = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            received.append(chunk)
    assert len(received) == 2


def chat_model(gateway: str, **kwargs: object) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=gateway + "/v1", api_key=CLIENT_KEY, model="fake-model", max_retries=0, **kwargs
    )


def test_langchain_invoke_and_stream(gateway: str) -> None:
    llm = chat_model(gateway, extra_body={"fake": {"tokens": 3}})
    assert llm.invoke("hello there").content == "w0 w1 w2"
    assert "".join(str(c.content) for c in llm.stream("hello there")) == "w0 w1 w2"


def test_langchain_stream_usage(gateway: str) -> None:
    llm = chat_model(gateway, stream_usage=True, extra_body={"fake": {"tokens": 3}})
    total = None
    for chunk in llm.stream("hello there"):
        total = chunk if total is None else total + chunk
    assert total is not None and total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] == 3


def test_langchain_tool_calls(gateway: str) -> None:
    def get_weather(city: str) -> str:
        """Weather in a city."""
        return "sunny"

    llm = chat_model(gateway).bind_tools([get_weather], parallel_tool_calls=False)
    message = llm.invoke("weather in Paris?")
    assert message.tool_calls[0]["name"] == "get_weather"
    assert message.tool_calls[0]["args"] == {"city": "Paris"}


def test_langchain_structured_output(gateway: str) -> None:
    class Answer(BaseModel):
        city: str
        population: int

    structured = chat_model(gateway).with_structured_output(Answer, method="function_calling")
    assert structured.invoke("biggest city?") == Answer(city="Paris", population=42)


def test_sdk_responses_plain_and_streaming_are_accounted(
    sdk: Callable[..., openai.OpenAI], fake: Fake, tmp_path: Path
) -> None:
    client = sdk()
    response = client.responses.create(
        model="default", input="hello there", extra_body={"fake": {"tokens": 3}}
    )
    assert response.output_text == "w0 w1 w2"
    assert response.usage is not None and response.usage.output_tokens == 3
    sent = fake[0].last("/v1/chat/completions").body  # served by the engine's chat completions
    assert sent["max_tokens"] == 1024 and sent["messages"][-1]["content"] == "hello there"
    events = list(
        client.responses.create(
            model="default", input="hello there", stream=True, extra_body={"fake": {"tokens": 4}}
        )
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "w0 w1 w2 w3" and events[-1].type == "response.completed"
    rows = wait_for_usage(tmp_path / "gateway.sqlite3", 2)
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("responses", 5, 3, 200),  # the fake counts 3 tokens a message, and the words
        ("responses", 5, 4, 200),
    ]


def test_sdk_responses_stream_cut_by_the_engine_raises(
    sdk: Callable[..., openai.OpenAI],
) -> None:
    with pytest.raises(openai.APIError, match="The engine"):
        list(
            sdk().responses.create(
                model="default",
                input="hello",
                stream=True,
                extra_body={"fake": {"tokens": 5, "drop_after": 2}},
            )
        )


def test_sdk_retrieves_the_default_model(sdk: Callable[..., openai.OpenAI]) -> None:
    client = sdk()
    assert client.models.retrieve("default").id == "default"
    assert client.models.retrieve("fake-model").id == "fake-model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nope")


def wait_for_usage(db: Path, n: int) -> list[tuple[object, ...]]:
    """The usage rows, once the background writer has written n of them."""
    rows: list[tuple[object, ...]] = []

    def written() -> bool:
        nonlocal rows
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT endpoint, prompt_tokens, completion_tokens, status FROM usage ORDER BY id"
            ).fetchall()
        return len(rows) >= n

    wait_for(written, 10, f"{n} usage rows")
    return rows
