"""Ask a running OpenAI-compatible server what it serves (`GET /v1/models`) and how to count."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import httpx

from lowvram.engine.errors import ProbeError
from lowvram.engine.handle import ServedModel, TokenizerStyle


def normalize_base_url(url: str) -> str:
    """Accept `http://h:p`, `http://h:p/` and `http://h:p/v1`; return the root."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def list_models(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> Any:
    try:
        response = await client.get(f"{base_url}/v1/models", headers=auth_headers(api_key))
    except httpx.HTTPError as exc:
        raise ProbeError(f"{base_url} unreachable: {exc!r}") from exc
    if response.status_code != 200:
        raise ProbeError(f"{base_url}/v1/models answered {response.status_code}")
    try:
        return response.json()["data"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ProbeError(f"{base_url}/v1/models did not return a model list") from exc


async def detect_tokenizer(
    client: httpx.AsyncClient, base_url: str, api_key: str | None, model: str
) -> TokenizerStyle | None:
    """vLLM's `/tokenize` counts (`count`); llama.cpp's server lists tokens (`tokens`).

    One request serves both: vLLM reads `prompt`, llama.cpp's server reads `content`.
    """
    body = {"model": model, "prompt": "hi", "content": "hi"}
    try:
        response = await client.post(
            f"{base_url}/tokenize", json=body, headers=auth_headers(api_key)
        )
        data = response.json() if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("count"), int):
        return "vllm"
    if isinstance(data, dict) and isinstance(data.get("tokens"), list):
        return "llamacpp"
    return None


async def probe_served_model(
    client: httpx.AsyncClient,
    base_url: str,
    api_key: str | None,
    *,
    context_length: int | None = None,
    known: ServedModel | None = None,
) -> ServedModel:
    """Facts for an engine we do not manage; `context_length` fills in what it won't say.

    What the engine is is detected once per model: `known` is what the last probe found.
    """
    models = await list_models(client, base_url, api_key)
    first = models[0] if isinstance(models, list) and models else None
    if not isinstance(first, dict) or not isinstance(first.get("id"), str) or not first["id"]:
        raise ProbeError(f"{base_url}/v1/models lists no model with an id")
    model_id = first["id"]
    if known is not None and known.id == model_id:
        return replace(known, context_length=_context(first, known.context_length))
    tokenizer = await detect_tokenizer(client, base_url, api_key, model_id)
    slots = await _slots(client, base_url, api_key) if tokenizer == "llamacpp" else None
    return ServedModel(
        id=model_id,
        context_length=_context(first, context_length),
        max_batch=slots,
        max_choices=slots,
        tokenizer=tokenizer,
        # llama.cpp's server treats a named tool_choice as "auto"; vLLM honours it.
        named_tool_choice=tokenizer != "llamacpp",
    )


def _context(card: dict[str, Any], fallback: int | None) -> int | None:
    reported = card.get("max_model_len")
    return reported if isinstance(reported, int) and reported > 0 else fallback


async def _slots(client: httpx.AsyncClient, base_url: str, api_key: str | None) -> int | None:
    """llama.cpp's server says how many sequences it runs at once (`/props`)."""
    try:
        response = await client.get(f"{base_url}/props", headers=auth_headers(api_key))
        slots = response.json().get("total_slots") if response.status_code == 200 else None
    except (httpx.HTTPError, ValueError, AttributeError):
        return None
    return slots if isinstance(slots, int) and slots > 0 else None
