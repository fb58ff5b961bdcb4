"""The SSE relay on fixed bytes: no server, the engine's reads scripted exactly.

The engine's response comes through httpx's `MockTransport`, split into the reads given,
so each case pins what the relay does at a read boundary.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from lowvram.engine.handle import EngineState, ServedModel, StateMixin
from lowvram.gateway.exchange import Endpoint, Exchange
from lowvram.gateway.keystore import KeyRecord
from lowvram.gateway.metrics import Metrics
from lowvram.gateway.relay import StreamRelay
from lowvram.gateway.sse import EventBuffer, data_of
from lowvram.gateway.tokens import TokenCounter

pytestmark = pytest.mark.anyio


def chunk(text: str, **extra: Any) -> bytes:
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "m"}
    body |= {"choices": [{"index": 0, "delta": {"content": text}}]} | extra
    return b"data: " + json.dumps(body).encode() + b"\n\n"


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
DONE = b"data: [DONE]\n\n"


class Reads(httpx.AsyncByteStream):
    """The engine's body, delivered in exactly these reads (with a pause before each)."""

    def __init__(self, reads: Sequence[bytes], pause: float = 0.0) -> None:
        self.reads = reads
        self.pause = pause

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            if self.pause:
                await asyncio.sleep(self.pause)
            yield read


class Engine(StateMixin):
    """A ready engine handle with a tokenizer that counts words (a test double)."""

    base_url = "http://engine"
    api_key = None

    def __init__(self, stream_usage: bool = True) -> None:
        super().__init__()
        self._set_state(EngineState.READY)
        self.model = ServedModel("m", 4096, tokenizer="llamacpp", stream_usage=stream_usage)

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def words(request: httpx.Request) -> httpx.Response:
    text = json.loads(request.content)["input"]
    return httpx.Response(200, json={"tokens": text.split()})


async def relay(
    reads: Sequence[bytes],
    *,
    wants_usage: bool = False,
    stream_usage: bool = True,
    idle_timeout: float = 10,
    pause: float = 0.0,
) -> tuple[list[bytes], Exchange]:
    """Run one relay over the reads; return what the client got, event by event."""
    exchange = Exchange(
        request_id="r1",
        key=KeyRecord("k"),
        endpoint=Endpoint.CHAT,
        stream=True,
        metrics=Metrics(),
        usage_log=None,
    )

    def engine_answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/extras/tokenize":
            return words(request)
        return httpx.Response(200, stream=Reads(reads, pause))

    engine = Engine(stream_usage)
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine_answer)) as client:
        upstream = await client.send(client.build_request("POST", "http://engine/x"), stream=True)
        body = {"messages": [{"role": "user", "content": "one two three"}]}
        stream = StreamRelay(
            upstream,
            exchange,
            counter=TokenCounter(client, engine),
            body=body,
            client_wants_usage=wants_usage,
            engine_reports_usage=stream_usage,
            idle_timeout=idle_timeout,
        )
        sent = b"".join([piece async for piece in stream.events()])
    return [event + b"\n\n" for event in sent.split(b"\n\n") if event], exchange


async def test_one_event_per_read_passes_through_unchanged() -> None:
    reads = [chunk("a"), chunk("b"), chunk("", usage=USAGE, choices=[]), DONE]
    events, exchange = await relay(reads, wants_usage=True)
    assert events == reads
    assert (exchange.prompt_tokens, exchange.completion_tokens, exchange.chunks) == (5, 2, 3)


async def test_an_event_split_across_reads_is_sent_once_whole() -> None:
    whole = chunk("hello")
    reads = [whole[:7], whole[7:20], whole[20:], DONE[:5], DONE[5:]]
    events, _ = await relay(reads)
    assert events == [whole, DONE]


async def test_several_events_in_one_read_are_each_relayed() -> None:
    reads = [chunk("a") + chunk("b") + chunk("c")[:10], chunk("c")[10:] + DONE]
    events, exchange = await relay(reads)
    assert events == [chunk("a"), chunk("b"), chunk("c"), DONE]
    assert exchange.chunks == 3


async def test_crlf_framing_is_normalised() -> None:
    reads = [chunk("a").replace(b"\n", b"\r\n"), b"data: [DONE]\r\n\r\n"]
    events, _ = await relay(reads)
    assert events == [chunk("a"), DONE]


async def test_multi_line_data_and_comments() -> None:
    reads = [b": keep-alive\n\n", b'data: {"choices": \ndata: []}\n\n', DONE]
    events, exchange = await relay(reads)
    assert events == [b'data: {"choices": \n[]}\n\n', DONE]  # our own keep-alives replace theirs
    assert exchange.chunks == 1


async def test_usage_the_client_did_not_ask_for_is_dropped_or_stripped() -> None:
    alone = chunk("", usage=USAGE, choices=[])
    with_choice = chunk("z", usage=USAGE)
    events, exchange = await relay([chunk("a"), with_choice, alone, DONE])
    assert events[0] == chunk("a") and events[-1] == DONE
    stripped = json.loads(events[1][6:])
    assert "usage" not in stripped and stripped["choices"][0]["delta"]["content"] == "z"
    assert len(events) == 3  # the usage-only chunk is gone
    assert exchange.total_tokens == 7


async def test_a_stream_without_done_ends_with_an_error_event_and_done() -> None:
    events, exchange = await relay([chunk("a")])
    assert events[0] == chunk("a") and events[-1] == DONE
    error = json.loads(events[1][6:])["error"]
    assert error["code"] == "upstream_error" and "unfinished" in error["message"]
    assert exchange.status == 502


async def test_a_silent_engine_is_cut_by_the_idle_timer() -> None:
    events, exchange = await relay([chunk("a"), chunk("b")], idle_timeout=0.2, pause=0.5)
    error = json.loads(events[-2][6:])["error"]
    assert error["code"] == "upstream_timeout" and events[-1] == DONE
    assert exchange.status == 504


async def test_usage_is_counted_for_engines_that_do_not_report_it() -> None:
    reads = [chunk("four five"), chunk(" six"), DONE]
    events, exchange = await relay(reads, wants_usage=True, stream_usage=False)
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["completion_tokens"] == 3  # "four five six": the word-counting tokenizer
    assert usage["prompt_tokens"] == exchange.prompt_tokens and usage["prompt_tokens"] > 3
    assert events[:2] == reads[:2] and events[-1] == DONE


def test_event_buffer_keeps_the_incomplete_tail() -> None:
    buffer = EventBuffer()
    data, spans = buffer.feed(b"data: 1\n\ndata: 2")
    assert [data[s:e] for s, e in spans] == [b"data: 1"] and buffer.pending == 7
    data, spans = buffer.feed(b"\n\n")
    assert [data[s:e] for s, e in spans] == [b"data: 2"] and buffer.pending == 0


def test_data_of_joins_data_lines_and_ignores_the_rest() -> None:
    assert data_of(b"event: x\ndata: a\ndata:b\nid: 3") == b"a\nb"
    assert data_of(b": comment") is None
