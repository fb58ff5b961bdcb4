"""The request path: from an authenticated body to the engine's answer, and back.

`Gateway` owns the process-wide parts (one HTTP client, admission, per-key limits, token
counter, usage log) and runs each request through them in a fixed order:

    validate -> engine ready? -> resolve model -> shims -> key lease -> admission slot
    -> fit context -> open upstream -> relay (stream) or read (JSON)

Each request is one `Exchange`, which holds the lease and the slot until it finishes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from lowvram.engine.handle import EngineState, ServedModel
from lowvram.engine.replicas import Lease, Replicas, Unreached
from lowvram.engine.swap import ModelUnavailable
from lowvram.engine.vllm.several import SwapPool
from lowvram.gateway.admission import Admission
from lowvram.gateway.dialects import OLLAMA, Dialect, dialect_for
from lowvram.gateway.errors import ClientClosed, EngineUnavailable, ModelNotFound, UpstreamError
from lowvram.gateway.exchange import Endpoint, Exchange
from lowvram.gateway.keystore import KeyRecord, UsageLog
from lowvram.gateway.limits import KeyLimiter
from lowvram.gateway.metrics import Metrics
from lowvram.gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
)
from lowvram.gateway.reasoning import MARK as REASONING
from lowvram.gateway.reasoning import mirror_reasoning
from lowvram.gateway.relay import RelayResponse, StreamRelay
from lowvram.gateway.rewrite import (
    apply_shims,
    ask_for_usage,
    check_engine_can,
    check_stream_options,
    check_tool_history,
    drop_cut_tool_calls,
    fit_context,
    key_may_use,
    resolve_model,
    validate,
)
from lowvram.gateway.settings import GatewaySettings
from lowvram.gateway.tokens import TokenCounter
from lowvram.gateway.upstream import (
    ENGINE_RETRY_AFTER,
    EngineCall,
    engine_error,
    map_transport_error,
    open_upstream,
    replica_lost,
)

T = TypeVar("T")

TOKENIZE_TIMEOUT = 30.0
"""Seconds a passed-through /tokenize may take: it answers in milliseconds, and a hung one
must not hold an admission slot for the generation read timeout."""

# In-flight bound for an engine that does not say how many sequences it batches: vLLM's own
# default --max-num-seqs, so that a vLLM upstream batches what it can and queues the rest.
DEFAULT_MAX_INFLIGHT = 256

_SCHEMAS: dict[Endpoint, type[BaseModel]] = {  # what the gateway checks of each API
    Endpoint.CHAT: ChatCompletionRequest,
    Endpoint.COMPLETIONS: CompletionRequest,
    Endpoint.RESPONSES: ResponsesRequest,
    Endpoint.EMBEDDINGS: EmbeddingRequest,
}


class Gateway:
    def __init__(
        self,
        settings: GatewaySettings,
        engine: Replicas,
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
        self.admission = Admission(
            self._inflight_limit(), settings.queue_size, settings.queue_timeout
        )
        engine.add_listener(self._on_engine_state)
        if isinstance(engine, SwapPool):
            engine.gate.add_listener(self._on_swap)

    # --- engine state ------------------------------------------------------------------

    def _inflight_limit(self) -> int:
        if self.settings.max_inflight is not None:
            return self.settings.max_inflight
        model = self.engine.model
        if model and model.max_batch:
            return model.max_batch
        return DEFAULT_MAX_INFLIGHT * max(1, self.engine.ready_count)

    def _on_swap(self, _: str | None, woken: str, seconds: float) -> None:
        self.metrics.model_swaps.labels(woken).inc()
        self.metrics.model_swap_seconds.observe(seconds)

    def _on_engine_state(self, state: EngineState) -> None:
        self.metrics.engine_state_changes.labels(state.value).inc()
        if state is EngineState.READY:
            self.admission.limit = self._inflight_limit()
        else:
            self.admission.fail_waiters(self._unavailable(state))

    def _unavailable(self, state: EngineState) -> EngineUnavailable:
        """What a client is told while the engine is not serving: why, and whether to retry."""
        reason = self.engine.reason
        if state in (EngineState.STARTING, EngineState.RESTARTING):
            return EngineUnavailable(
                f"The engine is not serving yet: {reason}. Retry shortly.",
                retry_after=ENGINE_RETRY_AFTER,
            )
        return EngineUnavailable(f"The engine is not serving: {reason}.")

    def served_models(self) -> tuple[ServedModel, ...]:
        """Every model served, the default first; a 503 while none is."""
        models = self.engine.models
        if self.engine.state is not EngineState.READY or not models:
            raise self._unavailable(self.engine.state)
        return models

    def model_ids(self, key: KeyRecord) -> list[tuple[str, ServedModel]]:
        """Each name this key may use (the models' ids and their aliases), with its model."""
        named = []
        for i, served in enumerate(self.served_models()):
            aliases = [a for a, t in self.settings.model_aliases.items() if t == served.id]
            named += [
                (name, served)
                for name in [served.id, *aliases]
                if key_may_use(key, name, served.id, i == 0)
            ]
        return named

    def _check_not_down(self, name: object, key: KeyRecord) -> None:
        """A model that is configured but whose engine is down is a 503 saying so, not a
        404 (several models on one GPU: each engine fails on its own)."""
        if not isinstance(self.engine, SwapPool) or not isinstance(name, str):
            return
        down = dict(zip(self.engine.names, self.engine.members, strict=True)).get(name)
        if down is None or down.state is EngineState.READY or not key_may_use(key, name, name):
            return
        coming = down.state in (EngineState.STARTING, EngineState.RESTARTING)
        raise EngineUnavailable(
            f"The model '{name}' is not serving: {down.reason}.",
            retry_after=ENGINE_RETRY_AFTER if coming else None,
        )

    # --- requests ----------------------------------------------------------------------

    async def handle(
        self, request: Request, key: KeyRecord, endpoint: Endpoint, body: dict[str, Any]
    ) -> Response:
        """Every forwarded endpoint, in any API the gateway speaks (dialects.py)."""
        exchange = Exchange(
            request_id=request.state.request_id,
            key=key,
            endpoint=endpoint,
            stream=False,
            metrics=self.metrics,
            usage_log=self.usage_log,
        )
        async with exchange:
            if (schema := _SCHEMAS.get(endpoint)) is not None:
                validate(schema, body)  # the client's own API's fields
            if endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS):
                check_stream_options(body)
            dialect = dialect_for(endpoint, body)
            asked, body = body, dialect.body
            engine = exchange.engine_endpoint = dialect.engine_endpoint
            if endpoint in OLLAMA:
                validate(_SCHEMAS[engine], body)
            stream = exchange.stream = engine.generates and body.get("stream") is True
            try:
                served = resolve_model(
                    body.get("model"),
                    self.served_models(),
                    self.settings.model_aliases,
                    key,
                    ollama_names=dialect.ollama_names,
                )
            except ModelNotFound:
                self._check_not_down(body.get("model"), key)
                raise
            exchange.model = body["model"] = served.id
            if endpoint is Endpoint.RESPONSES:
                check_engine_can(endpoint, asked, served)  # naming the client's fields
            else:
                check_engine_can(engine, body, served)
            if engine is Endpoint.CHAT:
                check_tool_history(body)
            apply_shims(engine, body, served)
            wants_usage = ask_for_usage(body) if stream else False
            lease = self.limiter.acquire(key)
            exchange.resources.callback(lambda: lease.release(exchange.total_tokens))
            if not stream:
                return await unless_disconnected(
                    request, self._call(exchange, served, body, dialect)
                )
            upstream, counter = await unless_disconnected(
                request, self._open(exchange, served, body)
            )
            if upstream.status_code != 200:
                return await self._engine_refused(upstream, exchange, body)
            relay = StreamRelay(
                upstream,
                exchange,
                counter=counter,
                body=body,
                client_wants_usage=wants_usage,
                idle_timeout=self.settings.read_timeout,
                max_event_bytes=int(self.settings.max_event_bytes),
                translate=dialect.stream() if dialect.stream else None,
            )
            return RelayResponse(relay, exchange, ping_seconds=self.settings.keepalive_seconds)

    async def _open(
        self, exchange: Exchange, served: ServedModel, body: dict[str, Any]
    ) -> tuple[httpx.Response, TokenCounter]:
        """Wait for a slot, let the pool pick a replica, fit the request and send it; return
        at the engine's headers, with the counter of the replica that answers."""
        await self.admission.acquire()
        exchange.resources.callback(self.admission.release)
        endpoint = exchange.engine_endpoint
        call = EngineCall(
            endpoint.path,
            body,
            exchange.request_id,
            exchange.stream,
            self.settings.read_timeout if endpoint is not Endpoint.TOKENIZE else TOKENIZE_TIMEOUT,
        )

        asked = time.perf_counter()

        async def attempt(lease: Lease) -> tuple[httpx.Response, TokenCounter]:
            if exchange.lease is None and isinstance(self.engine, SwapPool):
                # Its first try: from here on nothing waits for a model to be woken.
                self.metrics.swap_wait_seconds.observe(time.perf_counter() - asked)
            exchange.lease = lease
            counter = TokenCounter(self.client, lease.member, served)
            if endpoint.generates:
                exchange.prompt_tokens = await fit_context(
                    body, endpoint, served, counter, self.settings.default_max_tokens
                )
            return await open_upstream(self.client, lease, call), counter

        key = affinity(endpoint, body) if self.engine.pooled else None
        within = self.settings.replica_slow_seconds if exchange.stream else None
        try:
            _, opened = await self.engine.send(
                key, attempt, first_byte_within=within, model=served.id
            )
        except Unreached as exc:  # every replica refused, or the last went down meanwhile
            raise exc.cause or self._unavailable(self.engine.state) from None
        except ModelUnavailable as exc:  # its engine asleep and not woken (engine/swap.py)
            raise EngineUnavailable(
                f"The model is not serving: {exc}. Retry shortly.", retry_after=ENGINE_RETRY_AFTER
            ) from None
        return opened

    @property
    def pooled(self) -> bool:
        return self.engine.pooled

    async def _call(
        self, exchange: Exchange, served: ServedModel, body: dict[str, Any], dialect: Dialect
    ) -> Response:
        """A request answered with one JSON document, in the client's API."""
        upstream, _ = await self._open(exchange, served, body)
        if upstream.status_code != 200:
            return await self._engine_refused(upstream, exchange, body)
        raw = await _read_all(upstream, exchange.lease)
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            answer = None
        if not isinstance(answer, dict):
            raise UpstreamError("The engine answered with something that is not a JSON object.")
        exchange.record_usage(answer.get("usage"))
        changed = REASONING in raw and mirror_reasoning(answer)
        if exchange.engine_endpoint is Endpoint.CHAT and b'"length"' in raw:
            changed = drop_cut_tool_calls(answer) or changed
        if dialect.answer is not None:
            answer, changed = dialect.answer(answer), True
        if changed:
            raw = json.dumps(answer, ensure_ascii=False).encode()
        await exchange.settle(200)
        return Response(raw, media_type="application/json")

    async def _engine_refused(
        self, upstream: httpx.Response, exchange: Exchange, request: dict[str, Any]
    ) -> Response:
        raw = await _read_all(upstream, exchange.lease)
        status, body = engine_error(upstream.status_code, raw, request)
        await exchange.settle(status)
        return JSONResponse(body, status_code=status)


