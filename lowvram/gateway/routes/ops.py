"""Operations: liveness and readiness (public, no details) and Prometheus metrics (admin key)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lowvram.engine.handle import EngineState
from lowvram.gateway.auth import AdminKey
from lowvram.gateway.model_states import model_states
from lowvram.gateway.serving import Gateway
from lowvram.gateway.upstream import ENGINE_RETRY_AFTER

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"])
async def health() -> dict[str, str]:
    """The gateway process is alive; says nothing about the engine."""
    return {"status": "ok"}


@router.api_route("/ready", methods=["GET", "HEAD"])
async def ready(request: Request) -> Response:
    """200 when a request would reach a ready engine; otherwise 503 with the reason.

    The reason is the engine handle's client-facing one: what, never paths or logs.
    """
    gateway: Gateway = request.app.state.gateway
    engine = gateway.engine
    body: dict[str, object] = {"status": engine.state.value}
    if engine.state is not EngineState.READY:
        body["reason"] = engine.reason
    if gateway.pooled:  # each replica's state, and why one is not serving
        body["replicas"] = [
            {k: v for k, v in r.items() if k != "outstanding" and (k != "reason" or v)}
            for r in engine.snapshot()
        ]
    if states := await model_states(gateway.client, engine):
        body["models"] = states  # several models on one engine: which are loaded
    if engine.state is EngineState.READY:
        return JSONResponse(body)
    retry = engine.state in (EngineState.STARTING, EngineState.RESTARTING)
    headers = {"Retry-After": str(int(ENGINE_RETRY_AFTER))} if retry else {}
    return JSONResponse(body, status_code=503, headers=headers)


@router.get("/metrics", dependencies=[AdminKey])
async def metrics(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    m = gateway.metrics
    m.inflight.set(gateway.admission.inflight)
    m.queued.set(gateway.admission.queued)
    m.inflight_limit.set(gateway.admission.limit)
    served = gateway.engine.model
    m.engine_sequences.set(served.max_batch or 0 if served else 0)
    m.engine_ready.set(1 if gateway.engine.state is EngineState.READY else 0)
    for replica in gateway.engine.snapshot():
        name = str(replica["name"])
        m.child(m.replica_ready, name).set(1 if replica["state"] == "ready" else 0)
        m.child(m.replica_outstanding, name).set(replica["outstanding"])
    states = await model_states(gateway.client, gateway.engine)
    m.model_state.clear()  # a model's old state must not linger beside its new one
    for model, state in states.items():
        m.model_state.labels(model, state).set(1)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
