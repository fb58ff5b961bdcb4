"""The app factory: lifespan, state, routers, error handlers, middleware, in that order.

    app = create_app(GatewaySettings(), engine)      # an EngineHandle, or Replicas of them
    uvicorn.run(app)

The engine is built by the caller (`lowvram serve` builds it before the server starts, so
that a bad model or budget fails before anything listens); the lifespan starts and stops it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from lowvram.engine.handle import EngineHandle, EngineState
from lowvram.engine.replicas import Replicas, as_replicas
from lowvram.gateway.auth import Authenticator
from lowvram.gateway.errors import register_error_handlers
from lowvram.gateway.keystore import KeyStore, UsageLog
from lowvram.gateway.metrics import Metrics
from lowvram.gateway.middleware import (
    BodyLimitMiddleware,
    RequestContextMiddleware,
    ShutdownMiddleware,
)
from lowvram.gateway.routes import ollama, openai, ops
from lowvram.gateway.serving import Gateway
from lowvram.gateway.settings import GatewaySettings
from lowvram.gateway.upstream import create_client

logger = logging.getLogger(__name__)


def create_app(
    settings: GatewaySettings,
    engine: EngineHandle | Replicas,
    *,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """`on_ready` is called once, the first time the engine is ready (the CLI's banner)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = KeyStore(settings.db_path)
        usage_log = UsageLog(settings.db_path)
        client = create_client(settings)
        app.state.auth = Authenticator(
            [k.get_secret_value() for k in settings.api_keys],
            [k.get_secret_value() for k in settings.admin_api_keys],
            store,
            allow_anonymous=settings.allow_no_key,
        )
        if settings.allow_no_key:
            logger.warning(
                "GATEWAY_ALLOW_NO_KEY: requests without a key are served, as 'anonymous' (on %s)",
                settings.host,
            )
        pool = as_replicas(engine)
        app.state.gateway = Gateway(settings, pool, client, Metrics(), usage_log)
        if on_ready is not None:
            _call_once_ready(pool, on_ready)
        await pool.start()
        # What start-up allocated lives as long as the process: keep the collector off it.
        gc.freeze()
        try:
            yield
        finally:
            try:
                await pool.stop()
            except asyncio.CancelledError:
                # A second Ctrl-C: the shutdown waits no longer. Each supervisor kills its
                # engine's process group as the interpreter exits, so none is left.
                logger.info("stopping at once: engines are killed on exit")
            finally:
                await client.aclose()
                usage_log.close()  # writes what is queued
                store.close()

    app = FastAPI(
        title="lowvram gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.include_router(openai.router)
    app.include_router(ollama.router)
    app.include_router(ops.router)
    register_error_handlers(app)
    # Added last runs first: CORS (a browser's preflight carries no key), the request's id
    # and log line, then the body's limits.
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=int(settings.max_body_bytes),
        body_seconds=settings.body_timeout,
    )
    app.add_middleware(RequestContextMiddleware)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["authorization", "api-key", "content-type", "x-request-id"],
            expose_headers=["x-request-id", "retry-after"],
            allow_credentials=False,  # keys travel in headers, never in cookies
            max_age=600,
        )
    app.add_middleware(ShutdownMiddleware)
    return app


def _call_once_ready(engine: Replicas, callback: Callable[[], None]) -> None:
    called = False

    def listener(state: EngineState) -> None:
        nonlocal called
        if state is EngineState.READY and not called:
            called = True
            callback()

    engine.add_listener(listener)
