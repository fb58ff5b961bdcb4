"""Relay the engine's SSE stream to the client, as it arrives: one `send` per engine read.

    StreamRelay     reads the engine's stream, accounts for it, and turns each read into the
                    bytes the client gets (usually the read itself: no copy)
    RelayResponse   the ASGI response that sends them, pings a silent engine's client,
                    notices a client hanging up, and finishes the request's exchange

Events pass through as the engine wrote them; the relay only reads what it must: the
usage chunk (kept for accounting, dropped again if the client did not ask for it), the end
of the stream, and enough of every event to know it is JSON (its first and last byte).
Once the first byte is out no status code can change, so failures become an SSE event
carrying the OpenAI error object, followed by `data: [DONE]`; the engine's response is
closed, which makes it stop generating.

A silent engine is cut by an idle timer rather than the HTTP client's read timeout, which
re-arms a timer on every received chunk (about 7 us of CPU per chunk, bench/).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Callable
from typing import Any, Protocol, cast

import anyio
import httpx
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from lowvram.gateway.errors import (
    APIError,
    GatewayShuttingDown,
    UpstreamError,
    UpstreamTimeout,
    sse_error_event,
)
from lowvram.gateway.exchange import CLIENT_CLOSED, Exchange
from lowvram.gateway.reasoning import MARK as REASONING
from lowvram.gateway.reasoning import mirror_reasoning
from lowvram.gateway.sse import DONE, DONE_EVENT, EventBuffer, data_of
from lowvram.gateway.tokens import TokenCounter
from lowvram.gateway.upstream import clean_message, map_transport_error, replica_lost

PASS = object()
"""What an event handler returns to forward the event as the engine wrote it."""
_BRACE, _CLOSE = ord("{"), ord("}")


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


class Translation(Protocol):
    """Turns the engine's chat (or completions) chunks into another API's stream: the
    Responses API's events (responses_stream.py), Ollama's NDJSON lines (ollama.py)."""

    media_type: str
    pings: bool
    """Whether SSE comment lines may keep the client's connection alive."""

    def start(self) -> bytes: ...

    def feed(self, chunk: dict[str, Any]) -> bytes: ...

    def finish(self, usage: Any) -> bytes: ...

    def error(self, error: APIError) -> bytes: ...


class _Garbage(Exception):
    """The engine sent something that is not what its protocol allows."""

    before = b""
    """The events of the same read that came before it, still owed to the client."""


