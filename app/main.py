"""The app factory: lifespan, state, routers, error handlers, middleware, in that order."""

from __future__ import annotations

import gc
import shlex
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI

from app.auth import Authenticator
from app.errors import register_error_handlers
from app.gateway import Gateway
from app.keystore import KeyStore, UsageLog
from app.metrics import Metrics
from app.middleware import BodyLimitMiddleware, RequestContextMiddleware
from app.routes import openai, ops
from app.settings import Settings
from app.upstream import create_client
from engine.external import ExternalEngine
from engine.handle import EngineHandle

if TYPE_CHECKING:
    from engine.manager import EngineOptions


def build_engine(settings: Settings) -> EngineHandle:
    """An external upstream if one is configured, else an engine we start and supervise."""
    if settings.gateway_upstream_url:
        key = settings.gateway_upstream_api_key
        return ExternalEngine(
            settings.gateway_upstream_url,
            key.get_secret_value() if key else None,
            context_length=settings.gateway_context_length,
        )
    from engine.manager import build_engine  # the planner and backends: not for upstreams

    return build_engine(engine_options(settings))


def engine_options(settings: Settings) -> EngineOptions:
    from engine.manager import EngineOptions
    from engine.supervisor import SupervisorConfig

    return EngineOptions(
        backend=settings.engine_backend,
        model=settings.engine_model,
        vram=settings.engine_vram,
        context=settings.engine_context,
        concurrency=settings.engine_concurrency,
        gpu_memory=settings.engine_gpu_memory,
        host_memory=settings.engine_host_memory,
        models_dir=settings.engine_models_dir,
        threads=settings.engine_threads,
        extra_args=tuple(shlex.split(settings.engine_extra_args)),
        command=tuple(shlex.split(settings.engine_command)) if settings.engine_command else None,
        supervisor=SupervisorConfig(
            ready_timeout=settings.engine_ready_timeout,
            max_restarts=settings.engine_max_restarts,
            max_replans=settings.engine_max_replans,
        ),
    )


def create_app(settings: Settings, engine: EngineHandle | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = KeyStore(settings.gateway_db_path)
        usage_log = UsageLog(settings.gateway_db_path)
        client = create_client(settings)
        handle = engine or build_engine(settings)
        app.state.auth = Authenticator(
            [k.get_secret_value() for k in settings.gateway_api_keys],
            [k.get_secret_value() for k in settings.gateway_admin_api_keys],
            store,
        )
        app.state.gateway = Gateway(settings, handle, client, Metrics(), usage_log)
        await handle.start()
        # What start-up allocated lives as long as the process: keep the collector off it.
        gc.freeze()
        try:
            yield
        finally:
            await handle.stop()
            await client.aclose()
            usage_log.close()
            store.close()

    app = FastAPI(
        title="lowvram gateway",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.settings = settings
    app.include_router(openai.router)
    app.include_router(ops.router)
    register_error_handlers(app)
    # Added last runs first: the request's id and log line, then the body limit.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.gateway_max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app
