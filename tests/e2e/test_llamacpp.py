"""End to end: `lowvram serve` with llama.cpp's own server (built here) and a real 0.5B model,
asked by the real OpenAI SDK, LangChain, pydantic-ai and curl: the OpenAI surface agents use.

The model is the project's default: from the Hub where it can be reached, else assembled
from PyPI and verified (the CI case), cached in the user's data directory. Answers of a
0.5B model vary; what is asserted is what the engine and the gateway guarantee: grammar-
constrained tool calls and JSON, the shapes clients parse, and clear 400s.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.helpers import WEATHER_TOOL, ServeProcess, lowvram_serve, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.anyio]

KEY = "e2e-client-key-0001"
QUESTION = "What is the capital of France? Answer in one word."
WEATHER = WEATHER_TOOL
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string"}},
            "required": ["zone"],
        },
    },
}


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("e2e")
    env = {"GATEWAY_API_KEYS": KEY, "ENGINE_BACKEND": "llamacpp", "ENGINE_CONTEXT": "4096"}
    with lowvram_serve(tmp, env, ready_timeout=1800) as process:
        yield process


@pytest.fixture(scope="module")
def url(served: ServeProcess) -> str:
    return served.url


@pytest.fixture
def client(url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


def ask(question: str = QUESTION) -> list[dict[str, Any]]:
    return [{"role": "user", "content": question}]


# --- chat, streams, usage ----------------------------------------------------------------


def test_openai_sdk_answers_paris(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default", messages=ask(), max_tokens=16, temperature=0
    )
    assert "Paris" in (completion.choices[0].message.content or "")
    assert completion.usage is not None and completion.usage.prompt_tokens > 10
    assert completion.model == client.models.list().data[0].id  # the alias, not a file path


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


async def test_openai_async_sdk(url: str) -> None:
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0) as sdk:
        completion = await sdk.chat.completions.create(
            model="default", messages=ask(), max_tokens=16, temperature=0
        )
        assert "Paris" in (completion.choices[0].message.content or "")
        stream = await sdk.chat.completions.create(
            model="default", messages=ask(), max_tokens=16, temperature=0, stream=True
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "Paris" in "".join(pieces)


def test_content_part_arrays(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": [{"type": "text", "text": QUESTION}]}],
        max_tokens=16,
        temperature=0,
    )
    assert "Paris" in (completion.choices[0].message.content or "")


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def sample() -> str:
        completion = client.chat.completions.create(
            model="default",
            messages=ask("Write a four-word poem."),
            max_tokens=12,
            temperature=1.0,
            seed=1234,
        )
        return completion.choices[0].message.content or ""

    assert sample() == sample()


def test_n_choices_are_served_up_to_the_engine_limit(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default", messages=ask(), max_tokens=8, temperature=0.8, n=2
    )
    assert [c.index for c in completion.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="default", messages=ask(), max_tokens=8, n=64)
    assert refused.value.body["param"] == "n"  # type: ignore[index]


def test_logprobs(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default", messages=ask(), max_tokens=4, temperature=0, logprobs=True, top_logprobs=2
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    assert all(item.logprob <= 0 and len(item.top_logprobs) == 2 for item in logprobs.content)


# --- tools ---------------------------------------------------------------------------------


def test_tool_choice_required_returns_a_parsed_call(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=ask("What is the weather in Paris?"),
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
    )
    message = completion.choices[0].message
    assert message.tool_calls, message
    call = message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert "city" in json.loads(call.function.arguments)
    assert completion.choices[0].finish_reason == "tool_calls"


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=ask("What is the weather in Paris?"),
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=64,
        temperature=0,
    )
    calls = completion.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_time"}


def test_tool_choice_auto_is_served(client: openai.OpenAI) -> None:
    # Whether a model calls a tool on its own is the model's choice: this 0.5B one answers
    # with bare JSON rather than its template's <tool_call> markup, which llama.cpp's parser
    # (rightly) leaves as text. What the engine owes is to take the request, with tools in
    # the prompt, and answer with a message that is one or the other.
    completion = client.chat.completions.create(
        model="default",
        messages=ask("Use the get_weather tool to get the weather in Paris."),
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=64,
        temperature=0,
    )
    message = completion.choices[0].message
    assert message.tool_calls or message.content
    assert completion.usage is not None and completion.usage.prompt_tokens > 100  # tools too


def test_streamed_tool_call_deltas_assemble_into_a_call(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default",
        messages=ask("What is the weather in Paris?"),
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=64,
        temperature=0,
        stream=True,
    )
    name, arguments = "", ""
    for chunk in stream:
        for delta_call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            name += delta_call.function.name or "" if delta_call.function else ""
            arguments += delta_call.function.arguments or "" if delta_call.function else ""
    assert name == "get_weather" and "city" in json.loads(arguments)


def test_a_tool_result_turn_is_answered(client: openai.OpenAI) -> None:
    messages: list[dict[str, Any]] = [
        *ask("What is the weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees Celsius."},
    ]
    completion = client.chat.completions.create(
        model="default", messages=messages, tools=[WEATHER], max_tokens=32, temperature=0
    )
    assert completion.choices[0].message.content


# --- structured output ---------------------------------------------------------------------


def test_json_schema_strict_holds(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=ask("Name a city in France, as JSON."),
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "strict": True, "schema": City.model_json_schema()},
        },
        max_tokens=64,
        temperature=0,
    )
    City.model_validate_json(completion.choices[0].message.content or "")


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.chat.completions.parse(
        model="default",
        messages=ask("Name a city in France."),
        response_format=City,
        max_tokens=64,
        temperature=0,
    )
    assert isinstance(completion.choices[0].message.parsed, City)


def test_json_object_mode(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=ask("Give a JSON object with a key 'capital' for France."),
        response_format={"type": "json_object"},
        max_tokens=48,
        temperature=0,
    )
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


# --- the Responses API and the rest of the surface -----------------------------------------


def test_responses_plain_and_streaming(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="default", input=QUESTION, max_output_tokens=16, temperature=0
    )
    assert "Paris" in response.output_text
    assert response.usage is not None and response.usage.input_tokens > 10
    events = list(
        client.responses.create(
            model="default", input=QUESTION, max_output_tokens=16, temperature=0, stream=True
        )
    )
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "Paris" in text and events[-1].type == "response.completed"


def test_models_retrieve_default(client: openai.OpenAI) -> None:
    assert client.models.retrieve("default").id == "default"
    (served,) = client.models.list().data
    assert served.id.startswith("qwen2.5") and client.models.retrieve(served.id).id == served.id


def test_an_image_to_a_text_only_model_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="default",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
            max_tokens=8,
        )
    assert refused.value.body["param"] == "messages.[0].content.[1]"  # type: ignore[index]
    assert "text only" in refused.value.message


def test_embeddings_from_a_chat_model_are_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="default", input="hello")
    assert refused.value.code == "model_not_supported"


def test_an_engine_validation_error_is_a_400_naming_the_parameter(url: str) -> None:
    body = {"model": "default", "messages": ask(), "max_tokens": 4, "tool_choice": "sometimes"}
    body["tools"] = [WEATHER]
    response = httpx.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "/" not in error["message"]


# --- other clients -------------------------------------------------------------------------


def llm(url: str, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=url + "/v1",
        api_key=KEY,  # type: ignore[arg-type]
        model="default",
        temperature=0,
        max_retries=0,
        **options,
    )


def test_langchain_invoke_and_stream(url: str) -> None:
    chat = llm(url, max_tokens=16)
    assert "Paris" in str(chat.invoke(QUESTION).content)
    assert "Paris" in "".join(str(chunk.content) for chunk in chat.stream(QUESTION))


def test_langchain_bind_tools_with_tool_choice(url: str) -> None:
    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "sunny"

    chat = llm(url, max_tokens=96).bind_tools(
        [get_weather], tool_choice="get_weather", parallel_tool_calls=False
    )
    message = chat.invoke("What is the weather in Paris?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "get_weather"  # type: ignore[attr-defined]
    assert "city" in message.tool_calls[0]["args"]  # type: ignore[attr-defined]


def test_langchain_with_structured_output(url: str) -> None:
    structured = llm(url, max_tokens=64).with_structured_output(City)
    city = structured.invoke("Name a city in France.")
    assert isinstance(city, City)


async def test_pydantic_ai_output_type_and_text(url: str) -> None:
    import httpx2  # pydantic-ai's own HTTP client
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    async with httpx2.AsyncClient(timeout=120) as http:
        provider = OpenAIProvider(base_url=url + "/v1", api_key=KEY, http_client=http)
        model = OpenAIChatModel("default", provider=provider)
        settings: Any = {"temperature": 0, "max_tokens": 128, "parallel_tool_calls": False}
        # output_type is a required call of pydantic-ai's own `final_result` tool.
        agent = Agent(model, output_type=City, model_settings=settings)
        result = await agent.run("Name a city in France.")
        assert isinstance(result.output, City)
        assert result.usage.input_tokens > 0
        text = await Agent(model, model_settings=settings).run(QUESTION)
        assert "Paris" in text.output


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_with_a_wrong_key_gets_401(url: str) -> None:
    result = subprocess.run(
        [
            *("curl", "-s", "-w", "\n%{http_code}", url + "/v1/chat/completions"),
            *("-H", "Authorization: Bearer not-the-key", "-H", "content-type: application/json"),
            *("-d", json.dumps({"model": "default", "messages": ask()})),
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
    served: ServeProcess, client: openai.OpenAI
) -> None:
    stopped = re.compile(r"stop processing: n_tokens = (\d+)")
    before = len(stopped.findall(served.engine_output()))
    body = {
        "model": "default",
        "messages": ask("Count from 1 to 1000."),
        "max_tokens": 500,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", served.url + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as response:
        data = (line for line in response.iter_lines() if line.startswith("data: {"))
        for _ in range(3):
            next(data)
    # llama.cpp's server releases the slot once the gateway closes its response: long
    # before the 500 tokens asked (a ~40-token prompt plus what was generated by then).
    wait_for(
        lambda: len(stopped.findall(served.engine_output())) > before,
        30,
        "the engine to stop the generation",
    )
    assert int(stopped.findall(served.engine_output())[before]) < 200
    completion = client.chat.completions.create(
        model="default", messages=ask(), max_tokens=4, temperature=0
    )
    assert completion.choices[0].message.content  # and the engine serves on


def test_the_engine_log_is_in_its_file_and_the_banner_is_last(served: ServeProcess) -> None:
    assert "llama_server: listening" in served.engine_output()
    output = served.output()
    assert "lowvram is ready" in output and "load_model" not in output
    assert Path(served.engine_log).is_file()
