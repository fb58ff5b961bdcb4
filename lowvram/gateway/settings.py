"""The gateway's settings: `GATEWAY_*` from the environment and `.env`.

Precedence: keyword arguments (the CLI's flags) > environment > `.env` > defaults, so
`GATEWAY_API_KEYS=... make serve` works whatever `.env` says. Each field's docstring is its
`--help` text and its line in `.env.example`.
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lowvram.paths import data_dir

LogLevel = Literal["debug", "info", "warning", "error"]


# A DNS name, an IPv4 address, or an IPv6 one (urlsplit drops its brackets).
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _without_password(url: str) -> str:
    return re.sub(r"//[^/@\s]*@", "//***@", url)


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEWAY_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,  # an infinite timeout is a hang, and NaN compares false
    )

    # --- network and keys ------------------------------------------------------------------
    host: str = "127.0.0.1"
    """Address the gateway binds; 0.0.0.0 to serve other machines (Docker sets it)."""
    port: int = Field(8000, ge=0, le=65535)
    """Port the gateway listens on."""
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    """Client keys accepted besides the SQLite ones, comma-separated, 8+ characters."""
    admin_api_keys: Annotated[list[SecretStr], NoDecode] = []
    """Keys for GET /metrics (Prometheus: authorization Bearer); they are not client keys."""
    db_path: Path = Field(default_factory=lambda: data_dir() / "gateway.sqlite3")
    """SQLite file holding managed keys and the per-request usage log."""
    allow_no_key: bool = False
    """Let requests without a key (or with one it does not know) through, as 'anonymous':
    for a private machine and local tools that send none. Refused unless the gateway binds
    a loopback address (see GATEWAY_ALLOW_NO_KEY_ON_NETWORK); /metrics keeps its admin key."""
    allow_no_key_on_network: bool = False
    """Allow GATEWAY_ALLOW_NO_KEY on an address other machines reach: anyone who reaches
    the port can then use the model."""
    cors_origins: Annotated[list[str], NoDecode] = []
    """Browser origins that may call the API (CORS), comma-separated, e.g.
    http://localhost:3000; none by default. Their requests still need a key."""

    # --- an existing engine instead of a managed one ---------------------------------------
    upstream_url: Annotated[list[str], NoDecode] = []
    """Front this OpenAI-compatible server (base URL, with or without /v1), or several of the
    same model, comma-separated (replicas); no engine starts."""
    upstream_api_key: SecretStr | None = None
    """Sent upstream as Authorization: Bearer, if the server needs one."""
    upstream_transport: Literal["aiohttp", "httpx"] = "aiohttp"
    """HTTP transport under httpx's API: aiohttp (measured cheaper per chunk) or httpx."""
    connect_timeout: float = Field(5.0, gt=0)
    """Seconds to connect to the engine."""
    read_timeout: float = Field(600.0, gt=0)
    """Longest silence from the engine: a stream's idle time, or a whole JSON answer (s)."""
    max_connections: int = Field(256, ge=1)
    """Connections kept to the engine at most."""
    replica_slow_seconds: float = Field(30.0, gt=0)
    """With several engines: a stream whose first event takes longer counts against its
    engine (three such, or failures, in a row take it out for a while). Raise it for slow
    CPU engines with long prompts."""

    # --- requests ----------------------------------------------------------------------------
    model_aliases: Annotated[dict[str, str], NoDecode] = {}
    """alias=target pairs, comma-separated (or a JSON object), e.g. gpt-4o-mini=qwen2.5-7b."""
    context_length: int | None = Field(None, ge=1)
    """Context window when an upstream does not report one (managed engines do)."""
    default_max_tokens: int = Field(1024, ge=1)
    """max_tokens for requests that send none: slow engines must not run to the context end."""
    max_body_bytes: ByteSize = Field(ByteSize(1024 * 1024), ge=1024)
    """Largest request body; larger gets 413."""

    # --- client connections ------------------------------------------------------------------
    header_timeout: float = Field(10.0, gt=0)
    """Seconds a client connection may take to send a request's headers, from its start or
    its previous response; then it is closed (idle and slow-header connections)."""
    body_timeout: float = Field(60.0, gt=0)
    """Seconds a request's body may take to arrive; then 408 and the connection closes."""
    max_client_connections: int | None = Field(None, ge=16)
    """Client connections open at once; past it the longest idle one is closed. Default:
    what the process's open-file limit allows (raised to its hard limit at start)."""

    # --- admission and streaming -------------------------------------------------------------
    max_inflight: int | None = Field(None, ge=1)
    """Requests at the engine at once; default: the engine's batch size where it says
    (managed engines, llama.cpp's server), else 256 (vLLM's own default)."""
    queue_size: int = Field(1024, ge=0)
    """Requests that may wait for a slot; beyond that, 429 with Retry-After."""
    queue_timeout: float = Field(60.0, ge=0)
    """Seconds a request may wait in the queue before 429."""
    max_event_bytes: ByteSize = Field(ByteSize(1024 * 1024), ge=1024)
    """Longest SSE event the gateway relays; an engine that sends a longer one is cut off."""
    keepalive_seconds: float = Field(10.0, ge=0)
    """Seconds between SSE keep-alive comments while the engine is silent; 0: none."""
    drain_seconds: float = Field(30.0, ge=0)
    """On SIGTERM, seconds in-flight requests may take to finish before they are cut."""
    log_level: LogLevel = "info"
    """Log level: debug, info, warning, error. One line per request."""
    log_format: Literal["auto", "json", "text"] = "auto"
    """Logs as JSON lines (for machines), text (for a person), or auto: text in a terminal,
    JSON elsewhere."""

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("upstream_url", "cors_origins", mode="before")
    @classmethod
    def _url_list(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            url = urlsplit(origin)
            if origin != "*" and (url.scheme not in ("http", "https") or not url.netloc):
                raise ValueError(f"{origin!r} is not an origin, like http://localhost:3000")
        return [origin.rstrip("/") for origin in origins]

    @field_validator("upstream_url")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for value in urls:
            url = urlsplit(value)
            if url.scheme not in ("http", "https") or not _HOST.fullmatch(url.hostname or ""):
                raise ValueError(
                    f"{_without_password(value)!r} must be an http(s) URL with a host name, "
                    "like http://127.0.0.1:8001/v1"
                )
            try:
                url.port  # noqa: B018 (parsing the port is the check)
            except ValueError:
                raise ValueError(
                    f"{_without_password(value)!r} has a port that is not a number"
                ) from None
        return urls

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("model_aliases", mode="before")
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

    @model_validator(mode="after")
    def _no_key_only_on_loopback(self) -> GatewaySettings:
        if self.allow_no_key and not self.allow_no_key_on_network and not _loopback(self.host):
            raise ValueError(
                f"GATEWAY_ALLOW_NO_KEY lets anyone use the model, and GATEWAY_HOST={self.host} "
                "is reachable from other machines: bind 127.0.0.1, or also set "
                "GATEWAY_ALLOW_NO_KEY_ON_NETWORK=true"
            )
        return self

    @field_validator("api_keys", "admin_api_keys")
    @classmethod
    def _no_placeholder_keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        for key in keys:
            secret = key.get_secret_value()
            if secret.startswith("changeme") or len(secret) < 8:
                raise ValueError("API keys must be at least 8 characters and not a placeholder")
        return keys
