"""End to end: agent loops on the CPU default, with the client libraries agents are built on.

`lowvram serve` with llama.cpp's own server and the real 0.5B model, asked by LangChain,
instructor, pydantic-ai and the OpenAI SDK's Responses API the way their own examples do.
What a 0.5B model writes varies; asserted is what the gateway and the engine guarantee:
a forced call is one whole call, structured output parses, a tool loop runs its turns,
the Responses API carries tools, structured output and multi-turn input.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import instructor
import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.helpers import (
    WEATHER_TOOL,
    ServeProcess,
    alive,
    child_processes,
    lowvram_serve,
    wait_for,
)

pytestmark = [pytest.mark.e2e]

KEY = "e2e-agents-key-0001"
WEATHER = WEATHER_TOOL
RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}


class City(BaseModel):
    name: str
    country: str


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {"GATEWAY_API_KEYS": KEY, "ENGINE_BACKEND": "llamacpp", "ENGINE_CONTEXT": "4096"}
    with lowvram_serve(tmp_path_factory.mktemp("agents"), env, ready_timeout=1800) as process:
        yield process


@pytest.fixture
def client(served: ServeProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as sdk:
        yield sdk


def langchain(served: ServeProcess, **options: Any) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=served.url + "/v1",
        api_key=KEY,  # type: ignore[arg-type]
        model="default",
        temperature=0,
        max_retries=0,
        **options,
    )


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 21 C in {city}."


def test_langchain_forced_tool_call_then_the_tool_result_turn(served: ServeProcess) -> None:
    # What LangChain sends for tool_choice="any": "required", no parallel_tool_calls.
    chat = langchain(served, max_tokens=200).bind_tools([get_weather], tool_choice="any")
    question = HumanMessage("What is the weather in Paris?")
    called = chat.invoke([question])
    assert len(called.tool_calls) == 1, called  # one call, not calls until max_tokens
    call = called.tool_calls[0]
    assert call["name"] == "get_weather" and isinstance(call["args"].get("city"), str)
    assert called.response_metadata["finish_reason"] == "tool_calls"
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    answer = langchain(served, max_tokens=48).invoke([question, called, result])
    assert isinstance(answer.content, str) and answer.content.strip()


def test_a_three_turn_tool_loop(client: openai.OpenAI) -> None:
    """Call, result, call, result, answer: the loop an agent framework runs."""
    messages: list[Any] = [{"role": "user", "content": "Compare the weather in Paris and in Rome."}]
    for turn in range(3):
        last = turn == 2
        completion = client.chat.completions.create(
            model="default",
            messages=messages,
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice="none" if last else "required",
            max_tokens=200,
            temperature=0,
        )
        message = completion.choices[0].message
        if last:
            assert message.content and not message.tool_calls
            break
        # A forced call is one call (no parallel_tool_calls) and ends with it, not at
        # max_tokens (a fresh server's 0.5B otherwise called 7 cities here); whole JSON.
        assert message.tool_calls and len(message.tool_calls) == 1, message
        assert completion.choices[0].finish_reason == "tool_calls"
        call = message.tool_calls[0]
        arguments = json.loads(call.function.arguments)
        messages.append(message.model_dump(exclude_none=True))
        messages.append(
            {"role": "tool", "tool_call_id": call.id, "content": f"sunny in {arguments}"}
        )
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool"]


def test_instructor_in_tools_mode(client: openai.OpenAI) -> None:
    patched = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
    city = patched.chat.completions.create(
        model="default",
        response_model=City,
        messages=[{"role": "user", "content": "Paris is a city in which country?"}],
        max_tokens=120,
        temperature=0,
        max_retries=1,
    )
    assert isinstance(city, City) and city.name and city.country


def test_a_forced_call_cut_by_max_tokens_is_never_presented_as_a_call(
    client: openai.OpenAI,
) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_tokens=6,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    for call in choice.message.tool_calls or ():
        json.loads(call.function.arguments)  # any call shown is whole


def test_a_truncated_call_sent_back_is_a_400_not_a_502(client: openai.OpenAI) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"ci'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="default", messages=history, max_tokens=8)  # type: ignore[arg-type]
    assert "arguments" in str(refused.value.body)


# --- the Responses API -----------------------------------------------------------------------


def test_responses_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    parsed = client.responses.parse(
        model="default",
        input="Name a city in France, and its country.",
        text_format=City,
        max_output_tokens=80,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.name
    assert parsed.status == "completed" and parsed.usage and parsed.usage.output_tokens > 0


def test_a_responses_conversation_with_a_function_call_and_its_output(
    client: openai.OpenAI,
) -> None:
    first = client.responses.create(
        model="default",
        input=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[RESPONSES_WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=120,
        temperature=0,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    arguments = json.loads(calls[0].arguments)
    second = client.responses.create(
        model="default",
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            calls[0].model_dump(exclude_none=True),  # the call item, as the SDK's examples do
            {
                "type": "function_call_output",
                "call_id": calls[0].call_id,
                "output": f"sunny, 21 C in {arguments.get('city', 'Paris')}",
            },
            {"role": "assistant", "content": "It is sunny."},  # a plain-string assistant turn
            {"role": "user", "content": "Say it again in three words."},
        ],
        max_output_tokens=32,
        temperature=0,
    )
    assert second.output_text.strip() and second.status in ("completed", "incomplete")


def test_a_named_tool_choice_streams_function_call_events(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model="default",
            input="Weather in Rome?",
            tools=[RESPONSES_WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            max_output_tokens=120,
            temperature=0,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    json.loads(done.arguments)  # type: ignore[union-attr]


def test_a_responses_answer_cut_by_max_output_tokens_is_incomplete(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="default", input="Tell me a long story about a cat.", max_output_tokens=5
    )
    assert response.status == "incomplete"
    assert response.incomplete_details and response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.anyio
async def test_pydantic_ai_with_the_responses_model_and_an_output_type(
    served: ServeProcess,
) -> None:
    import httpx2  # pydantic-ai's own HTTP client
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    async with httpx2.AsyncClient(timeout=120) as http:
        provider = OpenAIProvider(base_url=served.url + "/v1", api_key=KEY, http_client=http)
        agent = Agent(OpenAIResponsesModel("default", provider=provider), output_type=City)
        result = await agent.run(
            "Paris is in which country? Give the city and the country.",
            model_settings={"max_tokens": 120, "temperature": 0},
        )
    assert isinstance(result.output, City) and result.output.name


# --- stopping ---------------------------------------------------------------------------------


def test_ctrl_c_stops_lowvram_serve_and_its_llama_server(tmp_path: Path) -> None:
    env = {"GATEWAY_API_KEYS": KEY, "ENGINE_BACKEND": "llamacpp", "ENGINE_CONTEXT": "1024"}
    with lowvram_serve(tmp_path, env, ready_timeout=1800) as served:
        engines = child_processes(served.process.pid, [b"llama-server"])
        assert engines
        served.process.send_signal(signal.SIGINT)
        assert served.process.wait(60) == 0
        output = served.output()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert output.rstrip().endswith("lowvram stopped.")
    for pid in engines:
        wait_for(lambda pid=pid: not alive(pid), 20, "llama-server to be gone")
