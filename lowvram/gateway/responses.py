"""The Responses API (`POST /v1/responses`), served by the engines' chat completions.

Both engines serve chat completions whole: tools, tool_choice, grammars for structured
output, and the gateway's shims for them (rewrite.py). Their own Responses endpoints do
less (llama.cpp's ignores `tool_choice` and `text.format` and refuses an assistant turn
given as a string; neither keeps responses for `previous_response_id`). So the gateway
translates, in one place, and generation has one path:

    to_chat(request)                     a Responses request as a chat request
    to_response(answer, request, id)     a chat answer as a Response object
    ResponseStream(request, id)          chat stream chunks as Responses stream events

    input items           ->  messages
      message (string or parts: input_text, output_text, input_image)
      function_call       ->  an assistant message's tool_calls (consecutive ones merged)
      function_call_output->  a tool message
      reasoning           ->  dropped (the engine thinks again)
    instructions          ->  a system message first
    tools (function)      ->  tools; tool_choice {"type": "function", "name"} -> named
    text.format           ->  response_format (json_schema, json_object)
    max_output_tokens     ->  max_tokens; finish_reason "length" -> status "incomplete"

What needs state the gateway does not keep (`previous_response_id`, `item_reference`,
`background`) or tools no engine here runs (web search, files) is a 400 naming the field.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from lowvram.gateway.errors import BadRequest

_DROPPED = (
    "store",
    "metadata",
    "truncation",
    "include",
    "service_tier",
    "prompt_cache_key",
    "safety_identifier",
    "stream_options",
)
"""Responses fields with nothing to do here (the gateway stores nothing, truncates nothing)."""
_STATEFUL = ("previous_response_id", "conversation", "prompt")


def new_id() -> str:
    return "resp_" + uuid.uuid4().hex


# --- the request --------------------------------------------------------------------------


def to_chat(request: dict[str, Any]) -> dict[str, Any]:
    """The chat completions request that serves this Responses request."""
    for field in _STATEFUL:
        if request.get(field) is not None:
            raise BadRequest(
                f"'{field}' is not supported: the gateway keeps no responses or prompts; "
                "send the whole conversation in 'input'.",
                param=field,
            )
    if request.get("background"):
        raise BadRequest("Background responses are not supported.", param="background")
    chat = {
        k: v
        for k, v in request.items()
        if k not in ("input", "instructions", "max_output_tokens", "text", "tools", "tool_choice")
        and k not in _DROPPED
        and k not in ("reasoning", "background")
    }
    messages: list[dict[str, Any]] = []
    if isinstance(request.get("instructions"), str) and request["instructions"]:
        messages.append({"role": "system", "content": request["instructions"]})
    items = request["input"]
    messages += _messages([{"role": "user", "content": items}] if isinstance(items, str) else items)
    if not messages:
        raise BadRequest("'input' holds nothing to answer.", param="input")
    chat["messages"] = messages
    if request.get("max_output_tokens") is not None:
        chat["max_tokens"] = request["max_output_tokens"]
    if request.get("tools"):
        chat["tools"] = [_tool(i, tool) for i, tool in enumerate(request["tools"])]
    if request.get("tool_choice") is not None:
        chat["tool_choice"] = _tool_choice(request["tool_choice"])
    if (response_format := _response_format(request.get("text"))) is not None:
        chat["response_format"] = response_format
    effort = (request.get("reasoning") or {}).get("effort")
    if isinstance(effort, str):
        chat["reasoning_effort"] = effort
    return chat


def _messages(items: list[Any]) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    calls_open = False  # the last message is an assistant's that function_calls join
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(f"'input.[{i}]' must be an object.", param=f"input.[{i}]")
        kind = item.get("type") or ("message" if "role" in item else None)
        if kind == "message":
            messages.append(_message(i, item))
            calls_open = messages[-1]["role"] == "assistant"
        elif kind == "function_call":
            call = _call(i, item)
            if calls_open:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            calls_open = True
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str):
                param = f"input.[{i}].call_id"
                raise BadRequest(f"'{param}' must name the call it answers.", param=param)
            output = item.get("output")
            text = output if isinstance(output, str) else _text_of(output)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            calls_open = False
        elif kind == "reasoning":
            continue  # the engine reasons again; the text is not a turn
        else:
            raise BadRequest(
                f"'input.[{i}]': items of type {kind!r} are not supported here (messages, "
                "function_call, function_call_output and reasoning are).",
                param=f"input.[{i}].type",
            )
    return messages


def _message(i: int, item: dict[str, Any]) -> dict[str, Any]:
    role = item.get("role")
    if role not in ("user", "assistant", "system", "developer"):
        param = f"input.[{i}].role"
        raise BadRequest(f"'{param}' must be user, assistant, system or developer.", param=param)
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        param = f"input.[{i}].content"
        raise BadRequest(f"'{param}' must be a string or a list of parts.", param=param)
    parts = [_part(i, j, part) for j, part in enumerate(content)]
    if role != "user" or all(p["type"] == "text" for p in parts):
        # Chat templates take the text of every turn but the user's as a string.
        return {"role": role, "content": "".join(p.get("text", "") for p in parts)}
    return {"role": role, "content": parts}


def _part(i: int, j: int, part: Any) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text", "refusal"):
        text = part.get("text", part.get("refusal", ""))
        return {"type": "text", "text": text if isinstance(text, str) else ""}
    if kind == "input_image" and isinstance(part.get("image_url"), str):
        return {"type": "image_url", "image_url": {"url": part["image_url"]}}
    param = f"input.[{i}].content.[{j}]"
    raise BadRequest(
        f"'{param}': content of type {kind!r} is not supported here (input_text, "
        "output_text and input_image with an image_url are).",
        param=param,
    )


def _call(i: int, item: dict[str, Any]) -> dict[str, Any]:
    name, arguments = item.get("name"), item.get("arguments", "")
    if not isinstance(name, str) or not isinstance(arguments, str):
        param = f"input.[{i}]"
        raise BadRequest(f"'{param}': a function_call needs a name and arguments.", param=param)
    call_id = item.get("call_id") or item.get("id") or f"call_{i}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _text_of(output: Any) -> str:
    if isinstance(output, list):
        return "".join(p.get("text", "") for p in output if isinstance(p, dict))
    return json.dumps(output)


def _tool(i: int, tool: Any) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        kind = tool.get("type") if isinstance(tool, dict) else None
        raise BadRequest(
            f"'tools.[{i}]': tools of type {kind!r} are not supported here (function tools are).",
            param=f"tools.[{i}]",
        )
    function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
    return {"type": "function", "function": function}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    raise BadRequest(
        '\'tool_choice\' must be auto, none, required or {"type": "function", "name": ...}.',
        param="tool_choice",
    )


def _response_format(text: Any) -> dict[str, Any] | None:
    form = text.get("format") if isinstance(text, dict) else None
    if not isinstance(form, dict) or form.get("type") in (None, "text"):
        return None
    if form["type"] == "json_object":
        return {"type": "json_object"}
    if form["type"] == "json_schema":
        schema = {k: form[k] for k in ("name", "schema", "strict", "description") if k in form}
        return {"type": "json_schema", "json_schema": schema}
    raise BadRequest(
        "'text.format' must be text, json_object or json_schema.", param="text.format.type"
    )


# --- the answer ---------------------------------------------------------------------------


def base_response(request: dict[str, Any], response_id: str, created: int) -> dict[str, Any]:
    """The Response object's fields that echo the request."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": "in_progress",
        "error": None,
        "incomplete_details": None,
        "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"),
        "model": request.get("model"),
        "output": [],
        "parallel_tool_calls": request.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": request.get("reasoning"),
        "store": False,
        "temperature": request.get("temperature"),
        "text": request.get("text") or {"format": {"type": "text"}},
        "tool_choice": request.get("tool_choice", "auto"),
        "tools": request.get("tools") or [],
        "top_p": request.get("top_p"),
        "truncation": "disabled",
        "usage": None,
        "metadata": request.get("metadata") or {},
    }


