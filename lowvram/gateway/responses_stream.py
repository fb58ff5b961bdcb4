"""A chat completion stream as a Responses API stream, event by event.

    stream = ResponseStream(request)
    stream.start()              response.created, response.in_progress
    stream.feed(chunk)          for each chat chunk (a parsed `data:` event)
    stream.finish(usage)        the open items' done events, then response.completed
                                (or response.incomplete, cut by max_output_tokens)

Each output item (reasoning, the message, each function call) is announced when its first
delta arrives (`response.output_item.added`), streams its deltas, and is done when the next
item starts or the stream ends; its output index is the order it started in. Events are SSE
with an `event:` line and a `sequence_number`, as OpenAI writes them and its SDK reads them.
"""

from __future__ import annotations

import json
import time
from typing import Any

from lowvram.gateway.errors import APIError, sse_error_event
from lowvram.gateway.responses import (
    base_response,
    call_item,
    finished,
    message_item,
    new_id,
    reasoning_item,
    usage_of,
)


class ResponseStream:
    media_type = "text/event-stream"
    pings = True

    def __init__(self, request: dict[str, Any], response_id: str | None = None) -> None:
        self.id = response_id or new_id()
        self._request = request
        self._created = int(time.time())
        self._seq = 0
        self._output: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        """The item whose deltas arrive now."""
        self._text = ""
        self._reasoning = ""
        self._calls: dict[int, dict[str, Any]] = {}
        self._finish: Any = None

    def start(self) -> bytes:
        response = base_response(self._request, self.id, self._created)
        return self._event("response.created", response=response) + self._event(
            "response.in_progress", response=response
        )

    def feed(self, chunk: dict[str, Any]) -> bytes:
        out: list[bytes] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                out.append(self._reasoning_delta(reasoning))
            if isinstance(delta.get("content"), str) and delta["content"]:
                out.append(self._text_delta(delta["content"]))
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    out.append(self._call_delta(call))
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
        return b"".join(out)

    def finish(self, chat_usage: Any) -> bytes:
        out = self._close()
        response = base_response(self._request, self.id, self._created)
        response["output"] = self._output
        response["usage"] = usage_of(chat_usage)
        finished(response, self._finish)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        return out + self._event(kind, response=response)

    def error(self, error: APIError) -> bytes:
        """An error ends the stream as an event the OpenAI SDK raises (`{"error": ...}`)."""
        return sse_error_event(error)

    # --- items ----------------------------------------------------------------------------

    def _reasoning_delta(self, text: str) -> bytes:
        out = b""
        if self._open is None or self._open["type"] != "reasoning":
            out += self._close()
            out += self._add(reasoning_item(self.id, ""))
        self._reasoning += text
        return out + self._event(
            "response.reasoning_text.delta", **self._where(), content_index=0, delta=text
        )

    def _text_delta(self, text: str) -> bytes:
        out = b""
        if self._open is None or self._open["type"] != "message":
            out += self._close()
            item = message_item(self.id, "", "in_progress")
            item["content"] = []
            out += self._add(item)
            part = {"type": "output_text", "text": "", "annotations": []}
            out += self._event(
                "response.content_part.added", **self._where(), content_index=0, part=part
            )
        self._text += text
        return out + self._event(
            "response.output_text.delta", **self._where(), content_index=0, delta=text, logprobs=[]
        )

    def _call_delta(self, call: dict[str, Any]) -> bytes:
        index = call.get("index", 0)
        function = call.get("function") or {}
        out = b""
        if index not in self._calls:
            out += self._close()
            call_id = call.get("id") or f"call_{index}"
            item = call_item(self.id, index, call_id, function.get("name"), "", "in_progress")
            self._calls[index] = item
            out += self._add(item)
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            self._calls[index]["arguments"] += arguments
            if self._open is self._calls[index]:
                out += self._event(
                    "response.function_call_arguments.delta", **self._where(), delta=arguments
                )
        return out

    def _add(self, item: dict[str, Any]) -> bytes:
        self._output.append(item)
        self._open = item
        return self._event(
            "response.output_item.added", output_index=len(self._output) - 1, item=item
        )

    def _close(self) -> bytes:
        """The open item's done events; it is whole from now on."""
        item, self._open = self._open, None
        if item is None:
            return b""
        where = {"item_id": item["id"], "output_index": self._output.index(item)}
        out = b""
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": self._reasoning}]
            out += self._event(
                "response.reasoning_text.done", **where, content_index=0, text=self._reasoning
            )
        elif item["type"] == "message":
            part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            item["status"] = "incomplete" if self._finish == "length" else "completed"
            out += self._event(
                "response.output_text.done", **where, content_index=0, text=self._text
            )
            out += self._event("response.content_part.done", **where, content_index=0, part=part)
        else:
            item["status"] = "completed"
            out += self._event(
                "response.function_call_arguments.done", **where, arguments=item["arguments"]
            )
        return out + self._event(
            "response.output_item.done", output_index=where["output_index"], item=item
        )

    def _where(self) -> dict[str, Any]:
        assert self._open is not None
        return {"item_id": self._open["id"], "output_index": len(self._output) - 1}

    def _event(self, kind: str, **fields: Any) -> bytes:
        self._seq += 1
        data = {"type": kind, "sequence_number": self._seq, **fields}
        return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
