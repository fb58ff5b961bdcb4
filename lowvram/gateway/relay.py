"""Relay the engine's SSE stream to the client, chunk by chunk, as it arrives.

Events pass through as the engine wrote them; the relay only reads what it must: the
usage chunk (kept for accounting, dropped again if the client did not ask for it), the
final `[DONE]`, and, for engines that cannot report usage in a stream, the text to count.
Once the first byte is out no status code can change, so failures become an SSE event
carrying the OpenAI error object, followed by `data: [DONE]`.

A silent engine is cut by an idle timer rather than the HTTP client's read timeout, which
re-arms a timer on every received chunk (about 7 us of CPU per chunk, bench/).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import anyio
import httpx
from sse_starlette import EventSourceResponse
from starlette.types import Message, Receive, Scope, Send

from lowvram.gateway.errors import APIError, UpstreamError, UpstreamTimeout, sse_error_event
from lowvram.gateway.exchange import CLIENT_CLOSED, Exchange
from lowvram.gateway.sse import DONE, DONE_EVENT, EventBuffer, data_of, is_plain
from lowvram.gateway.tokens import TokenCounter
from lowvram.gateway.upstream import map_transport_error

PASS = object()


class IdleTimer:
    """Calls `on_idle` once nothing has `touch`ed it for `timeout` seconds.

    Touching only stores a time; the timer re-arms itself when it fires early, so a busy
    stream costs one timer per `timeout`, not one per chunk.
    """

    def __init__(self, timeout: float, on_idle: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._on_idle = on_idle
        self._last = self._loop.time()
        self._handle = self._loop.call_later(timeout, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def cancel(self) -> None:
        self._handle.cancel()

    def _check(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._timeout:
            self._on_idle()
        else:
            self._handle = self._loop.call_later(self._timeout - idle, self._check)


class StreamRelay:
    """One engine stream, read once, as bytes for the client.

    `counter` and `body` are there for engines that do not report usage in a stream: the
    relay then counts the prompt and the text it passed on, with the engine's tokenizer.
    """

    def __init__(
        self,
        upstream: httpx.Response,
        exchange: Exchange,
        *,
        counter: TokenCounter,
        body: dict[str, Any],
        client_wants_usage: bool,
        engine_reports_usage: bool,
        idle_timeout: float,
    ) -> None:
        self._upstream = upstream
        self._exchange = exchange
        self._counter = counter
        self._body = body
        self._client_wants_usage = client_wants_usage
        self._engine_reports_usage = engine_reports_usage
        self._idle_timeout = idle_timeout
        self._timed_out = False
        self._closing: asyncio.Future[None] | None = None
        self._done = False
        self._saw_usage = False
        self._text: list[str] = []
        self._last_chunk: dict[str, Any] | None = None
        self.completed = False
        """Whether the client got a complete stream (ending in `[DONE]`), errors included."""

    async def events(self) -> AsyncIterator[bytes]:
        exchange = self._exchange
        timer = IdleTimer(self._idle_timeout, self._expire)
        buffer = EventBuffer()
        try:
            # The response's own stream, not aiter_raw(): two generator layers fewer per
            # chunk; transport errors arrive as httpx exceptions all the same.
            async for received in cast(httpx.AsyncByteStream, self._upstream.stream):
                timer.touch()
                chunk, spans = buffer.feed(received)
                for start, end in spans:
                    out = self._on_event(chunk[start:end])
                    if out is PASS:
                        # Usually one read is one event: forward it without copying.
                        whole = start == 0 and end + 2 == len(chunk)
                        yield chunk if whole else chunk[start : end + 2]
                    elif isinstance(out, bytes):
                        yield out
            if not self._done:
                error: APIError = UpstreamError("The engine ended the stream unfinished.")
                if self._timed_out:
                    error = self._idle_error()
                exchange.status = error.status_code
                yield sse_error_event(error)
            elif not self._saw_usage:
                usage_event = await self._synthesize_usage()
                if usage_event is not None:
                    yield usage_event
            yield DONE
            self.completed = True
        except httpx.HTTPError as exc:
            error = self._idle_error() if self._timed_out else map_transport_error(exc)
            exchange.status = error.status_code
            yield sse_error_event(error)
            yield DONE
            self.completed = True
        finally:
            timer.cancel()
            await self.close()

    def _idle_error(self) -> APIError:
        return UpstreamTimeout(f"The engine sent nothing for {self._idle_timeout:g} s.")

    def _expire(self) -> None:
        """Closing the engine's response wakes the pending read with an error."""
        self._timed_out = True
        self._closing = asyncio.ensure_future(self._upstream.aclose())

    async def close(self) -> None:
        """Close the engine's response, which makes the engine abort the generation."""
        if not self._upstream.is_closed:
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()

    def _on_event(self, event: bytes) -> bytes | object | None:
        """PASS to forward the event as it came, bytes to send instead, None to drop it."""
        plain = is_plain(event)
        if not plain:
            data = data_of(event)
            if data is None:
                return None  # comments and keep-alives: we send our own
            event = b"data: " + data
        if event == DONE_EVENT:
            self._done = True
            return None
        exchange = self._exchange
        exchange.chunks += 1
        exchange.mark_first_token()
        if b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event:
            return self._on_usage(event[6:])
        if event.startswith(b'data: {"error"'):
            exchange.status = UpstreamError.status_code
        elif not self._engine_reports_usage:
            self._collect(event[6:])
        return PASS if plain else event + b"\n\n"

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
        """Count what the engine did not report in the stream.

        An engine that should have reported usage but did not is charged a token per
        chunk, which is what vLLM and llama.cpp stream.
        """
        exchange = self._exchange
        prompt = exchange.prompt_tokens
        if prompt is None:
            prompt = await self._counter.count_prompt(exchange.endpoint, self._body)
        if self._engine_reports_usage:
            completion: int | None = exchange.chunks
        else:
            text = "".join(self._text)
            completion = await self._counter.count_text(text) if text else 0
        if prompt is None or completion is None:
            return None
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        exchange.record_usage(usage)
        if not self._client_wants_usage or self._last_chunk is None:
            return None
        last = self._last_chunk
        chunk: dict[str, Any] = {
            k: last[k] for k in ("id", "object", "created", "model") if k in last
        }
        chunk.update(choices=[], usage=usage)
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


class RelayResponse(EventSourceResponse):
    """An SSE response that finishes its exchange however it ends, even if never iterated.

    If the client is gone before the first chunk, sse-starlette may cancel the body before
    the relay generator starts, so the generator's own `finally` cannot be relied upon.
    """

    def __init__(self, relay: StreamRelay, exchange: Exchange, *, ping_seconds: float) -> None:
        super().__init__(relay.events(), ping=ping_seconds, sep="\n")
        self._relay = relay
        self._exchange = exchange

    async def _send_with_timeout(self, send: Send, message: Message) -> None:
        # sse-starlette opens an anyio cancel scope per chunk to apply `send_timeout`, which
        # we do not set: a plain send saves that scope's cost on every chunk.
        if self.send_timeout is None:
            await send(message)
        else:
            await super()._send_with_timeout(send, message)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._relay.close()
            # A relay that never finished was cut short by the client (or by shutdown).
            if self._exchange.status == 200 and not self._relay.completed:
                self._exchange.status = CLIENT_CLOSED
            self._exchange.finish()