class StreamRelay:
    """One engine stream, read once, as bytes for the client.

    The engine streams chat or completions chunks: `data:` events ending in `[DONE]`, usage
    in a chunk of its own. They pass on as the engine wrote them, unless `translate` turns
    them into a Responses API stream (typed `event:` events ending with
    `response.completed`, usage inside it, no `[DONE]`; responses_stream.py).

    `counter` and `body` serve engines that report no usage in a stream: the relay then
    counts the prompt with the engine's tokenizer and charges a token per chunk.
    """

    def __init__(
        self,
        upstream: httpx.Response,
        exchange: Exchange,
        *,
        counter: TokenCounter,
        body: dict[str, Any],
        client_wants_usage: bool,
        idle_timeout: float,
        max_event_bytes: int,
        translate: Translation | None = None,
    ) -> None:
        self._upstream = upstream
        self._exchange = exchange
        self._counter = counter
        self._body = body
        self._client_wants_usage = client_wants_usage
        self._idle_timeout = idle_timeout
        self._max_event_bytes = max_event_bytes
        self._translate = translate
        self._responses = translate is not None
        self._timed_out = False
        self._closing: asyncio.Future[None] | None = None
        self._done = False
        self._saw_usage = False
        self._failed = False
        """The engine sent an error event."""
        self._last_chunk: dict[str, Any] | None = None
        self.completed = False
        """Whether the client got a whole stream (its end, or an error event), not a cut one."""

    async def batches(self) -> AsyncGenerator[bytes, None]:
        """What the client gets for each engine read: complete events, in one piece."""
        timer = IdleTimer(self._idle_timeout, self._expire)
        lease = self._exchange.lease
        if lease is not None:
            lease.on_lost(self._expire)  # the pool took the engine out before its first event
        buffer = EventBuffer()
        on_event = self._on_event
        if self._translate is not None:
            yield self._translate.start()
        try:
            # The response's own stream, not aiter_raw(): two generator layers fewer per
            # read; transport errors arrive as httpx exceptions all the same.
            async for received in cast(httpx.AsyncByteStream, self._upstream.stream):
                timer.touch()
                chunk, spans = buffer.feed(received)
                if buffer.pending > self._max_event_bytes:
                    raise _Garbage(
                        f"The engine sent an event over {self._max_event_bytes} bytes long."
                    )
                if spans:
                    out = self._relay_read(chunk, spans, on_event)
                    if out:
                        yield out
            ending = await self._ending()
        except httpx.HTTPError as exc:
            ending = self.end_with(self._cut_error() or map_transport_error(exc))
        except _Garbage as exc:
            ending = exc.before + self.end_with(UpstreamError(str(exc)))
        finally:
            timer.cancel()
            await self.close()
        # The usage row is committed before the client has the whole answer.
        await self._exchange.settle()
        yield ending
        self.completed = True

    def _relay_read(
        self, chunk: bytes, spans: list[tuple[int, int]], on_event: Callable[[bytes], object]
    ) -> bytes:
        """Every complete event of one read; the read itself when all pass unchanged."""
        last = spans[-1][1] + 2
        if self._only_tokens(chunk, spans):
            self._exchange.chunks += len(spans)
            return chunk if last == len(chunk) else chunk[:last]
        pieces: list[bytes] | None = None
        for i, (start, end) in enumerate(spans):
            try:
                out = on_event(chunk[start:end])
            except _Garbage as exc:
                exc.before = b"".join(pieces) if pieces is not None else chunk[:start]
                raise
            if out is PASS:
                if pieces is not None:
                    pieces.append(chunk[start : end + 2])
                continue
            if pieces is None:
                pieces = [chunk[:start]] if i else []
            if isinstance(out, bytes):
                pieces.append(out)
        if pieces is not None:
            return b"".join(pieces)
        return chunk if last == len(chunk) else chunk[:last]

    def _only_tokens(self, chunk: bytes, spans: list[tuple[int, int]]) -> bool:
        """Whether the read holds only what most reads hold, token chunks that pass as they
        are; checked with one search of the read for what is rare, and by index for each
        event (one `data: {...}` line): no slice, no call per event. Anything else takes
        the event-by-event path (`_on_event`)."""
        if (
            self._responses
            or self._last_chunk is None
            or b'"usage"' in chunk
            or b"[DONE]" in chunk
            or b'{"error"' in chunk
            or REASONING in chunk
        ):
            return False
        for start, end in spans:
            if (
                not chunk.startswith(b"data: {", start)
                or chunk[end - 1] != _CLOSE
                or chunk.find(b"\n", start, end) >= 0
            ):
                return False
        return True

    async def _ending(self) -> bytes:
        """The stream's last bytes once the engine is done: usage we counted, `[DONE]`."""
        if not self._done:
            error = UpstreamError("The engine ended the stream unfinished.")
            return self.end_with(self._cut_error() or error)
        if self._translate is not None:
            if self._failed:
                return b""  # the error event ended the response
            if not self._saw_usage:
                await self._synthesize_usage()
            exchange = self._exchange
            usage = {
                "prompt_tokens": exchange.prompt_tokens,
                "completion_tokens": exchange.completion_tokens,
            }
            return self._translate.finish(usage)
        if self._saw_usage:
            return DONE
        return (await self._synthesize_usage() or b"") + DONE

    @property
    def media_type(self) -> bytes:
        kind = self._translate.media_type if self._translate else "text/event-stream"
        return kind.encode() + b"; charset=utf-8"

    @property
    def pings(self) -> bool:
        return self._translate.pings if self._translate else True

    def end_with(self, error: APIError) -> bytes:
        """Settle the stream with `error`: its event (and `[DONE]` where the dialect has it)."""
        self._exchange.status = error.status_code
        if self._translate is not None:
            return self._translate.error(error)
        return sse_error_event(error) + DONE

    def _cut_error(self) -> APIError | None:
        """Why the gateway cut the engine's stream, if it did."""
        lease = self._exchange.lease
        if lease is not None and lease.lost:
            return replica_lost()
        if self._timed_out:
            return UpstreamTimeout(f"The engine sent nothing for {self._idle_timeout:g} s.")
        return None

    def _expire(self) -> None:
        """Silent too long, or taken out by the pool: closing the engine's response wakes
        the pending read with an error."""
        self._timed_out = True
        self._closing = asyncio.ensure_future(self._upstream.aclose())

    async def close(self) -> None:
        """Close the engine's response, which makes the engine abort the generation."""
        if not self._upstream.is_closed:
            with anyio.CancelScope(shield=True):
                await self._upstream.aclose()

    def _on_event(self, event: bytes) -> object:
        """PASS to forward the event as it came, bytes to send instead, None to drop it.

        This runs for every token of every stream: each check is a byte comparison or a
        substring search, and what is rare (usage, errors, the first chunk) comes last.
        """
        plain = event.startswith(b"data: ") and b"\n" not in event  # what engines write
        if not plain:
            data = data_of(event)
            if data is None:
                return None  # comments and keep-alives: we send our own
            event = b"data: " + data
        if event == DONE_EVENT:
            self._done = True
            return None
        if len(event) < 8 or event[6] != _BRACE or event[-1] != _CLOSE:
            raise _Garbage("The engine sent an event that is not JSON.")
        exchange = self._exchange
        exchange.chunks += 1
        if exchange.chunks == 1:
            exchange.mark_first_token()
        if b'"usage"' in event and b'"usage":null' not in event and b'"usage": null' not in event:
            return self._on_usage(event[6:])
        if event.startswith(b'data: {"error"'):
            self._exchange.status = UpstreamError.status_code
            self._failed = True
            error = engine_stream_error(event[6:])
            return self._translate.error(error) if self._translate else sse_error_event(error)
        if self._last_chunk is None:
            self._last_chunk = _json(event[6:])  # its id and model, for a usage chunk of ours
        if self._translate is not None:
            return self._translate.feed(_json(event[6:]))
        if REASONING in event:
            chunk = _json(event[6:])
            if mirror_reasoning(chunk):
                return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"
        return PASS if plain else event + b"\n\n"

    def _on_usage(self, data: bytes) -> bytes | None:
        chunk = _json(data)
        self._saw_usage = True
        self._exchange.record_usage(chunk.get("usage"))
        if self._translate is not None:
            return self._translate.feed(chunk)  # its usage goes in response.completed
        if self._client_wants_usage:
            return b"data: " + data + b"\n\n"
        if not chunk.get("choices"):
            return None
        del chunk["usage"]
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def _synthesize_usage(self) -> bytes | None:
        """The usage an engine did not report in its stream: the prompt counted with the
        engine's tokenizer, a token per chunk (what vLLM and llama.cpp stream)."""
        exchange = self._exchange
        prompt = exchange.prompt_tokens
        if prompt is None:
            prompt = await self._counter.count_prompt(exchange.engine_endpoint, self._body)
        if prompt is None:
            return None
        completion = exchange.chunks
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


