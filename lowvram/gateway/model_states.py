"""Each served model's state, where one gateway serves several.

vLLM (ENGINE_MODELS): an engine per model, one awake; the pool knows which (awake,
asleep). llama.cpp's router (ENGINE_MODELS on the CPU engine) runs one server per model and lists
every model with its state at `GET /models` (`status.value`: loaded, loading, unloaded,
...). The gateway asks there when it lists models (`/v1/models`, `/ready`, `/metrics`),
rather than keeping a copy that could go stale: the router owns that state.
"""

from __future__ import annotations

import httpx

from lowvram.engine.handle import EngineState
from lowvram.engine.probe import auth_headers
from lowvram.engine.replicas import Replicas
from lowvram.engine.vllm.several import SwapPool

STATES_TIMEOUT = 2.0
"""Seconds the listing waits for the router: it answers from memory, at once."""


async def model_states(client: httpx.AsyncClient, pool: Replicas) -> dict[str, str]:
    """Model id -> state, for an engine serving more than one model; {} for one model, or
    where the engine does not say (the listing then shows no state, it never fails).
    Several models run on one engine (factory.py refuses replicas with ENGINE_MODELS)."""
    if isinstance(pool, SwapPool):
        return pool.states()
    engine = pool.members[0]
    if engine.state is not EngineState.READY or len(engine.models) < 2:
        return {}
    try:
        response = await client.get(
            f"{engine.base_url}/models",
            headers=auth_headers(engine.api_key),
            timeout=STATES_TIMEOUT,
        )
        listed = response.json().get("data") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return {}
    states = {}
    for entry in listed if isinstance(listed, list) else []:
        status = entry.get("status") if isinstance(entry, dict) else None
        if isinstance(status, dict) and isinstance(status.get("value"), str):
            failed = status.get("failed") is True
            states[str(entry.get("id"))] = "failed" if failed else status["value"]
    return states
