"""The Responses API as chat completions, both ways (no server: the translation alone)."""

from __future__ import annotations

from typing import Any

import pytest

from lowvram.gateway.errors import BadRequest
from lowvram.gateway.responses import to_chat, to_response

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def test_a_conversation_with_a_function_call_and_its_output_becomes_messages() -> None:
    chat = to_chat(
        {
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "type": "function_call",
                    "call_id": "c1",
                    "name": "get_weather",
                    "arguments": '{"city": "Paris"}',
                },
                {
                    "type": "function_call",
                    "call_id": "c2",
                    "name": "get_weather",
                    "arguments": '{"city": "Lyon"}',
                },
                {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
                {
                    "type": "function_call_output",
                    "call_id": "c2",
                    "output": [{"type": "input_text", "text": "20 C"}],
                },
                {"role": "assistant", "content": "Paris 18 C, Lyon 20 C."},  # a plain string
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "And "},
                        {"type": "input_text", "text": "tomorrow?"},
                    ],
                },
            ],
            "max_output_tokens": 64,
            "temperature": 0.2,
            "store": True,
        }
    )
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "c2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "20 C"},
        {"role": "assistant", "content": "Paris 18 C, Lyon 20 C."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    assert chat["max_tokens"] == 64 and chat["temperature"] == 0.2
    assert "input" not in chat and "store" not in chat and "max_output_tokens" not in chat


def test_tools_tool_choice_and_structured_output_carry_over() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}}
    chat = to_chat(
        {
            "input": "hi",
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "text": {
                "format": {"type": "json_schema", "name": "City", "schema": schema, "strict": True}
            },
            "reasoning": {"effort": "low"},
        }
    )
    assert chat["tools"] == [
        {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert chat["parallel_tool_calls"] is False
    assert chat["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "City", "schema": schema, "strict": True},
    }
    assert chat["reasoning_effort"] == "low"
    assert to_chat({"input": "x", "text": {"format": {"type": "json_object"}}})[
        "response_format"
    ] == {"type": "json_object"}
    assert "response_format" not in to_chat({"input": "x", "text": {"format": {"type": "text"}}})


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.[0].type"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.[0]"),
        ({"input": "x", "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
            "input.[0].content.[0]",
        ),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.[0].call_id"),
        ({"input": "x", "text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"input": []}, "input"),
    ],
)
def test_what_cannot_be_served_is_a_400_naming_the_field(
    request_: dict[str, Any], param: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        to_chat(request_)
    assert refused.value.param == param


def test_an_answer_becomes_a_response_with_its_items_and_usage() -> None:
    answer = {
        "created": 1,
        "choices": [
            {
                "finish_reason": "tool_calls",
                "message": {
                    "content": "Looking it up.",
                    "reasoning_content": "They want weather.",
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 7},
    }
    response = to_response(answer, {"model": "m", "input": "x", "tools": [WEATHER]}, "resp_abc")
    assert response["object"] == "response" and response["status"] == "completed"
    assert [item["type"] for item in response["output"]] == [
        "reasoning",
        "message",
        "function_call",
    ]
    assert response["output"][1]["content"][0] == {
        "type": "output_text",
        "text": "Looking it up.",
        "annotations": [],
        "logprobs": [],
    }
    call = response["output"][2]
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_9",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert response["usage"]["input_tokens"] == 12 and response["usage"]["total_tokens"] == 19
    assert response["tools"] == [WEATHER] and response["model"] == "m"


def test_an_answer_cut_by_max_tokens_is_incomplete() -> None:
    answer = {"choices": [{"finish_reason": "length", "message": {"content": "Once upon"}}]}
    response = to_response(answer, {"input": "x", "max_output_tokens": 2}, "resp_x")
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["status"] == "incomplete"
