"""The APIs the gateway speaks besides the engines' own, and how each maps onto theirs.

    dialect = dialect_for(Endpoint.RESPONSES, body)
    dialect.body          what the engine is sent (a chat completions request)
    dialect.answer(json)  the engine's JSON answer as the client's API answers
    dialect.stream()      a relay translation of the engine's stream (relay.Translation)

OpenAI's chat, completions, embeddings and tokenize go to the engine as they are; the
Responses API (responses.py) and Ollama's chat and generate (ollama.py) are translated, so
that generation has one path whatever the client speaks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lowvram.gateway import ollama
from lowvram.gateway.exchange import Endpoint
from lowvram.gateway.relay import Translation
from lowvram.gateway.responses import new_id, to_chat, to_response
from lowvram.gateway.responses_stream import ResponseStream

OLLAMA = {Endpoint.OLLAMA_CHAT: "chat", Endpoint.OLLAMA_GENERATE: "generate"}


@dataclass(frozen=True)
class Dialect:
    engine_endpoint: Endpoint
    body: dict[str, Any]
    answer: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    stream: Callable[[], Translation] | None = None
    ollama_names: bool = False
    """Whether model names like qwen2.5:0.5b resolve (rewrite.resolve_model)."""

    @property
    def translated(self) -> bool:
        return self.answer is not None


def dialect_for(endpoint: Endpoint, body: dict[str, Any]) -> Dialect:
    if endpoint is Endpoint.RESPONSES:
        return Dialect(
            Endpoint.CHAT,
            to_chat(body),
            answer=lambda answer: to_response(answer, body, new_id()),
            stream=lambda: ResponseStream(body),
        )
    if endpoint in OLLAMA:
        request, asked, completions = ollama.to_openai(OLLAMA[endpoint], body)
        started = time.perf_counter()
        return Dialect(
            Endpoint.COMPLETIONS if completions else Endpoint.CHAT,
            request,
            answer=lambda answer: ollama.to_ollama(answer, asked, started),
            stream=lambda: ollama.OllamaStream(asked),
            ollama_names=True,
        )
    return Dialect(endpoint, body)
