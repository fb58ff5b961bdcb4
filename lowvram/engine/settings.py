"""The managed engine's settings: `ENGINE_*` from the environment and `.env`.

    settings = EngineSettings(vram="6GiB")        # keyword arguments win over the environment
    engine = build_engine(settings)               # engine/factory.py takes it as it is

Each field's docstring is its `--help` text and its line in `.env.example`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from lowvram.paths import data_dir


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ENGINE_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
        use_attribute_docstrings=True,
        allow_inf_nan=False,  # an infinite timeout is a hang, and NaN compares false
    )

    backend: Literal["auto", "vllm", "llamacpp"] = "auto"
    """auto: vLLM with an NVIDIA GPU and vLLM installed, else llama.cpp on the CPU."""
    model: str | None = None
    """vLLM: HF directory or Hub id. llama.cpp: GGUF path or owner/repo:file.gguf."""
    models: Annotated[dict[str, str], NoDecode] = {}
    """Several models on one port, as name=model,name2=model2 (vLLM: HF directories or Hub
    ids; llama.cpp: GGUF paths or owner/repo:file.gguf); clients pick one by name, the
    first is the default. Instead of ENGINE_MODEL."""
    models_loaded: int | None = Field(None, ge=1)
    """With ENGINE_MODELS on llama.cpp: how many stay loaded at once (a request for another
    stops the least recently used); default: as many as RAM holds."""
    sleep_level: Literal[1, 2] | None = None
    """With ENGINE_MODELS on vLLM: 1 keeps a sleeping model's weights in host memory (fast
    wake), 2 drops them (read again on wake); default: 1 where host memory holds them."""
    swap_min_awake: float = Field(2.0, ge=0)
    """With ENGINE_MODELS on vLLM: seconds a woken model keeps taking new requests while
    requests for another wait (no thrashing)."""
    swap_drain_seconds: float = Field(30.0, gt=0)
    """With ENGINE_MODELS on vLLM: seconds a swap waits for the running requests of the
    model going to sleep; those still running then are ended."""
    vram: ByteSize | None = None
    """VRAM the engine may use, e.g. 6GiB; default: what the GPU has free, less 5%."""
    context: int | None = Field(None, ge=256)
    """Context length to plan for (tokens); default 4096, capped by the model."""
    concurrency: int | None = Field(None, ge=1)
    """Sequences the engine runs at once (vLLM default 8, llama.cpp 4)."""
    gpus: int | None = Field(None, ge=1)
    """GPUs to serve on (vLLM); the budget is per GPU. Default: every visible one, or 1
    when ENGINE_VRAM is set without it."""
    replicas: int | None = Field(None, ge=1)
    """Engines behind the gateway, each serving the whole model: vLLM splits the GPUs
    evenly between them (tensor parallel within one), llama.cpp the CPU threads. Default:
    on GPUs the planner's choice (the most tokens/s), on the CPU 1."""
    quantization: Literal["auto", "none", "fp8", "bitsandbytes"] = "auto"
    """vLLM's weight format: auto (the planner's ladder), or this one (none: the dtype)."""
    optimize: Literal["throughput", "latency"] = "throughput"
    """vLLM plans for tokens/s over all sequences (throughput), or for one stream's speed."""
    offload_vocab: Literal["auto", "embed", "all", "none"] = "auto"
    """vLLM: move the vocabulary tensors to host memory with the layers (lowvram's vLLM
    plugin): auto (the planner's choice), embed (the input embedding), all (and the
    lm_head, read over PCIe every step), none."""
    gpu_memory: ByteSize | None = None
    """Plan for a GPU of this size instead of the one present (what-if planning)."""
    host_memory: ByteSize | None = None
    """Plan for this much host RAM instead of what is present (what-if planning)."""
    pcie_bandwidth: ByteSize | None = None
    """Host-to-GPU bytes per second (e.g. 25GB); default: from the PCIe link's generation."""
    models_dir: Path = Field(default_factory=lambda: data_dir() / "models")
    """Where downloaded and assembled GGUF files are cached."""
    log_file: Path = Field(default_factory=lambda: data_dir() / "engine.log")
    """The engine's own output, every line (the gateway's log has a summary); replicas
    write engine-0.log, engine-1.log, ... beside it."""
    ready_timeout: float = Field(900.0, gt=0)
    """Seconds an engine start may take (vLLM: minutes on a cold machine)."""
    max_restarts: int = Field(1, ge=0)
    """Restarts after crashes right after a start (within a minute) before giving up."""
    max_replans: int = Field(3, ge=0)
    """Start-up memory failures answered by re-planning one rung down, before giving up."""
    tool_parser: str | None = None
    """vLLM's tool-call parser (hermes, llama3_json, mistral, ...; none: off); default:
    chosen from the model family and its chat template."""
    reasoning_parser: str | None = None
    """vLLM's reasoning parser (deepseek_r1, qwen3, ...; none: off); default: by model."""
    threads: int | None = Field(None, ge=1)
    """llama.cpp CPU threads; default: the cores this process may use."""
    extra_args: str = ""
    """Extra engine arguments, appended after the plan's (shell-quoted)."""
    command: str | None = None
    """The engine server's command, e.g. vLLM from its own virtualenv:
    `/opt/vllm/bin/python -m vllm.entrypoints.openai.api_server`."""

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        models: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in value.split(","))):
            name, sep, source = item.partition("=")
            name, source = name.strip(), source.strip()
            if not sep or not name or not source:
                raise ValueError(f"write models as name=model,name2=model2 (got {item!r})")
            if name in models:
                raise ValueError(f"model name {name!r} is given twice")
            models[name] = source
        return models

    @field_validator("models")
    @classmethod
    def _model_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not _MODEL_NAME.fullmatch(name):
                raise ValueError(
                    f"model name {name!r}: use letters, digits and . _ - / : (no spaces)"
                )
        return value

    @model_validator(mode="after")
    def _one_way_to_name_models(self) -> EngineSettings:
        if self.models and self.model:
            raise ValueError("set ENGINE_MODEL or ENGINE_MODELS, not both")
        return self


_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:-]*")