def _json(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise _Garbage("The engine sent an event that is not JSON.") from None
    if not isinstance(value, dict):
        raise _Garbage("The engine sent an event that is not a JSON object.")
    return value


def engine_stream_error(data: bytes) -> APIError:
    """The engine's own error event, with its message cleaned of paths and tracebacks:
    `{"error": {"message": ...}}` (chat streams) or a Responses API `{"type": "error",
    "message": ...}` event."""
    try:
        event = json.loads(data)
    except (ValueError, RecursionError):
        event = None
    if not isinstance(event, dict):
        event = {}
    error = event.get("error", event if event.get("type") == "error" else None)
    message = error.get("message") if isinstance(error, dict) else error
    return UpstreamError(f"The engine failed: {clean_message(str(message or 'no message'))}")


_HEADERS = [
    (b"cache-control", b"no-store"),
    (b"x-accel-buffering", b"no"),  # no buffering proxy in front may hold the stream back
]
PING = b": ping\n\n"


class RelayResponse(Response):
    """The SSE response of a relayed stream; finishes its exchange however it ends.

    Besides sending what the relay yields, one watcher task per stream waits for the
    client to hang up (then closes the engine's response, so the generation stops) and
    sends a comment every `ping_seconds` while nothing else was sent. When the server's
    drain time is over and it cancels what still runs, the client gets an error event and
    `[DONE]` rather than a cut connection.
    """

    media_type = "text/event-stream"

    def __init__(self, relay: StreamRelay, exchange: Exchange, *, ping_seconds: float) -> None:
        super().__init__(status_code=200)  # what handlers return; __call__ sends our headers
        self._relay = relay
        self._exchange = exchange
        self._ping_seconds = ping_seconds if relay.pings else 0.0
        self._last_sent = 0.0
        self._gone_early = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None
        batches = self._relay.batches()
        try:
            headers = [(b"content-type", self._relay.media_type), *_HEADERS]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            self._last_sent = loop.time()
            watcher = loop.create_task(self._watch(receive, send))
            async for batch in batches:
                await send({"type": "http.response.body", "body": batch, "more_body": True})
                self._last_sent = loop.time()
                if self._gone_early:
                    break
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not self._gone_early and not self._relay.completed:
                await self._shutting_down(send)
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
            await batches.aclose()  # its timer and the engine's response, now
            await self._relay.close()
            if self._gone_early or (self._exchange.status == 200 and not self._relay.completed):
                self._exchange.status = CLIENT_CLOSED
            self._exchange.finish()

    async def _shutting_down(self, send: Send) -> None:
        """The server stops and will not wait longer: end the stream properly."""
        error = GatewayShuttingDown("The gateway is shutting down; the stream was cut.")
        body = self._relay.end_with(error)
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _watch(self, receive: Receive, send: Send) -> None:
        """The client hanging up stops the engine; a silent engine's client gets pings."""
        loop = asyncio.get_running_loop()
        timeout = self._ping_seconds or None
        waiting: asyncio.Task[Message] = loop.create_task(_receive(receive))
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=timeout)
                if done:
                    if waiting.result()["type"] == "http.disconnect":
                        self._gone_early = not self._relay.completed
                        await self._relay.close()  # the pending engine read fails at once
                        return
                    waiting = loop.create_task(_receive(receive))
                elif timeout and loop.time() - self._last_sent >= timeout:
                    # uvicorn writes a message whole before it awaits, so a ping lands
                    # between two events, never inside one.
                    await send({"type": "http.response.body", "body": PING, "more_body": True})
                    self._last_sent = loop.time()
        finally:
            waiting.cancel()


async def _receive(receive: Receive) -> Message:
    return await receive()
