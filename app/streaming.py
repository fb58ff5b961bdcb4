"""Relay the engine's SSE stream to the client, chunk by chunk, as it arrives.

Events pass through as the engine wrote them; the relay only reads what it must: the
usage chunk (kept for accounting, dropped again if the client did not ask for it), the
final `[DONE]`, and, for engines that cannot report usage in a stream, the text to count.
Once the first byte is out no status code can change, so failures become an SSE event
carrying the OpenAI error object, followed by `data: [DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import httpx
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from app.errors import UpstreamError, sse_error_event
from app.exchange import CLIENT_CLOSED, Exchange
from app.upstream import map_transport_error

DONE = b"data: [DONE]\n\n"

Counter = Callable[[str], Awaitable[int | None]]


class StreamRelay:
    def __init__(
        self,
        upstream: httpx.Response,
        exchange: Exchange,
        *,
        client_wants_usage: bool,
        engine_reports_usage: bool,
        count_prompt: Callable[[], Awaitable[int | None]],
        count_text: Counter,
    ) -> None:
        self._upstream = upstream
        self._exchange = exchange
        self._client_wants_usage = client_wants_usage
        self._engine_reports_usage = engine_reports_usage
        self._count_prompt = count_prompt
        self._count_text = count_text
        self._done = False
        self.completed = False
        self._saw_usage = False
        self._text: list[str] = []
        self._last_chunk: dict[str, Any] | None = None

    async def events(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        try:
            pending = b""
            async for chunk in self._upstream.aiter_raw():
                pending += chunk
                if b"\r" in pending:
                    pending = pending.replace(b"\r\n", b"\n")
                end = pending.find(b"\n\n")
                while end >= 0:
                    out = self._on_event(pending[:end])
                    pending = pending[end + 2 :]
                    if out is not None:
                        yield out
                    end = pending.find(b"\n\n")
            if not self._done:
                exchange.status = UpstreamError.status_code
                yield sse_error_event(UpstreamError("The engine ended the stream unfinished."))
            elif not self._saw_usage:
                usage_event = await self._synthesize_usage()
                if usage_event is not None:
                    yield usage_event
            yield DONE
            self.completed = True
        except httpx.HTTPError as exc:
            error = map_transport_error(exc)
            exchange.status = error.status_code
            yield sse_error_event(error)
            yield DONE
            self.completed = True
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the engine's response, which makes the engine abort the generation."""
        with anyio.CancelScope(shield=True):
            await self._upstream.aclose()

    def _on_event(self, event: bytes) -> bytes | None:
        data = event[5:].lstrip() if event.startswith(b"data:") and b"\n" not in event else None
        if data is None:
            data = _data_of(event)
            if data is None:
                return None  # comments and keep-alives: we send our own
        if data == b"[DONE]":
            self._done = True
            return None
        self._exchange.chunks += 1
        self._exchange.mark_first_token()
        if b'"usage"' in data and b'"usage":null' not in data and b'"usage": null' not in data:
            return self._on_usage(data)
        if b'"error"' in data and data.startswith(b'{"error"'):
            self._exchange.status = UpstreamError.status_code
        elif not self._engine_reports_usage:
            self._collect(data)
        return b"data: " + data + b"\n\n"

    def _on_usage(self, data: bytes) -> bytes | None:
        chunk = json.loads(data)
        self._saw_usage = True
        self._exchange.record_usage(chunk.get("usage"))
        if self._client_wants_usage:
            return b"data: " + data + b"\n\n"
        if not chunk.get("choices"):
            return None
        del chunk["usage"]
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def _collect(self, data: bytes) -> None:
        chunk = json.loads(data)
        self._last_chunk = chunk
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if isinstance(text, str):
                self._text.append(text)

    async def _synthesize_usage(self) -> bytes | None:
        """Count what the engine did not (llama-cpp-python ignores include_usage).

        An engine that should have reported usage but did not is charged a token per
        chunk, which is what vLLM and llama.cpp stream.
        """
        prompt = self._exchange.prompt_tokens
        if prompt is None:
            prompt = await self._count_prompt()
        if self._engine_reports_usage:
            completion: int | None = self._exchange.chunks
        else:
            completion = await self._count_text("".join(self._text)) if self._text else 0
        if prompt is None or completion is None:
            return None
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        self._exchange.record_usage(usage)
        if not self._client_wants_usage or self._last_chunk is None:
            return None
        last = self._last_chunk
        chunk: dict[str, Any] = {
            k: last[k] for k in ("id", "object", "created", "model") if k in last
        }
        chunk.update(choices=[], usage=usage)
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _data_of(event: bytes) -> bytes | None:
    lines = [line[5:].lstrip() for line in event.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


class RelayResponse(EventSourceResponse):
    """An SSE response that settles its exchange however it ends, even if never iterated.

    If the client is gone before the first chunk, sse-starlette may cancel the body before
    the relay generator starts, so the generator's own `finally` cannot be relied upon.
    """

    def __init__(self, relay: StreamRelay, exchange: Exchange, *, ping_seconds: float) -> None:
        super().__init__(relay.events(), ping=ping_seconds, sep="\n")
        self._relay = relay
        self._exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.close()
            # A relay that never finished was cut short by the client (or by shutdown).
            if self._exchange.status == 200 and not self._relay.completed:
                self._exchange.status = CLIENT_CLOSED
            self._exchange.finish()
