"""The one settings class: gateway and engine, read from the environment and `.env`.

Precedence: explicit arguments (the CLI's flags) > environment > `.env` > defaults, so
`GATEWAY_API_KEYS=... make serve` works whatever `.env` says. Every field is documented
in `.env.example` under its upper-case name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from engine.units import parse_size


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", frozen=True
    )

    # --- gateway: network and keys -------------------------------------------------------
    gateway_host: str = "127.0.0.1"
    """Address the gateway binds; 0.0.0.0 to serve other machines (Docker sets it)."""
    gateway_port: int = Field(8000, ge=0, le=65535)
    gateway_api_keys: Annotated[list[SecretStr], NoDecode] = []
    """Client keys accepted besides the SQLite ones, comma-separated. Never logged."""
    gateway_admin_api_keys: Annotated[list[SecretStr], NoDecode] = []
    """Keys for /metrics (Prometheus `authorization: Bearer`); they are not client keys."""
    gateway_db_path: Path = Path("data/gateway.sqlite3")
    """SQLite database for managed keys and the per-request usage log."""

    # --- gateway: upstream ----------------------------------------------------------------
    gateway_upstream_url: str | None = None
    """Front an existing OpenAI-compatible server (base URL, with or without /v1)."""
    gateway_upstream_api_key: SecretStr | None = None
    gateway_upstream_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    """HTTP transport under httpx's API; aiohttp measured cheaper per chunk (bench/)."""
    gateway_connect_timeout: float = Field(5.0, gt=0)
    gateway_read_timeout: float = Field(600.0, gt=0)
    """Longest silence from the engine (a stream's idle time, or a whole JSON answer);
    offloaded prefill can take minutes."""
    gateway_max_connections: int = Field(256, ge=1)

    # --- gateway: request shaping ---------------------------------------------------------
    gateway_model_aliases: Annotated[dict[str, str], NoDecode] = {}
    """alias=target pairs, comma-separated (or a JSON object), e.g. gpt-4o-mini=qwen2.5-7b."""
    gateway_context_length: int | None = Field(None, ge=1)
    """Context window when the upstream does not report one."""
    gateway_default_max_tokens: int = Field(1024, ge=1)
    """max_tokens for requests that send none: slow engines must not run to the context end."""
    gateway_max_body_bytes: int = Field(1024 * 1024, ge=1024)

    # --- gateway: admission and streaming -------------------------------------------------
    gateway_max_inflight: int | None = Field(None, ge=1)
    """Requests sent to the engine at once; default: the engine's batch size."""
    gateway_queue_size: int = Field(64, ge=0)
    gateway_queue_timeout: float = Field(60.0, ge=0)
    gateway_keepalive_seconds: float = Field(10.0, ge=0)
    """SSE comment interval while the engine is silent; 0 turns keep-alives off."""
    gateway_drain_seconds: float = Field(30.0, ge=0)
    """On SIGTERM, how long in-flight requests may finish before they are cut."""
    gateway_log_level: str = "info"

    # --- engine (managed; ignored when GATEWAY_UPSTREAM_URL is set) -----------------------
    engine_backend: Literal["auto", "vllm", "llamacpp"] = "auto"
    """auto: vLLM when CUDA and vLLM are present, else llama.cpp on the CPU."""
    engine_model: str | None = None
    """HF directory or Hub id (vLLM); GGUF path or repo:file (llama.cpp); unset: default."""
    engine_vram: int | None = None
    """VRAM budget for the engine, e.g. 6GiB; default: what the GPU has free."""
    engine_context: int | None = Field(None, ge=256)
    engine_concurrency: int | None = Field(None, ge=1)
    engine_gpu_memory: int | None = None
    """Override the GPU's total memory (what-if planning)."""
    engine_host_memory: int | None = None
    """Override the host's RAM (what-if planning)."""
    engine_models_dir: Path = Path("models")
    """Where downloaded and assembled GGUF files are cached."""
    engine_ready_timeout: float = Field(900.0, gt=0)
    engine_max_restarts: int = Field(5, ge=0)
    engine_max_replans: int = Field(3, ge=0)
    engine_threads: int | None = Field(None, ge=1)
    """llama.cpp CPU threads; default: the cores this process may use."""
    engine_extra_args: str = ""
    """Extra engine CLI arguments, appended last, shell-quoted (an escape hatch)."""
    engine_command: str | None = None
    """The command that starts the engine's server, e.g. vLLM from its own virtualenv:
    `/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server`."""

    @field_validator("gateway_api_keys", "gateway_admin_api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("gateway_model_aliases", mode="before")
    @classmethod
    def _aliases(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value.strip().startswith("{"):
            return json.loads(value)
        pairs = (item.split("=", 1) for item in _split_commas(value))
        try:
            return {alias.strip(): target.strip() for alias, target in pairs}
        except ValueError:
            raise ValueError("write aliases as alias=target,alias2=target2") from None

    @field_validator("engine_vram", "engine_gpu_memory", "engine_host_memory", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        return None if value in (None, "") else parse_size(value)

    @field_validator("gateway_api_keys", "gateway_admin_api_keys")
    @classmethod
    def _no_placeholder_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            secret = key.get_secret_value()
            if secret.startswith("changeme") or len(secret) < 8:
                raise ValueError("API keys must be at least 8 characters and not a placeholder")
        return keys
