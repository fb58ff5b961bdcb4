"""Ollama's API on the gateway, translated to and from the OpenAI surface the engines serve.

Generation keeps its one path (keys, limits, admission, the engine's chat completions, usage
rows): these functions only change the shapes.

    POST /api/chat       messages, tools, format, options  ->  chat completions
    POST /api/chat       {"prompt", "temperature", "max_tokens"}: the seed article's own
                         wrapper, answered {"response": text}
    POST /api/generate   prompt (+ system, images)  ->  chat completions;
                         raw or suffix  ->  completions (the prompt as it is)

Ollama streams by default, as NDJSON: one JSON object per line, the last with "done": true,
the done_reason and the token counts; `stream: false` answers one object. A tool call comes
whole, its arguments an object, in the message of one line. Model names like
`qwen2.5:0.5b` resolve to the served model where its name holds both parts (rewrite.py).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from lowvram.gateway.errors import APIError, BadRequest

_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}
"""Ollama's `options` the engines take under these names (num_ctx is the plan's to set)."""


@dataclass(frozen=True)
class Asked:
    """What an Ollama request asked for, as the answer must echo it."""

    model: str
    kind: str
    """chat, generate, or seed (the seed wrapper's {"prompt"} on /api/chat)."""
    stream: bool


def to_openai(route: str, body: dict[str, Any]) -> tuple[dict[str, Any], Asked, bool]:
    """The OpenAI request for an Ollama one, what it asked, and whether it goes to the
    completions endpoint (raw prompts) rather than chat."""
    model = body.get("model")
    name = model if isinstance(model, str) else "default"
    if route == "chat" and "messages" not in body and isinstance(body.get("prompt"), str):
        return _seed(body, name)
    kind = "chat" if route == "chat" else "generate"
    stream = body.get("stream", True) is not False  # Ollama streams unless told not to
    request: dict[str, Any] = {"model": name, "stream": stream}
    request |= _options(body)
    if (response_format := _format(body.get("format"))) is not None:
        request["response_format"] = response_format
    if isinstance(body.get("think"), bool):
        request["chat_template_kwargs"] = {"enable_thinking": body["think"]}
    completions = False
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a list of messages.", param="messages")
        request["messages"] = _messages(messages)
        if body.get("tools"):
            request["tools"] = body["tools"]
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string.", param="prompt")
        if body.get("raw") or body.get("suffix"):
            completions = True
            request["prompt"] = prompt
            if body.get("suffix"):
                request["suffix"] = body["suffix"]
        else:
            turns = [{"role": "system", "content": body["system"]}] if body.get("system") else []
            user = {"role": "user", "content": prompt, "images": body.get("images")}
            request["messages"] = turns + _messages([user])
    if stream:
        request["stream_options"] = {"include_usage": True}
    return request, Asked(name, kind, stream), completions


def _seed(body: dict[str, Any], name: str) -> tuple[dict[str, Any], Asked, bool]:
    """The seed article's wrapper: {"prompt", "temperature", "max_tokens"} in, {"response"}
    out, one JSON answer unless it asks for a stream."""
    stream = body.get("stream") is True
    request: dict[str, Any] = {
        "model": name,
        "messages": [{"role": "user", "content": body["prompt"]}],
        "stream": stream,
    }
    for field in ("temperature", "max_tokens", "top_p"):
        if body.get(field) is not None:
            request[field] = body[field]
    if stream:
        request["stream_options"] = {"include_usage": True}
    return request, Asked(name, "seed", stream), False


def _options(body: dict[str, Any]) -> dict[str, Any]:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'options' must be an object.", param="options")
    request = {_OPTIONS[k]: v for k, v in options.items() if k in _OPTIONS and v is not None}
    predict = options.get("num_predict")
    if isinstance(predict, int) and predict > 0:  # -1 and -2 mean "until the end"
        request["max_tokens"] = predict
    return request


def _format(form: Any) -> dict[str, Any] | None:
    if form in (None, ""):
        return None
    if form == "json":
        return {"type": "json_object"}
    if isinstance(form, dict):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": form}}
    raise BadRequest("'format' must be \"json\" or a JSON schema.", param="format")


def _messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Ollama's messages as OpenAI's: images as data URLs, tool-call arguments as JSON text,
    tool results matched to their calls by order (Ollama's carry no ids)."""
    out: list[dict[str, Any]] = []
    calls: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            param = f"messages.[{i}]"
            raise BadRequest(f"'{param}' must be a message with a role.", param=param)
        converted: dict[str, Any] = {
            "role": message["role"],
            "content": message.get("content") or "",
        }
        images = message.get("images")
        if isinstance(images, list) and images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": converted["content"]}]
            parts += [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}}
                for image in images
            ]
            converted["content"] = parts
        if isinstance(message.get("tool_calls"), list):
            converted["tool_calls"] = []
            for call in message["tool_calls"]:
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    param = f"messages.[{i}].tool_calls"
                    raise BadRequest(f"'{param}' must hold functions with names.", param=param)
                call_id = f"call_{len(calls)}"
                calls.append(call_id)
                arguments = function.get("arguments") or {}
                converted["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": function["name"],
                            "arguments": arguments
                            if isinstance(arguments, str)
                            else json.dumps(arguments),
                        },
                    }
                )
        if message["role"] == "tool":
            answered = message.get("tool_call_id")
            converted["tool_call_id"] = answered or (calls.pop(0) if calls else f"call_{i}")
        out.append(converted)
    return out


