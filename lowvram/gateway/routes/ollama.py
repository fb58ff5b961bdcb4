"""Ollama's API on the same port: chat and generate go through the gateway like any request
(gateway/ollama.py translates them); the model routes say what is served, as Ollama would."""

from __future__ import annotations

import hashlib
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response

from lowvram.engine.handle import ServedModel
from lowvram.gateway.auth import ClientKey
from lowvram.gateway.errors import BadRequest, ModelNotFound
from lowvram.gateway.exchange import Endpoint
from lowvram.gateway.model_states import model_states
from lowvram.gateway.rewrite import parse_body, resolve_model
from lowvram.gateway.serving import Gateway

router = APIRouter()

VERSION = "0.12.0"
"""The Ollama API version these routes follow (clients check it for features)."""
_STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> Response:
    """What Ollama answers at its root: clients probe it to find a server. Says nothing else."""
    return PlainTextResponse("Ollama is running")


@router.post("/api/chat")
async def chat(request: Request, key: ClientKey) -> Response:
    body = parse_body(await request.body())
    return await _gateway(request).handle(request, key, Endpoint.OLLAMA_CHAT, body)


@router.post("/api/generate")
async def generate(request: Request, key: ClientKey) -> Response:
    body = parse_body(await request.body())
    return await _gateway(request).handle(request, key, Endpoint.OLLAMA_GENERATE, body)


@router.get("/api/version")
async def version(key: ClientKey) -> dict[str, str]:
    return {"version": VERSION}


def _details(model: ServedModel) -> dict[str, Any]:
    details = model.details
    return {
        "parent_model": "",
        "format": details.format if details else "unknown",
        "family": details.family if details else "unknown",
        "families": [details.family] if details else [],
        "parameter_size": (details.parameter_size if details else None) or "",
        "quantization_level": (details.quantization if details else None) or "",
    }


def _entry(name: str, model: ServedModel) -> dict[str, Any]:
    size = model.details.size_bytes if model.details else None
    return {
        "name": name,
        "model": name,
        "modified_at": _STARTED,
        "size": size or 0,
        "digest": hashlib.sha256(model.id.encode()).hexdigest(),
        "details": _details(model),
    }


@router.get("/api/tags")
async def tags(request: Request, key: ClientKey) -> dict[str, Any]:
    """Each served model under each name this key may use (its id and its aliases)."""
    return {"models": [_entry(name, served) for name, served in _gateway(request).model_ids(key)]}


RUNNING = ("loaded", "awake")
"""States of a model in memory: llama.cpp's router's, and the awake one of vLLM's engines."""


@router.get("/api/ps")
async def running(request: Request, key: ClientKey) -> dict[str, Any]:
    """The models loaded now: every one for one engine per model; where several share the
    machine, the ones in memory (llama.cpp's router) or awake (vLLM's sleep mode)."""
    gateway = _gateway(request)
    states = await model_states(gateway.client, gateway.engine)
    models = [
        _entry(name, served)
        | {"expires_at": "9999-12-31T23:59:59Z", "size_vram": 0}
        | {"context_length": served.context_length}
        for name, served in gateway.model_ids(key)
        if name == served.id and states.get(served.id, "loaded") in RUNNING
    ]
    return {"models": models}


@router.post("/api/show")
async def show(request: Request, key: ClientKey) -> dict[str, Any]:
    body = parse_body(await request.body())
    name = body.get("model", body.get("name"))
    if not isinstance(name, str):
        raise BadRequest("'model' must name a model.", param="model")
    gateway = _gateway(request)
    try:
        served = resolve_model(
            name, gateway.served_models(), gateway.settings.model_aliases, key, ollama_names=True
        )
    except ModelNotFound:
        raise ModelNotFound(f"model '{name}' not found", param="model") from None
    family = served.details.family if served.details else "unknown"
    capabilities = ["completion", "tools"]  # both engines call tools (required, named, auto)
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": _details(served),
        "model_info": {
            "general.architecture": family,
            f"{family}.context_length": served.context_length,
        },
        "capabilities": capabilities,
        "modified_at": _STARTED,
    }
