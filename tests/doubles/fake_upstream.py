"""A TEST DOUBLE of an OpenAI-compatible engine, scripted per request.

Not an engine: it never stands in for vLLM or llama.cpp in an engine test. It exists to
produce on cue what real engines do only sometimes: slow tokens, an error mid-stream, a
crash, a hang, a refusal; and to record what the gateway sent and whether it hung up.

A request scripts it with a `fake` object in its JSON body (the gateway passes unknown
fields through untouched):

    {"fake": {"tokens": 20, "ttft": 0.2, "delay": 0.01,
              "error_after": 5,      # SSE error event after 5 chunks
              "drop_after": 5,       # close the connection after 5 chunks (a crash)
              "hang": true,          # never answer
              "status": 500,         # refuse with this status
              "garbage": "html",     # answer 200 with a body that is not JSON
              "garbage_after": 2,    # stream: a data event that is not JSON after 2 chunks
              "endless": 1000000,    # stream: this many bytes with no event boundary
              "die": true,           # exit the process at once (run as a process only)
              "think": "reasoning"}} # chat: 3 thinking tokens first, under this field
                                     # (vLLM's "reasoning", llama.cpp's "reasoning_content")

`name`, when set, is the `system_fingerprint` of its JSON answers: which of several
doubles (replicas behind one gateway) answered. `always` is merged into every request's
script (a replica that always sends garbage, or is always slow). `models_answer`, when
set, is what `/v1/models` answers (a broken upstream's list); `POST /fake/sick` sets it to
garbage (a replica whose health check starts failing). `tokenize_garbage` makes
`/tokenize` answer 200 with a body that is not JSON, `tokenize_hang` never answer.

Tokens are words: "w0 w1 w2 ...". Prompt tokens are whitespace-separated words plus 3 per
chat message, the same rule `/tokenize` uses, so tests can predict every count.

`flavor="llamacpp"` makes it look like llama.cpp's server to the gateway's probe: `/tokenize`
takes `content` and lists tokens, and `/v1/chat/completions/input_tokens` counts a chat
request. `stream_usage=False` makes it ignore `stream_options.include_usage`, as some
engines do.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "fake-model"
THOUGHT = "let me think"
SCRIPTED_ERROR = (
    b'data: {"error": {"message": "scripted failure", "type": "InternalServerError",'
    b' "param": null, "code": 500}}\n\n'
)


@dataclass
class Record:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    chunks_sent: int = 0
    finished: bool = False
    aborted: bool = False


@dataclass
class FakeUpstream:
    api_key: str | None = None
    context_length: int = 4096
    flavor: str = "vllm"
    stream_usage: bool = True
    models_answer: Any = None
    tokenize_garbage: bool = False
    tokenize_hang: bool = False
    name: str | None = None
    always: dict[str, Any] = field(default_factory=dict)
    may_die: bool = False
    """Whether `die` may end the process: only when the double runs as one of its own."""
    records: list[Record] = field(default_factory=list)

    def last(self, path: str = "/v1/chat/completions") -> Record:
        return [r for r in self.records if r.path == path][-1]

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/models", self.models),
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
                Route("/tokenize", self.tokenize, methods=["POST"]),
                Route("/v1/chat/completions/input_tokens", self.input_tokens, methods=["POST"]),
                Route("/fake/sick", self.sick, methods=["POST"]),
            ]
        )

    # --- helpers -----------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        return (
            self.api_key is None or request.headers.get("authorization") == f"Bearer {self.api_key}"
        )

    @staticmethod
    def count_messages(messages: list[dict[str, Any]]) -> int:
        return sum(len(str(m.get("content") or "").split()) + 3 for m in messages)

    # --- endpoints ---------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": {"message": "bad key"}}, status_code=401)
        if self.models_answer is not None:
            return JSONResponse(self.models_answer)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": MODEL,
                        "object": "model",
                        "owned_by": "vllm" if self.flavor == "vllm" else "me",
                        "max_model_len": self.context_length,
                    }
                ],
            }
        )

    async def sick(self, request: Request) -> Response:
        self.models_answer = {"no": "models"}
        return JSONResponse({"sick": True})

    async def input_tokens(self, request: Request) -> Response:
        if self.flavor != "llamacpp":
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        body = await request.json()
        self.records.append(Record(request.url.path, body, dict(request.headers)))
        return JSONResponse({"input_tokens": self.count_messages(body["messages"])})

    async def tokenize(self, request: Request) -> Response:
        body = await request.json()
        self.records.append(Record("/tokenize", body, dict(request.headers)))
        if self.tokenize_hang or (body.get("fake") or {}).get("hang"):
            await sleep_unless_disconnected(request, 3600)
            return Response(status_code=499)
        if self.tokenize_garbage:
            return Response(b"<html>tokens</html>", media_type="application/json")
        if self.flavor == "llamacpp":
            return JSONResponse({"tokens": list(range(len(str(body["content"]).split())))})
        if "messages" in body:
            count = self.count_messages(body["messages"])
        else:
            count = len(str(body.get("prompt", "")).split())
        return JSONResponse({"count": count, "max_model_len": self.context_length, "tokens": []})

    async def embeddings(self, request: Request) -> Response:
        body = await request.json()
        self.records.append(Record("/v1/embeddings", body, dict(request.headers)))
        return JSONResponse(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": MODEL,
                "usage": {"prompt_tokens": 2, "total_tokens": 2},
            }
        )

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def _generate(self, request: Request, *, chat: bool) -> Response:
        if not self._authorized(request):
            return JSONResponse({"error": {"message": "bad key", "type": "auth"}}, status_code=401)
        body = await request.json()
        record = Record(request.url.path, body, dict(request.headers))
        self.records.append(record)
        script = self.always | (body.get("fake") or {})
        if script.get("die") and self.may_die:
            os._exit(1)  # as an engine dies of a request: no answer, connections reset
        if script.get("hang"):
            await sleep_unless_disconnected(request, 3600)
            record.aborted = True
            return Response(status_code=499)
        if script.get("garbage"):
            return Response(b"<html><body>Bad Gateway</body></html>", media_type="text/html")
        if "endless" in script:
            endless = int(script["endless"])
            pieces = (b"x" * 65536 for _ in range(endless // 65536 + 1))
            return StreamingResponse(pieces, media_type="text/event-stream")
        if "status" in script:
            return JSONResponse(
                {
                    "error": {
                        "message": f"scripted {script['status']}",
                        "type": "BadRequestError",
                        "param": None,
                        "code": script["status"],
                    }
                },
                status_code=script["status"],
            )
        n_tokens = min(int(script.get("tokens", 5)), int(body.get("max_tokens") or 10**9))
        prompt_tokens = (
            self.count_messages(body["messages"]) if chat else len(str(body["prompt"]).split())
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n_tokens,
            "total_tokens": prompt_tokens + n_tokens,
        }
        tool_call = tool_call_for(body) if chat else None
        if not body.get("stream"):
            wait = float(script.get("ttft", 0)) + n_tokens * float(script.get("delay", 0))
            if not await sleep_unless_disconnected(request, wait):
                record.aborted = True
                return Response(status_code=499)
            record.finished = True
            text = " ".join(f"w{i}" for i in range(n_tokens))
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if script.get("think"):
                message[script["think"]] = THOUGHT
            if tool_call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [tool_call]}
            choice: dict[str, Any] = (
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": "tool_calls" if tool_call else "stop",
                }
                if chat
                else {"index": 0, "text": text, "finish_reason": "stop"}
            )
            return JSONResponse(
                {
                    "id": "cmpl-fake",
                    "object": "chat.completion" if chat else "text_completion",
                    "created": int(time.time()),
                    "model": MODEL,
                    "system_fingerprint": self.name,
                    "choices": [choice],
                    "usage": usage,
                }
            )
        include_usage = self.stream_usage and bool(
            (body.get("stream_options") or {}).get("include_usage")
        )
        if tool_call is not None:
            return StreamingResponse(
                self._stream_tool_call(tool_call, usage, include_usage),
                media_type="text/event-stream",
            )
        return StreamingResponse(
            self._stream(record, script, n_tokens, usage, include_usage, chat),
            media_type="text/event-stream",
        )

    async def _stream(
        self,
        record: Record,
        script: dict[str, Any],
        n_tokens: int,
        usage: dict[str, int],
        include_usage: bool,
        chat: bool,
    ) -> Any:
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = (
            f'{{"id":"chatcmpl-fake","object":"{kind}","created":{created},'
            f'"model":"{MODEL}","choices":['
        )
        delay = float(script.get("delay", 0))
        crashed = False
        loop = asyncio.get_running_loop()
        try:
            await asyncio.sleep(float(script.get("ttft", 0)))
            if chat and script.get("think"):
                for word in THOUGHT.split(" "):
                    delta = json.dumps({script["think"]: word + " "})
                    choice = f'{{"index":0,"delta":{delta},"finish_reason":null}}'
                    yield f"data: {head}{choice}]}}\n\n".encode()
            started = loop.time()
            for i in range(n_tokens):
                if i == script.get("error_after"):
                    yield SCRIPTED_ERROR
                    yield b"data: [DONE]\n\n"
                    record.finished = True
                    return
                if i == script.get("drop_after"):
                    crashed = True
                    raise ConnectionAbortedError("scripted crash")
                if i == script.get("garbage_after"):
                    yield b"data: <html>oops</html>\n\n"
                piece = f"w{i}" if i == 0 else f" w{i}"
                choice = (
                    f'{{"index":0,"delta":{{"content":"{piece}"}},"finish_reason":null}}'
                    if chat
                    else f'{{"index":0,"text":"{piece}","finish_reason":null}}'
                )
                yield f"data: {head}{choice}]}}\n\n".encode()
                record.chunks_sent += 1
                if delay:
                    # On a fixed schedule, as an engine emits tokens: a slow consumer or a
                    # late wake-up does not slow the pace down.
                    await asyncio.sleep(max(0.0, started + (i + 1) * delay - loop.time()))
            if include_usage:
                yield f'data: {head}],"usage":{json.dumps(usage)}}}\n\n'.encode()
            yield b"data: [DONE]\n\n"
            record.finished = True
        finally:
            # Cancelled or closed before the end: the client (the gateway) hung up, which
            # is where a real engine aborts the generation.
            if not record.finished and not crashed:
                record.aborted = True

    async def _stream_tool_call(
        self, tool_call: dict[str, Any], usage: dict[str, int], include_usage: bool
    ) -> Any:
        head = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": MODEL,
        }
        arguments = tool_call["function"]["arguments"]
        half = len(arguments) // 2
        deltas = [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": tool_call["id"],
                        "type": "function",
                        "function": {
                            "name": tool_call["function"]["name"],
                            "arguments": arguments[:half],
                        },
                    }
                ],
            },
            {"tool_calls": [{"index": 0, "function": {"arguments": arguments[half:]}}]},
        ]
        for delta in deltas:
            chunk = head | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        last = head | {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}
        yield f"data: {json.dumps(last)}\n\n".encode()
        if include_usage:
            yield f"data: {json.dumps(head | {'choices': [], 'usage': usage})}\n\n".encode()
        yield b"data: [DONE]\n\n"


_SAMPLE = {"string": "Paris", "integer": 42, "number": 1.5, "boolean": True}


def tool_call_for(body: dict[str, Any]) -> dict[str, Any] | None:
    """Call the chosen (or first) tool, with a sample value for each property of its schema."""
    tools = body.get("tools")
    if not tools:
        return None
    choice = body.get("tool_choice")
    name = None
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name")
    tool = next((t for t in tools if t["function"]["name"] == name), tools[0])["function"]
    properties = (tool.get("parameters") or {}).get("properties") or {}
    arguments = {key: _SAMPLE.get(spec.get("type"), None) for key, spec in properties.items()}
    return {
        "id": "call_fake0",
        "type": "function",
        "function": {"name": tool["name"], "arguments": json.dumps(arguments)},
    }


async def sleep_unless_disconnected(request: Request, seconds: float) -> bool:
    """Sleep, unless the client hangs up first (as vLLM aborts a non-streaming request)."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(hung_up())
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
        return not done
    finally:
        watcher.cancel()


def main() -> None:
    """Serve the double alone: `python -m tests.doubles.fake_upstream PORT [API_KEY [NAME]]`,
    with `always` from FAKE_ALWAYS (JSON)."""
    import sys

    import uvicorn

    args = sys.argv[1:] + [""] * 3
    always = json.loads(os.environ.get("FAKE_ALWAYS") or "{}")
    double = FakeUpstream(api_key=args[1] or None, name=args[2] or None, always=always)
    double.may_die = True
    uvicorn.run(double.app(), host="127.0.0.1", port=int(args[0]), log_level="warning")


if __name__ == "__main__":
    main()