# --- the answer ---------------------------------------------------------------------------


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{time.time_ns() % 10**9:09d}Z"


def _done_reason(finish: Any) -> str:
    return "length" if finish == "length" else "stop"


def _counts(usage: Any, started: float, first: float | None) -> dict[str, int]:
    """Ollama's counts and durations (nanoseconds): the prompt until the first token."""
    usage = usage if isinstance(usage, dict) else {}
    total = int((time.perf_counter() - started) * 1e9)
    prompt_time = int((first - started) * 1e9) if first is not None else 0
    return {
        "total_duration": total,
        "load_duration": 0,
        "prompt_eval_count": int(usage.get("prompt_tokens") or 0),
        "prompt_eval_duration": prompt_time,
        "eval_count": int(usage.get("completion_tokens") or 0),
        "eval_duration": total - prompt_time,
    }


def _ollama_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            continue  # cut by max_tokens: not a call (rewrite.drop_cut_tool_calls)
        out.append({"function": {"name": function.get("name"), "arguments": arguments}})
    return out


def to_ollama(answer: dict[str, Any], asked: Asked, started: float) -> dict[str, Any]:
    """A chat or completions answer as Ollama's (or the seed wrapper's)."""
    choice = (answer.get("choices") or [{}])[0]
    message = choice.get("message") or {}
    text = message.get("content") if "message" in choice else choice.get("text")
    text = text if isinstance(text, str) else ""
    if asked.kind == "seed":
        return {"response": text}
    head = {"model": asked.model, "created_at": _now()}
    tail = {"done": True, "done_reason": _done_reason(choice.get("finish_reason"))}
    tail |= _counts(answer.get("usage"), started, None)
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if asked.kind == "generate":
        body = head | {"response": text}
        if reasoning:
            body["thinking"] = reasoning
        return body | tail
    reply: dict[str, Any] = {"role": "assistant", "content": text}
    if reasoning:
        reply["thinking"] = reasoning
    if calls := _ollama_calls(message.get("tool_calls")):
        reply["tool_calls"] = calls
    return head | {"message": reply} | tail


class OllamaStream:
    """A chat or completions stream as Ollama's NDJSON lines (see relay.StreamRelay)."""

    media_type = "application/x-ndjson"
    pings = False
    """NDJSON has no comment lines for keep-alives."""

    def __init__(self, asked: Asked) -> None:
        self._asked = asked
        self._started = time.perf_counter()
        self._first: float | None = None
        self._calls: dict[int, dict[str, Any]] = {}
        self._finish: Any = None

    def start(self) -> bytes:
        return b""

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            thinking = delta.get("reasoning_content") or delta.get("reasoning")
            for call in delta.get("tool_calls") or ():
                held = self._calls.setdefault(call.get("index", 0), {"name": None, "arguments": ""})
                function = call.get("function") or {}
                held["name"] = function.get("name") or held["name"]
                held["arguments"] += function.get("arguments") or ""
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
            if (isinstance(text, str) and text) or (isinstance(thinking, str) and thinking):
                self._first = self._first or time.perf_counter()
                out.append(self._line(text or "", thinking, done=False))
        return b"".join(out)

    def finish(self, usage: Any) -> bytes:
        out = b""
        calls = [
            {"function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(self._calls.items())
        ]
        if ollama_calls := _ollama_calls(calls):  # whole, in one line, as Ollama sends them
            out += self._line("", None, done=False, tool_calls=ollama_calls)
        return out + self._final(_counts(usage, self._started, self._first))

    def error(self, error: APIError) -> bytes:
        return json.dumps({"error": error.message}).encode() + b"\n"

    def _final(self, counts: dict[str, int]) -> bytes:
        body = self._body("", None) | {"done": True, "done_reason": _done_reason(self._finish)}
        return json.dumps(body | counts).encode() + b"\n"

    def _line(
        self,
        text: str,
        thinking: Any,
        *,
        done: bool,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> bytes:
        body = self._body(text, thinking, tool_calls) | {"done": done}
        return json.dumps(body).encode() + b"\n"

    def _body(
        self, text: str, thinking: Any, tool_calls: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        head: dict[str, Any] = {"model": self._asked.model, "created_at": _now()}
        if self._asked.kind == "seed":
            return {"response": text}
        if self._asked.kind == "generate":
            body = head | {"response": text}
            if isinstance(thinking, str) and thinking:
                body["thinking"] = thinking
            return body
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if isinstance(thinking, str) and thinking:
            message["thinking"] = thinking
        if tool_calls:
            message["tool_calls"] = tool_calls
        return head | {"message": message}
