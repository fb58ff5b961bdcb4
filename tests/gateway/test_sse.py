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
from lowvram.gateway.responses_stream import ResponseStream
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

    def __init__(self) -> None:
        super().__init__()
        self._set_state(EngineState.READY)
        self.model = ServedModel("m", 4096, tokenizer="llamacpp")

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


def count_words(request: httpx.Request) -> httpx.Response:
    """llama.cpp's server's counting endpoints, counting words (a test double)."""
    body = json.loads(request.content)
    words = " ".join(str(m["content"]) for m in body["messages"]).split()
    return httpx.Response(200, json={"input_tokens": len(words)})


async def relay(
    reads: Sequence[bytes],
    *,
    wants_usage: bool = False,
    idle_timeout: float = 10,
    pause: float = 0.0,
    endpoint: Endpoint = Endpoint.CHAT,
    max_event_bytes: int = 1 << 20,
    batches: list[bytes] | None = None,
) -> tuple[list[bytes], Exchange]:
    """Run one relay over the reads; return what the client got, event by event (and each
    piece sent, in `batches`)."""
    exchange = Exchange(
        request_id="r1",
        key=KeyRecord("k"),
        endpoint=endpoint,
        stream=True,
        metrics=Metrics(),
        usage_log=None,
    )
    exchange.engine_endpoint = Endpoint.CHAT if endpoint is Endpoint.RESPONSES else endpoint

    def engine_answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/chat/completions/input_tokens":
            return count_words(request)
        return httpx.Response(200, stream=Reads(reads, pause))

    engine = Engine()
    async with httpx.AsyncClient(transport=httpx.MockTransport(engine_answer)) as client:
        upstream = await client.send(client.build_request("POST", "http://engine/x"), stream=True)
        body = {"messages": [{"role": "user", "content": "one two three"}]}
        stream = StreamRelay(
            upstream,
            exchange,
            counter=TokenCounter(client, engine),
            body=body,
            client_wants_usage=wants_usage,
            idle_timeout=idle_timeout,
            max_event_bytes=max_event_bytes,
            translate=ResponseStream({"model": "m", "input": "x"}, "resp_1")
            if endpoint is Endpoint.RESPONSES
            else None,
        )
        pieces = [piece async for piece in stream.batches()]
        if batches is not None:
            batches.extend(pieces)
        sent = b"".join(pieces)
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
    events, exchange = await relay(reads, wants_usage=True)
    usage = json.loads(events[-2][6:])["usage"]
    assert usage["prompt_tokens"] == 3  # "one two three", by the engine's (word) counter
    assert usage["completion_tokens"] == 2  # a token per chunk
    assert events[-2].startswith(b'data: {"id": "c1", "object": "chat.completion.chunk"')
    assert exchange.total_tokens == 5
    assert events[:2] == reads[:2] and events[-1] == DONE


def typed(events: list[bytes]) -> list[dict[str, Any]]:
    """Responses API events: their `event:` line must name their data's type."""
    parsed = []
    for event in events:
        head, data = event.split(b"\n", 1)
        body = json.loads(data.removeprefix(b"data: "))
        assert head == b"event: " + body["type"].encode()
        parsed.append(body)
    return parsed


async def test_a_chat_stream_becomes_a_responses_stream() -> None:
    reads = [
        chunk("Pa"),
        chunk("ris", choices=[{"index": 0, "delta": {"content": "ris"}, "finish_reason": "stop"}]),
        chunk("", usage=USAGE, choices=[]),
        DONE,
    ]
    events, exchange = await relay(reads, endpoint=Endpoint.RESPONSES)
    kinds = [e["type"] for e in typed(events)]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = typed(events)[-1]["response"]
    assert done["output"][0]["content"][0]["text"] == "Paris" and done["status"] == "completed"
    assert done["usage"]["input_tokens"] == 5 and done["usage"]["output_tokens"] == 2
    assert [e["sequence_number"] for e in typed(events)] == list(range(1, 11))
    assert (exchange.prompt_tokens, exchange.completion_tokens) == (5, 2)


