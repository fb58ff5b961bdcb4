"""One client request from admission to its last byte: what it holds and what it cost.

The exchange owns what a request holds (its key's lease, its admission slot) in an
`ExitStack`, and is finished exactly once, by whichever of these ends the response:

    an error escaping the handler     `async with exchange:` settles it with the error's status
    a JSON answer                     `Gateway._call` settles it once the body is read
    a stream                          `StreamRelay` settles it before the stream's last bytes
    a client gone, a cancelled task   `finish()`, from wherever that is noticed

Finishing releases the resources, counts the request in the metrics and the usage log,
and hands the access log its fields through `access_fields` (a context variable set by
the middleware for each request). Settling is finishing and then waiting until the usage
row is committed, so that an answer the client has in full is billed even if the gateway
is killed a moment later.
"""

from __future__ import annotations

import asyncio
import enum
import time
from contextlib import ExitStack
from contextvars import ContextVar
from types import TracebackType

from lowvram.engine.replicas import Lease, Outcome
from lowvram.gateway.errors import APIError, ClientClosed
from lowvram.gateway.keystore import KeyRecord, UsageLog, UsageRecord
from lowvram.gateway.metrics import Metrics

CLIENT_CLOSED = ClientClosed.status_code

access_fields: ContextVar[dict[str, object] | None] = ContextVar("access_fields", default=None)
"""The access log line's extra fields for the request in scope (see middleware.py)."""


class Endpoint(enum.StrEnum):
    """An API route the gateway forwards, named as metrics and the usage log name it."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"
    TOKENIZE = "tokenize"
    OLLAMA_CHAT = "ollama_chat"
    OLLAMA_GENERATE = "ollama_generate"

    @property
    def path(self) -> str:
        """Its path: the client's, and the engine's where it is sent as it is."""
        return _PATHS[self]

    @property
    def generates(self) -> bool:
        """Whether it generates tokens: context fitting, streaming, usage accounting."""
        return self not in (Endpoint.EMBEDDINGS, Endpoint.TOKENIZE)

    @property
    def max_tokens_field(self) -> str:
        """The request field that caps the completion."""
        return "max_output_tokens" if self is Endpoint.RESPONSES else "max_tokens"


_PATHS = {
    Endpoint.CHAT: "/v1/chat/completions",
    Endpoint.COMPLETIONS: "/v1/completions",
    Endpoint.RESPONSES: "/v1/responses",
    Endpoint.EMBEDDINGS: "/v1/embeddings",
    Endpoint.TOKENIZE: "/tokenize",
    Endpoint.OLLAMA_CHAT: "/api/chat",
    Endpoint.OLLAMA_GENERATE: "/api/generate",
}


class Exchange:
    def __init__(
        self,
        *,
        request_id: str,
        key: KeyRecord,
        endpoint: Endpoint,
        stream: bool,
        metrics: Metrics,
        usage_log: UsageLog | None,
    ) -> None:
        self.request_id = request_id
        self.key = key
        self.endpoint = endpoint
        self.engine_endpoint = endpoint
        """What the engine is asked: the chat completions that serve a Responses request."""
        self.stream = stream
        self.model: str | None = None
        self.lease: Lease | None = None
        """The engine of the pool serving it (engine/replicas.py), told how it went."""
        self.status = 200
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.chunks = 0
        self.resources = ExitStack()
        """What the request holds; closed (in reverse order) when it finishes."""
        self._metrics = metrics
        self._usage_log = usage_log
        self._started = time.perf_counter()
        self._first_token: float | None = None
        self._finished = False
        self._committed: asyncio.Future[None] | None = None

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def replica(self) -> str | None:
        return self.lease.name if self.lease is not None else None

    def mark_first_token(self) -> None:
        if self._first_token is None:
            self._first_token = time.perf_counter()
            if self.lease is not None:
                self.lease.received()

    def record_usage(self, usage: object) -> None:
        """Take the engine's usage object: chat and completions', or the Responses API's."""
        if isinstance(usage, dict):
            prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
            completion = usage.get("completion_tokens", usage.get("output_tokens"))
            self.prompt_tokens = prompt if isinstance(prompt, int) else self.prompt_tokens
            self.completion_tokens = completion if isinstance(completion, int) else None

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """An error escaping the handler settles the request with the status it stands for."""
        if error is None:
            return
        if isinstance(error, APIError):
            await self.settle(error.status_code)
        elif isinstance(error, Exception):
            await self.settle(500)
        else:  # cancelled: the client is gone, nobody waits for the answer
            self.finish(CLIENT_CLOSED)

    async def settle(self, status: int | None = None) -> None:
        """Finish, then wait until the usage row is committed: call it before the answer's
        last byte goes out. Shielded: a client leaving meanwhile does not undo the row."""
        self.finish(status)
        if self._committed is not None and not self._committed.done():
            await asyncio.shield(self._committed)

    def finish(self, status: int | None = None) -> None:
        """Idempotent: the first call settles the request."""
        if self._finished:
            return
        self._finished = True
        if status is not None:
            self.status = status
        self.resources.close()
        if self.lease is not None:
            self.lease.release(self.outcome())
        latency = time.perf_counter() - self._started
        ttft = None if self._first_token is None else self._first_token - self._started
        self._account(latency, ttft)
        fields = access_fields.get()
        if fields is not None:
            fields.update(self._log_fields(ttft))

    def outcome(self) -> Outcome | None:
        """What the request says about the engine that served it; None: nothing (the client
        left, the engine was already known to be away, or the gateway itself failed)."""
        status = self.status
        if status < 500:
            return None if status == CLIENT_CLOSED else Outcome.OK
        return {502: Outcome.FAILED, 504: Outcome.SLOW}.get(status)

    def _log_fields(self, ttft: float | None) -> dict[str, object]:
        return {
            "key": self.key.name,
            "endpoint": self.endpoint.value,
            "model": self.model,
            "replica": self.replica,
            "stream": self.stream,
            "outcome": self.status,
            "ttft_ms": None if ttft is None else round(ttft * 1000, 2),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "chunks": self.chunks,
        }

    def _account(self, latency: float, ttft: float | None) -> None:
        metrics = self._metrics
        endpoint = self.endpoint.value
        metrics.child(metrics.requests, endpoint, str(self.status)).inc()
        metrics.child(metrics.latency, endpoint).observe(latency)
        if ttft is not None:
            metrics.ttft.observe(ttft)
        if self.chunks:
            metrics.chunks.inc(self.chunks)
        if self.prompt_tokens:
            metrics.child(metrics.tokens, "prompt").inc(self.prompt_tokens)
        if self.completion_tokens:
            metrics.child(metrics.tokens, "completion").inc(self.completion_tokens)
        if self._usage_log is not None:
            self._committed = self._usage_log.record(
                UsageRecord(
                    request_id=self.request_id,
                    key_name=self.key.name,
                    model=self.model,
                    endpoint=endpoint,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens,
                    status=self.status,
                    latency_ms=latency * 1000,
                )
            )