def usage_of(chat_usage: Any) -> dict[str, Any] | None:
    if not isinstance(chat_usage, dict):
        return None
    prompt = chat_usage.get("prompt_tokens") or 0
    completion = chat_usage.get("completion_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


def finished(response: dict[str, Any], finish_reason: Any) -> dict[str, Any]:
    """Set its status from the chat finish reason: cut by max_tokens is incomplete."""
    if finish_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    elif finish_reason == "content_filter":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "content_filter"}
    else:
        response["status"] = "completed"
    return response


def to_response(
    answer: dict[str, Any], request: dict[str, Any], response_id: str
) -> dict[str, Any]:
    """A chat completion as the Response the client asked for."""
    choices = answer.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    response = base_response(request, response_id, int(answer.get("created") or time.time()))
    status = "incomplete" if choice.get("finish_reason") == "length" else "completed"
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        response["output"].append(reasoning_item(response_id, reasoning))
    if isinstance(message.get("content"), str) and message["content"]:
        response["output"].append(message_item(response_id, message["content"], status))
    for index, call in enumerate(message.get("tool_calls") or ()):
        function = call.get("function") or {}
        response["output"].append(
            call_item(
                response_id,
                index,
                call.get("id") or f"call_{index}",
                function.get("name"),
                function.get("arguments") or "",
            )
        )
    response["usage"] = usage_of(answer.get("usage"))
    return finished(response, choice.get("finish_reason"))


def message_item(response_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_" + response_id[5:],
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def call_item(
    response_id: str, index: int, call_id: str, name: Any, arguments: str, status: str = "completed"
) -> dict[str, Any]:
    return {
        "type": "function_call",
        "id": f"fc_{response_id[5:]}_{index}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def reasoning_item(response_id: str, text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": "rs_" + response_id[5:],
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
    }