async def test_streamed_tool_calls_become_function_call_items_and_a_cut_is_incomplete() -> None:
    def call(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": finish}
        return chunk("", choices=[choice])

    reads = [
        call({"index": 0, "id": "call_1", "function": {"name": "get_weather", "arguments": ""}}),
        call({"index": 0, "function": {"arguments": '{"city": '}}),
        call({"index": 0, "function": {"arguments": '"Par'}}, finish="length"),
        DONE,
    ]
    events, _ = await relay(reads, endpoint=Endpoint.RESPONSES)
    parsed = typed(events)
    deltas = [e["delta"] for e in parsed if e["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"city": ', '"Par']
    item = parsed[-1]["response"]["output"][0]
    assert item["type"] == "function_call" and item["call_id"] == "call_1"
    assert item["name"] == "get_weather" and item["arguments"] == '{"city": "Par'
    assert parsed[-1]["type"] == "response.incomplete"
    assert parsed[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_a_responses_stream_cut_short_ends_with_an_error_event() -> None:
    events, exchange = await relay([chunk("Pa")], endpoint=Endpoint.RESPONSES)
    assert DONE not in events
    assert json.loads(events[-1][6:])["error"]["code"] == "upstream_error"
    assert exchange.status == 502


def test_event_buffer_keeps_the_incomplete_tail() -> None:
    buffer = EventBuffer()
    data, spans = buffer.feed(b"data: 1\n\ndata: 2")
    assert [data[s:e] for s, e in spans] == [b"data: 1"] and buffer.pending == 7
    data, spans = buffer.feed(b"\n\n")
    assert [data[s:e] for s, e in spans] == [b"data: 2"] and buffer.pending == 0


def test_data_of_joins_data_lines_and_ignores_the_rest() -> None:
    assert data_of(b"event: x\ndata: a\ndata:b\nid: 3") == b"a\nb"
    assert data_of(b": comment") is None


async def test_all_events_of_one_read_go_out_as_that_read() -> None:
    read = chunk("a") + chunk("b") + chunk("c")
    sent: list[bytes] = []
    events, _ = await relay([read, DONE], batches=sent)
    assert sent[0] is read  # one send for the read, and not a copy of it
    assert events == [chunk("a"), chunk("b"), chunk("c"), DONE]


async def test_a_dropped_event_in_a_read_keeps_the_others_in_order() -> None:
    usage = chunk("", usage=USAGE, choices=[])
    sent: list[bytes] = []
    await relay([chunk("a") + usage + chunk("b"), DONE], batches=sent)
    assert sent[0] == chunk("a") + chunk("b")


@pytest.mark.parametrize(
    "bad",
    [
        b"data: <html>oops</html>\n\n",
        b"data: \xff\xfe\x00garbage\n\n",
        b'data: {"id": "x", "usage": {"prompt_tokens": 1, oops}\n\n',
    ],
)
async def test_engine_garbage_mid_stream_is_an_error_event_and_done(bad: bytes) -> None:
    events, exchange = await relay([chunk("a"), bad, chunk("b"), DONE])
    assert events[0] == chunk("a") and events[-1] == DONE and len(events) == 3
    error = json.loads(events[1][6:])["error"]
    assert error["code"] == "upstream_error" and "JSON" in error["message"]
    assert exchange.status == 502


async def test_an_endless_event_is_cut_at_the_bound() -> None:
    endless = [b"data: {" + b"x" * 4096 for _ in range(100)]
    events, exchange = await relay(endless, max_event_bytes=64 * 1024)
    assert events[-1] == DONE
    assert "over 65536 bytes" in json.loads(events[-2][6:])["error"]["message"]
    assert exchange.status == 502


async def test_an_engine_error_event_is_cleaned_of_paths() -> None:
    raw = b'data: {"error": {"message": "failed at /opt/llama/x.cpp:12", "code": 500}}\n\n'
    events, exchange = await relay([chunk("a"), raw, DONE])
    error = json.loads(events[1][6:])["error"]
    assert "/opt" not in error["message"] and error["code"] == "upstream_error"
    assert exchange.status == 502


async def test_token_reads_after_the_first_go_out_whole_and_are_counted() -> None:
    second = chunk("b") + chunk("c") + chunk("d")
    sent: list[bytes] = []
    events, exchange = await relay([chunk("a"), second, DONE], batches=sent)
    assert sent[1] is second and exchange.chunks == 4
    assert events[-1] == DONE


async def test_garbage_among_token_reads_is_still_caught() -> None:
    bad = chunk("b") + b'data: {"id": "c1", "oops\n\n'
    events, exchange = await relay([chunk("a"), bad, DONE])
    assert events[:2] == [chunk("a"), chunk("b")] and events[-1] == DONE
    assert "not JSON" in json.loads(events[2][6:])["error"]["message"]
    assert exchange.status == 502
