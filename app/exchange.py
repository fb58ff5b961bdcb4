"""One client request from admission to its last byte: what it holds and what it cost."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from app.errors import APIError, ClientClosed
from app.keystore import KeyRecord, UsageLog, UsageRecord
from app.metrics import Metrics

CLIENT_CLOSED = ClientClosed.status_code


class Exchange:
    def __init__(
        self,
        *,
        request_id: str,
        key: KeyRecord,
        endpoint: str,
        stream: bool,
        metrics: Metrics,
        usage_log: UsageLog | None,
    ) -> None:
        self.request_id = request_id
        self.key = key
        self.endpoint = endpoint
        self.stream = stream
        self.model: str | None = None
        self.status = 200
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.chunks = 0
        self._metrics = metrics
        self._usage_log = usage_log
        self._started = time.perf_counter()
        self._first_token: float | None = None
        self.ttft: float | None = None
        self._on_finish: list[Callable[[Exchange], None]] = []
        self._finished = False

    @property
    def total_tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)

    def on_finish(self, callback: Callable[[Exchange], None]) -> None:
        """Release something (a slot, a rate-limit lease) when the request ends, however."""
        self._on_finish.append(callback)

    def mark_first_token(self) -> None:
        if self._first_token is None:
            self._first_token = time.perf_counter()

    def record_usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.prompt_tokens = prompt if isinstance(prompt, int) else self.prompt_tokens
            self.completion_tokens = completion if isinstance(completion, int) else None

    @contextmanager
    def settle_on_error(self) -> Iterator[None]:
        """Finish the exchange with the status an escaping exception stands for."""
        try:
            yield
        except APIError as exc:
            self.finish(exc.status_code)
            raise
        except Exception:
            self.finish(500)
            raise
        except BaseException:
            self.finish(CLIENT_CLOSED)
            raise

    def finish(self, status: int | None = None) -> None:
        """Idempotent: the first call settles the request."""
        if self._finished:
            return
        self._finished = True
        if status is not None:
            self.status = status
        for callback in self._on_finish:
            callback(self)
        latency = time.perf_counter() - self._started
        self.ttft = None if self._first_token is None else self._first_token - self._started
        self._account(latency, self.ttft)

    def log_fields(self) -> dict[str, object]:
        """What the access log line adds for an API request."""
        return {
            "key": self.key.name,
            "endpoint": self.endpoint,
            "model": self.model,
            "stream": self.stream,
            "outcome": self.status,
            "ttft_ms": None if self.ttft is None else round(self.ttft * 1000, 2),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "chunks": self.chunks,
        }

    def _account(self, latency: float, ttft: float | None) -> None:
        metrics = self._metrics
        metrics.child(metrics.requests, self.endpoint, str(self.status)).inc()
        metrics.child(metrics.latency, self.endpoint).observe(latency)
        if ttft is not None:
            metrics.ttft.observe(ttft)
        if self.chunks:
            metrics.chunks.inc(self.chunks)
        if self.prompt_tokens:
            metrics.child(metrics.tokens, "prompt").inc(self.prompt_tokens)
        if self.completion_tokens:
            metrics.child(metrics.tokens, "completion").inc(self.completion_tokens)
        if self._usage_log is not None:
            self._usage_log.record(
                UsageRecord(
                    request_id=self.request_id,
                    key_name=self.key.name,
                    model=self.model,
                    endpoint=self.endpoint,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens,
                    status=self.status,
                    latency_ms=latency * 1000,
                )
            )
