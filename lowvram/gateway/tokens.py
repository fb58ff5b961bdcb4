"""Counting prompt tokens with the engine's own tokenizer, and a free upper bound.

Counting costs a round trip to the engine, so the gateway first computes an upper bound
from the request's size: byte-level BPE and SentencePiece-with-byte-fallback tokenizers
never make more tokens than UTF-8 bytes, and the JSON framing of each message outweighs the
template tokens around it. Only when that bound does not fit the context window does the
gateway ask the engine for the exact count, rendered with the engine's own chat template:

    vLLM                 POST /tokenize {"messages": ...} or {"prompt": ...}  -> {"count"}
    llama.cpp's server   POST /v1/chat/completions/input_tokens (a chat request),
                         POST /tokenize {"content"}
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from lowvram.engine.handle import EngineHandle, ServedModel
from lowvram.engine.probe import auth_headers
from lowvram.gateway.exchange import Endpoint

COUNT_TIMEOUT = 10.0
"""Seconds a count may take (milliseconds on a healthy engine): a hung tokenizer must not
hold the request; without a count the engine's own limits apply."""

# Default system prompts and tool instructions some chat templates add on their own.
TEMPLATE_SLACK = 64
TOOLS_SLACK = 256


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


def upper_bound(endpoint: Endpoint, body: dict[str, Any]) -> int:
    """No prompt of this request can be longer, in tokens, than this."""
    if endpoint is Endpoint.COMPLETIONS:
        return completion_upper_bound(body["prompt"])
    framed = body["messages"]  # the Responses API is sent as chat (responses.py)
    bound = _json_bytes(framed) + TEMPLATE_SLACK
    if body.get("tools"):
        bound += _json_bytes(body["tools"]) + TOOLS_SLACK
    return bound


def completion_upper_bound(prompt: Any) -> int:
    """For one prompt (a string or token ids); a batch is bounded by its largest member."""
    if isinstance(prompt, str):
        return len(prompt.encode()) + 2
    if prompt and isinstance(prompt[0], str):
        return max(len(p.encode()) + 2 for p in prompt)
    if prompt and isinstance(prompt[0], list):
        return max(len(p) for p in prompt)
    return len(prompt)


class TokenCounter:
    """Counts with the engine's own tokenizer; None where it cannot (no fitting then).

    `count_prompt` is the one way the gateway counts a request's prompt: for fitting the
    context before the request is sent, and for usage an engine did not report.
    """

    def __init__(
        self, client: httpx.AsyncClient, engine: EngineHandle, model: ServedModel | None = None
    ) -> None:
        self._client = client
        self._engine = engine
        self._model = model
        """The model the request is for (the engine's default one without)."""

    async def count_prompt(self, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        model = self._model or self._engine.model
        if model is None or model.tokenizer is None:
            return None
        if endpoint is Endpoint.COMPLETIONS:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                return await self.count_text(prompt)
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                return len(prompt)  # token ids count themselves
            return None  # a batch is left to the engine
        if model.tokenizer == "vllm":
            if endpoint is not Endpoint.CHAT:
                return None  # vLLM counts chat messages and plain prompts only
            request: dict[str, Any] = {k: body[k] for k in ("messages", "tools") if k in body}
            request |= {"model": model.id, "add_generation_prompt": True}
            return _int(await self._post("/tokenize", request), "count")
        counted = {k: body[k] for k in _COUNTED if k in body} | {"model": model.id}
        return _int(await self._post(_CHAT_COUNT, counted), "input_tokens")

    async def count_text(self, text: str) -> int | None:
        model = self._model or self._engine.model
        if model is None or model.tokenizer is None:
            return None
        if model.tokenizer == "vllm":
            return _int(await self._post("/tokenize", {"model": model.id, "prompt": text}), "count")
        # llama.cpp's router routes by "model"; a single server ignores it.
        request = {"model": model.id, "content": text, "add_special": True}
        data = await self._post("/tokenize", request)
        tokens = data.get("tokens") if data else None
        return len(tokens) if isinstance(tokens, list) else None

    async def _post(self, path: str, request: dict[str, Any]) -> dict[str, Any] | None:
        engine = self._engine
        try:
            response = await self._client.post(
                f"{engine.base_url}{path}",
                json=request,
                headers=auth_headers(engine.api_key),
                timeout=COUNT_TIMEOUT,
            )
            data = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, dict) else None


_CHAT_COUNT = "/v1/chat/completions/input_tokens"
_COUNTED = ("messages", "tools", "tool_choice", "chat_template_kwargs")


def _int(data: dict[str, Any] | None, key: str) -> int | None:
    value = data.get(key) if data else None
    return value if isinstance(value, int) else None
