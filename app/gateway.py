"""The request path: from an authenticated body to the engine's answer, and back.

`Gateway` owns the process-wide parts (one HTTP client, admission, per-key limits, token
counter, usage log) and runs each request through them in a fixed order:
validate -> engine ready? -> resolve model -> shims -> key limits -> admission slot ->
fit context -> open upstream -> relay (stream) or read (JSON).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from app.admission import Admission
from app.errors import ClientClosed, EngineUnavailable
from app.exchange import Exchange
from app.keystore import KeyRecord, UsageLog
from app.limits import KeyLimiter
from app.metrics import Metrics
from app.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from app.settings import Settings
from app.shaping import (
    apply_chat_shims,
    ask_for_usage,
    check_stream_options,
    fit_context,
    key_may_use,
    resolve_model,
    validate,
)
from app.streaming import RelayResponse, StreamRelay
from app.tokens import TokenCounter
from app.upstream import ENGINE_RETRY_AFTER, engine_error, map_transport_error, open_upstream
from engine.handle import EngineHandle, EngineState, ServedModel

T = TypeVar("T")

# In-flight bound for an engine that does not say how many sequences it batches.
DEFAULT_MAX_INFLIGHT = 64


class Gateway:
    def __init__(
        self,
        settings: Settings,
        engine: EngineHandle,
        client: httpx.AsyncClient,
        metrics: Metrics,
        usage_log: UsageLog | None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.client = client
        self.metrics = metrics
        self.usage_log = usage_log
        self.limiter = KeyLimiter()
        self.counter = TokenCounter(client)
        self.admission = Admission(
            self._inflight_limit(), settings.gateway_queue_size, settings.gateway_queue_timeout
        )
        engine.add_listener(self._on_engine_state)

    # --- engine state ------------------------------------------------------------------

    def _inflight_limit(self) -> int:
        if self.settings.gateway_max_inflight is not None:
            return self.settings.gateway_max_inflight
        model = self.engine.model
        return model.max_batch if model and model.max_batch else DEFAULT_MAX_INFLIGHT

    def _on_engine_state(self, state: EngineState) -> None:
        self.metrics.engine_state_changes.labels(state.value).inc()
        if state is EngineState.READY:
            self.admission.limit = self._inflight_limit()
        else:
            self.admission.fail_waiters(self._unavailable(state))

    def _unavailable(self, state: EngineState) -> EngineUnavailable:
        return EngineUnavailable(
            f"The engine is {state.value}; retry shortly.", retry_after=ENGINE_RETRY_AFTER
        )

    def served_model(self) -> ServedModel:
        model = self.engine.model
        if self.engine.state is not EngineState.READY or model is None:
            raise self._unavailable(self.engine.state)
        return model

    def model_ids(self, key: KeyRecord) -> list[str]:
        """The served model and its aliases, as far as this key may use them."""
        served = self.served_model()
        names = [served.id] + [
            alias
            for alias, target in self.settings.gateway_model_aliases.items()
            if target == served.id
        ]
        return [name for name in names if key_may_use(key, name, served.id)]

    # --- requests ----------------------------------------------------------------------

    def begin(self, request: Request, key: KeyRecord, endpoint: str, stream: bool) -> Exchange:
        exchange = Exchange(
            request_id=request.state.request_id,
            key=key,
            endpoint=endpoint,
            stream=stream,
            metrics=self.metrics,
            usage_log=self.usage_log,
        )
        request.state.exchange = exchange
        return exchange

    async def generate(
        self, request: Request, key: KeyRecord, body: dict[str, Any], *, chat: bool
    ) -> Response:
        """POST /v1/chat/completions (chat=True) and /v1/completions."""
        stream = body.get("stream") is True
        exchange = self.begin(request, key, "chat" if chat else "completions", stream)
        with exchange.settle_on_error():
            validate(ChatCompletionRequest if chat else CompletionRequest, body)
            check_stream_options(body)
            served = self.served_model()
            exchange.model = body["model"] = resolve_model(
                body.get("model"), served, self.settings.gateway_model_aliases, key
            )
            if chat:
                apply_chat_shims(body)
            wants_usage = ask_for_usage(body) if stream else False
            self._take_lease(exchange, key)
            path = "/v1/chat/completions" if chat else "/v1/completions"

            async def fit() -> None:
                exchange.prompt_tokens = await fit_context(
                    body,
                    self.engine,
                    self.counter,
                    self.settings.gateway_default_max_tokens,
                    chat=chat,
                )

            if not stream:
                return await unless_disconnected(
                    request, lambda: self._call(exchange, path, body, fit)
                )
            upstream = await unless_disconnected(
                request, lambda: self._open(exchange, path, body, fit)
            )
            if upstream.status_code != 200:
                return await self._engine_refused(upstream, exchange)
            relay = StreamRelay(
                upstream,
                exchange,
                client_wants_usage=wants_usage,
                engine_reports_usage=served.stream_usage,
                count_prompt=lambda: self._count_prompt(body, chat),
                count_text=lambda text: self.counter.count_text(self.engine, text),
                idle_timeout=self.settings.gateway_read_timeout,
            )
            return RelayResponse(
                relay, exchange, ping_seconds=self.settings.gateway_keepalive_seconds
            )

    async def forward(
        self, request: Request, key: KeyRecord, body: dict[str, Any], path: str
    ) -> Response:
        """Endpoints passed through as they are, when the engine serves them."""
        exchange = self.begin(request, key, path.rsplit("/", 1)[-1], stream=False)
        with exchange.settle_on_error():
            if path == "/v1/embeddings":
                validate(EmbeddingRequest, body)
            served = self.served_model()
            exchange.model = body["model"] = resolve_model(
                body.get("model"), served, self.settings.gateway_model_aliases, key
            )
            self._take_lease(exchange, key)
            return await unless_disconnected(request, lambda: self._call(exchange, path, body))

    def _take_lease(self, exchange: Exchange, key: KeyRecord) -> None:
        lease = self.limiter.acquire(key)
        exchange.on_finish(lambda ex: lease.release(ex.total_tokens))

    async def _open(
        self,
        exchange: Exchange,
        path: str,
        body: dict[str, Any],
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> httpx.Response:
        """Wait for a slot, fit the request, and send it; return at the engine's headers."""
        await self.admission.acquire()
        exchange.on_finish(lambda _: self.admission.release())
        if prepare is not None:
            await prepare()
        return await open_upstream(
            self.client,
            self.engine,
            path,
            body,
            exchange.request_id,
            stream=exchange.stream,
            read_timeout=self.settings.gateway_read_timeout,
        )

    async def _call(
        self,
        exchange: Exchange,
        path: str,
        body: dict[str, Any],
        prepare: Callable[[], Awaitable[None]] | None = None,
    ) -> Response:
        """A request answered with one JSON document."""
        upstream = await self._open(exchange, path, body, prepare)
        if upstream.status_code != 200:
            return await self._engine_refused(upstream, exchange)
        raw = await _read_all(upstream)
        try:
            exchange.record_usage(json.loads(raw).get("usage"))
        except (ValueError, AttributeError):
            pass
        exchange.finish(200)
        return Response(raw, media_type="application/json")

    async def _count_prompt(self, body: dict[str, Any], chat: bool) -> int | None:
        if chat:
            return await self.counter.count_chat(self.engine, body)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            return None
        return await self.counter.count_text(self.engine, prompt)

    async def _engine_refused(self, upstream: httpx.Response, exchange: Exchange) -> Response:
        status, body = engine_error(upstream.status_code, await _read_all(upstream))
        exchange.finish(status)
        return JSONResponse(body, status_code=status)


async def _read_all(upstream: httpx.Response) -> bytes:
    """The engine's whole body; the response is closed however the read ends."""
    try:
        return await upstream.aread()
    except httpx.HTTPError as exc:
        raise map_transport_error(exc) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()


async def unless_disconnected(request: Request, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `work` until it is done or the client hangs up, whichever comes first.

    Starlette does not cancel a handler when its client leaves. Cancelling `work` here
    leaves the admission queue, or closes the engine's connection, which aborts the
    generation there: a client that gave up must not keep the GPU busy.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(work())
    watcher = loop.create_task(_until_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let its cleanup (leaving the queue, closing the engine's request) finish.
            await asyncio.wait((task,))
    if task.cancelled():
        raise ClientClosed("The client closed the request.")
    return task.result()


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
