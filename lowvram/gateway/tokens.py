"""Counting prompt tokens with the engine's own tokenizer, and a free upper bound.

Counting costs a round trip to the engine, so the gateway first computes an upper bound
from the request's size: byte-level BPE and SentencePiece-with-byte-fallback tokenizers
never make more tokens than UTF-8 bytes, and the JSON framing of each message outweighs the
template tokens around it. Only when that bound does not fit the context window does the
gateway ask the engine for the exact count.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import httpx

from lowvram.engine.handle import EngineHandle
from lowvram.engine.probe import auth_headers
from lowvram.gateway.exchange import Endpoint

# Default system prompts and tool instructions some chat templates add on their own.
TEMPLATE_SLACK = 64
TOOLS_SLACK = 256


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, ensure_ascii=False).encode())


def chat_upper_bound(body: dict[str, Any]) -> int:
    bound = _json_bytes(body["messages"]) + TEMPLATE_SLACK
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


def render_prompt(body: dict[str, Any], template: str | None) -> str:
    """The prompt as the engine will see it, for engines that only tokenize plain text.

    With the model's chat template (llama.cpp reads it from the GGUF), the exact text;
    without it, or if the template fails on this request, a ChatML approximation.
    """
    if template is not None:
        try:
            return str(
                _compiled(template).render(
                    messages=body["messages"],
                    tools=body.get("tools"),
                    add_generation_prompt=True,
                    bos_token="",
                    eos_token="",
                )
            )
        except Exception:  # a template may reject what the engine would accept or fix up
            pass
    return render_chatml(body)


@functools.lru_cache(maxsize=4)
def _compiled(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    environment.globals["raise_exception"] = _raise
    return environment.from_string(template)


def _raise(message: str) -> None:
    raise ValueError(message)


def render_chatml(body: dict[str, Any]) -> str:
    """An approximation of the prompt for engines that only tokenize plain text."""
    parts = []
    for message in body["messages"]:
        content = message.get("content")
        if not isinstance(content, str):
            content = json.dumps(content, ensure_ascii=False) if content else ""
        parts.append(f"<|im_start|>{message['role']}\n{content}<|im_end|>\n")
        if message.get("tool_calls"):
            parts.append(json.dumps(message["tool_calls"], ensure_ascii=False))
    if body.get("tools"):
        parts.append(json.dumps(body["tools"], ensure_ascii=False))
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


class TokenCounter:
    """Counts with the engine's own tokenizer; None where it cannot (no fitting then).

    `count_prompt` is the one way the gateway counts a request's prompt: for fitting the
    context before the request is sent, and for usage an engine did not report.
    """

    def __init__(self, client: httpx.AsyncClient, engine: EngineHandle) -> None:
        self._client = client
        self._engine = engine

    async def count_prompt(self, endpoint: Endpoint, body: dict[str, Any]) -> int | None:
        if endpoint is Endpoint.CHAT:
            return await self._count_chat(body)
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return await self.count_text(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return len(prompt)  # token ids count themselves
        return None  # a batch is left to the engine

    async def count_text(self, text: str) -> int | None:
        model = self._engine.model
        if model is None or model.tokenizer is None:
            return None
        if model.tokenizer == "vllm":
            return await self._vllm({"model": model.id, "prompt": text})
        data = await self._post("/extras/tokenize", {"input": text})
        tokens = data.get("tokens") if data else None
        return len(tokens) if isinstance(tokens, list) else None

    async def _count_chat(self, body: dict[str, Any]) -> int | None:
        model = self._engine.model
        if model is None or model.tokenizer is None:
            return None
        if model.tokenizer == "vllm":
            request: dict[str, Any] = {
                "model": model.id,
                "messages": body["messages"],
                "add_generation_prompt": True,
            }
            if body.get("tools"):
                request["tools"] = body["tools"]
            return await self._vllm(request)
        return await self.count_text(render_prompt(body, model.chat_template))

    async def _vllm(self, request: dict[str, Any]) -> int | None:
        data = await self._post("/tokenize", request)
        count = data.get("count") if data else None
        return count if isinstance(count, int) else None

    async def _post(self, path: str, request: dict[str, Any]) -> dict[str, Any] | None:
        engine = self._engine
        try:
            response = await self._client.post(
                f"{engine.base_url}{path}", json=request, headers=auth_headers(engine.api_key)
            )
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        data = response.json()
        return data if isinstance(data, dict) else None
