"""On a GPU: `lowvram serve` with a managed vLLM engine, driven through the gateway.

Skipped where there is no NVIDIA GPU or no vLLM. The model is a Hugging Face directory named
by LOWVRAM_GPU_TEST_MODEL (on the lent H100: a random-weight Qwen2.5-0.5B-shaped checkpoint
with the real tokenizer, from ../shared/gpu/mkmodel.py), so answers are gibberish: the tests
check the protocol, the accounting and the recovery, not the words.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from langchain_openai import ChatOpenAI

from lowvram.engine.hardware import detect_gpus
from tests.helpers import is_ready, lowvram_serve, wait_for

MODEL = os.environ.get("LOWVRAM_GPU_TEST_MODEL", "/tmp/m05")
KEY = "gpu-test-key-0001"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not detect_gpus(), reason="no NVIDIA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(not Path(MODEL, "config.json").is_file(), reason=f"no model at {MODEL}"),
]


def _vllm_pids() -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if b"vllm.entrypoints.openai.api_server" in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("gpu")
    env = {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_DB_PATH": str(tmp / "gateway.sqlite3"),
        "ENGINE_BACKEND": "vllm",
        # Graphs would fit; capturing them costs a minute of the lent GPU per start.
        "ENGINE_EXTRA_ARGS": "--enforce-eager",
    }
    args = ["--model", MODEL, "--vram", "3GiB", "--context", "2048", "--concurrency", "4"]
    started = time.monotonic()
    with lowvram_serve(tmp, env, args) as process:
        print(f"lowvram serve ready in {time.monotonic() - started:.0f} s")
        yield process.url, process.log
    assert not _vllm_pids(), "an engine process outlived lowvram serve"


@pytest.fixture
def client(served: tuple[str, Path]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=served[0] + "/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


HELLO = [{"role": "user", "content": "Say something."}]
FIXED = {"ignore_eos": True}  # random weights: fix the length so the counts are known


def test_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model="default",
            messages=HELLO,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=FIXED,
        )
    )
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 12
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens == 24 and usage.prompt_tokens > 5


def test_non_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default", messages=HELLO, max_tokens=16, extra_body=FIXED
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 16
    assert completion.choices[0].message.content


def test_two_concurrent_streams(served: tuple[str, Path]) -> None:
    async def both() -> list[int]:
        async with openai.AsyncOpenAI(
            base_url=served[0] + "/v1", api_key=KEY, max_retries=0
        ) as sdk:

            async def one() -> int:
                stream = await sdk.chat.completions.create(
                    model="default",
                    messages=HELLO,
                    max_tokens=32,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=FIXED,
                )
                chunks = [chunk async for chunk in stream]
                assert chunks[-1].usage is not None
                return chunks[-1].usage.completion_tokens

            return list(await asyncio.gather(one(), one()))

    assert asyncio.run(both()) == [32, 32]


def test_langchain(served: tuple[str, Path]) -> None:
    llm = ChatOpenAI(
        base_url=served[0] + "/v1",
        api_key=KEY,
        model="default",
        max_tokens=8,
        max_retries=0,
        extra_body=FIXED,
    )
    assert llm.invoke("Say something.").content
    assert "".join(str(chunk.content) for chunk in llm.stream("Say something."))


def test_engine_killed_mid_stream_gives_an_sse_error_and_comes_back(
    served: tuple[str, Path], client: openai.OpenAI
) -> None:
    url, log_path = served
    body = {"model": "default", "messages": HELLO, "max_tokens": 2000, "stream": True, **FIXED}
    received: list[str] = []
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=120
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                received.append(line)
            if len(received) == 5:
                for pid in _vllm_pids():
                    os.killpg(pid, signal.SIGKILL)
    error = json.loads(received[-2][6:])["error"]
    assert received[-1] == "data: [DONE]" and error["type"] == "server_error"
    wait_for(lambda: not is_ready(url), 30, "/ready to notice the engine is gone")
    wait_for(lambda: is_ready(url), 600, "the supervisor to bring vLLM back")
    completion = client.chat.completions.create(
        model="default", messages=HELLO, max_tokens=8, extra_body=FIXED
    )
    assert completion.usage is not None and completion.usage.completion_tokens == 8
    assert "restart" in log_path.read_text(errors="replace")


# --- the OpenAI surface through vLLM: what grammars guarantee holds even on random weights --
# Random weights write strings until max_tokens runs out: the schemas here bound every value
# (enums), so that what is checked is the grammar, not the length of a random string. The
# plan also turns off free whitespace in JSON grammars (random weights filled max_tokens with
# it); vLLM 0.26's grammar for tool_choice "required" does not take that setting, so there
# the call's name holds and its arguments may run out of tokens in whitespace.

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["Paris", "Lyon"]},
        "capital": {"type": "boolean"},
    },
    "required": ["name", "capital"],
    "additionalProperties": False,
}


def test_the_plan_turned_on_the_tool_parser(served: tuple[str, Path]) -> None:
    engine_log = Path(served[1]).with_name("engine.log").read_text()
    assert "--enable-auto-tool-choice --tool-call-parser hermes" in engine_log


def test_tool_choice_required_and_named_return_parsed_calls(client: openai.OpenAI) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        completion = client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER],
            tool_choice=choice,  # type: ignore[arg-type]
            parallel_tool_calls=False,
            max_tokens=300,
        )
        choice_ = completion.choices[0]
        calls = choice_.message.tool_calls
        if calls:
            assert calls[0].function.name == "get_weather"
            assert json.loads(calls[0].function.arguments)["city"] in ("Paris", "Lyon")
        else:  # the arguments ran out of tokens; what was written is the forced call
            assert choice_.finish_reason == "length"
            assert '"get_weather"' in (choice_.message.content or "")


def test_tool_choice_auto_is_accepted(client: openai.OpenAI) -> None:
    # vLLM refuses "auto" without --enable-auto-tool-choice; random weights call or not.
    completion = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="auto",
        max_tokens=32,
    )
    message = completion.choices[0].message
    assert message.tool_calls or message.content is not None


def test_streamed_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=300,
        stream=True,
    )
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    for chunk in stream:
        for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            if call.function:
                names[call.index] = names.get(call.index, "") + (call.function.name or "")
                arguments[call.index] = arguments.get(call.index, "") + (
                    call.function.arguments or ""
                )
    assert names[0] == "get_weather"  # the grammar forces the one tool there is
    assert arguments[0].lstrip().startswith("{")


def test_json_schema_strict_holds(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "A city, as JSON."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "strict": True, "schema": CITY},
        },
        max_tokens=200,
    )
    data = json.loads(completion.choices[0].message.content or "")
    assert set(data) == {"name", "capital"} and isinstance(data["capital"], bool)


def test_n_responses_models_and_refusals(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="default", messages=HELLO, max_tokens=4, n=2, extra_body=FIXED
    )
    assert len(completion.choices) == 2
    response = client.responses.create(model="default", input="Say something.", max_output_tokens=8)
    assert response.usage is not None and response.usage.output_tokens > 0
    events = list(
        client.responses.create(
            model="default", input="Say something.", max_output_tokens=8, stream=True
        )
    )
    # Random weights rarely stop within 8 tokens: then the response is incomplete.
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert client.models.retrieve("default").id == "default"
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model="default", input="hello")
    assert refused.value.code == "model_not_supported"


def test_responses_tools_structured_output_and_a_second_turn(client: openai.OpenAI) -> None:
    """The Responses API through vLLM's chat completions: the shapes, on random weights."""
    weather = {"type": "function", **WEATHER["function"]}
    first = client.responses.create(
        model="default",
        input=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[weather],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=300,
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert first.status == "incomplete" or (calls and calls[0].name == "get_weather")
    if calls:
        second = client.responses.create(
            model="default",
            input=[
                {"role": "user", "content": "Weather in Paris?"},
                calls[0].model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"},
            ],
            max_output_tokens=8,
        )
        assert second.status in ("completed", "incomplete") and second.usage is not None
    structured = client.responses.create(
        model="default",
        input="A city, as JSON.",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
        max_output_tokens=200,
    )
    assert set(json.loads(structured.output_text)) == {"name", "capital"}


def test_ollamas_api_through_vllm(served: tuple[str, Path]) -> None:
    import ollama

    client = ollama.Client(host=served[0], headers={"Authorization": f"Bearer {KEY}"})
    reply = client.chat(model="default", messages=HELLO, stream=False, options={"num_predict": 8})
    assert reply.done and reply.eval_count and reply.message.role == "assistant"
    parts = list(
        client.chat(model="default", messages=HELLO, stream=True, options={"num_predict": 8})
    )
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    generated = client.generate(
        model="default", prompt="Say something.", options={"num_predict": 8}
    )
    assert generated.done
    listed = client.list().models
    assert listed[0].details is not None and listed[0].details.format == "safetensors"
    client.close()
