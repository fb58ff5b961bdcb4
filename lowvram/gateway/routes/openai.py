"""The OpenAI API surface. Handlers only read the body; `Gateway` does the rest."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from lowvram.gateway.auth import ClientKey
from lowvram.gateway.errors import ModelNotFound
from lowvram.gateway.exchange import Endpoint
from lowvram.gateway.model_states import model_states
from lowvram.gateway.rewrite import parse_body
from lowvram.gateway.serving import Gateway

router = APIRouter()


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


async def _handle(request: Request, key: ClientKey, endpoint: Endpoint) -> Response:
    body = parse_body(await request.body())
    return await _gateway(request).handle(request, key, endpoint, body)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, key: ClientKey) -> Response:
    return await _handle(request, key, Endpoint.CHAT)


@router.post("/v1/completions")
async def completions(request: Request, key: ClientKey) -> Response:
    return await _handle(request, key, Endpoint.COMPLETIONS)


@router.post("/v1/responses")
async def responses(request: Request, key: ClientKey) -> Response:
    return await _handle(request, key, Endpoint.RESPONSES)


@router.post("/v1/embeddings")
async def embeddings(request: Request, key: ClientKey) -> Response:
    return await _handle(request, key, Endpoint.EMBEDDINGS)


@router.post("/tokenize")
async def tokenize(request: Request, key: ClientKey) -> Response:
    return await _handle(request, key, Endpoint.TOKENIZE)


def _model_card(
    model_id: str, context_length: int | None, state: str | None = None
) -> dict[str, Any]:
    card: dict[str, Any] = {
        "id": model_id,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "lowvram",
    }
    if context_length is not None:
        card["max_model_len"] = context_length
    if state is not None:  # several models on one engine: loaded, loading, unloaded, ...
        card["state"] = state
    return card


@router.get("/v1/models")
async def list_models(request: Request, key: ClientKey) -> dict[str, Any]:
    gateway = _gateway(request)
    named = gateway.model_ids(key)
    states = await model_states(gateway.client, gateway.engine)
    cards = [_model_card(n, m.context_length, states.get(m.id)) for n, m in named]
    return {"object": "list", "data": cards}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request, key: ClientKey) -> dict[str, Any]:
    """A served model by its id, an alias, or "default" (which names the default model)."""
    gateway = _gateway(request)
    named = dict(gateway.model_ids(key))
    if model_id == "default" and named:
        served = next(iter(named.values()))
    elif model_id in named:
        served = named[model_id]
    else:
        raise ModelNotFound(f"The model '{model_id}' does not exist.", param="model")
    states = await model_states(gateway.client, gateway.engine)
    return _model_card(model_id, served.context_length, states.get(served.id))