def affinity(endpoint: Endpoint, body: dict[str, Any]) -> str | None:
    """What identifies a conversation: its first messages (system prompt, first turn), whose
    prefix a replica's cache holds once it has served them (a Responses request is sent as
    chat)."""
    if endpoint is Endpoint.CHAT:
        head: object = body.get("messages", [])[:2]
    elif endpoint is Endpoint.COMPLETIONS:
        prompt = body.get("prompt")
        head = prompt[:512] if isinstance(prompt, str) else None
    else:
        return None
    return json.dumps(head, sort_keys=True, default=str) if head else None


async def _read_all(upstream: httpx.Response, lease: Lease | None) -> bytes:
    """The engine's whole body; the response is closed however the read ends, and at once
    if the pool takes the engine out meanwhile."""
    closing: list[asyncio.Future[None]] = []
    if lease is not None:
        lease.on_lost(lambda: closing.append(asyncio.ensure_future(upstream.aclose())))
    try:
        raw = await upstream.aread()
    except httpx.HTTPError as exc:
        raise (replica_lost() if lease and lease.lost else map_transport_error(exc)) from exc
    finally:
        with anyio.CancelScope(shield=True):
            await upstream.aclose()
    if lease is not None:
        lease.received()
    return raw


async def unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` until it is done or the client hangs up, whichever comes first.

    Starlette does not cancel a handler when its client leaves. Cancelling `work` here
    leaves the admission queue, or closes the engine's connection, which aborts the
    generation there: a client that gave up must not keep the GPU busy.
    """
    loop = asyncio.get_running_loop()
    task = loop.create_task(work)
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
