"""Build the managed engine: pick the backend, resolve and plan the model, wrap a supervisor."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from engine.backends.base import Backend
from engine.backends.llamacpp import LlamaCppBackend
from engine.backends.vllm import VllmBackend
from engine.facts import FactsError, GpuFacts, HostFacts, detect_gpus, detect_host, load_model_facts
from engine.models import ModelError, resolve_gguf
from engine.planner import PlanError, PlanRequest
from engine.supervisor import Supervisor, SupervisorConfig

DEFAULT_VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"


class EngineSetupError(Exception):
    """The engine cannot be set up as asked; the message says why and what to change."""


@dataclass(frozen=True)
class EngineOptions:
    backend: Literal["auto", "vllm", "llamacpp"] = "auto"
    model: str | None = None
    vram: int | None = None
    context: int | None = None
    concurrency: int | None = None
    gpu_memory: int | None = None
    host_memory: int | None = None
    models_dir: Path = Path("models")
    threads: int | None = None
    extra_args: Sequence[str] = ()
    command: Sequence[str] | None = None
    """Replaces the backend's own server command (`python -m ...`)."""
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)


def choose_backend(wanted: str, gpus: list[GpuFacts]) -> Literal["vllm", "llamacpp"]:
    """vLLM where there is an NVIDIA GPU and vLLM is installed; llama.cpp elsewhere."""
    if wanted == "vllm":
        return "vllm"
    if wanted == "llamacpp":
        return "llamacpp"
    return "vllm" if gpus and importlib.util.find_spec("vllm") is not None else "llamacpp"


def build_backend(options: EngineOptions) -> Backend:
    gpus = detect_gpus()
    kind = choose_backend(options.backend, gpus)
    try:
        if kind == "vllm":
            return _vllm(options, gpus)
        if importlib.util.find_spec("llama_cpp") is None:
            raise EngineSetupError(
                "no engine installed: llama-cpp-python for the CPU (pip install -e '.[cpu]', "
                "or `make serve`), or vLLM on an NVIDIA GPU (pip install -e '.[vllm]')"
            )
        resolved = resolve_gguf(options.model, options.models_dir)
        return LlamaCppBackend(
            resolved,
            gpu=gpus[0] if gpus else None,
            vram=options.vram,
            context=options.context,
            threads=options.threads,
            extra_args=options.extra_args,
            command=options.command,
        )
    except (FactsError, PlanError, ModelError) as exc:
        raise EngineSetupError(str(exc)) from exc


def _vllm(options: EngineOptions, gpus: list[GpuFacts]) -> VllmBackend:
    if not gpus and options.gpu_memory is None:
        raise EngineSetupError(
            "vLLM needs an NVIDIA GPU and none was found (ENGINE_BACKEND=llamacpp runs on the CPU)"
        )
    gpu = gpus[0] if gpus else GpuFacts("planned GPU", 0, 0)
    if options.gpu_memory is not None:
        gpu = replace(gpu, total_bytes=options.gpu_memory, free_bytes=options.gpu_memory)
    host = detect_host()
    if options.host_memory is not None:
        host = HostFacts(options.host_memory, options.host_memory)
    model = load_model_facts(options.model or DEFAULT_VLLM_MODEL)
    request = PlanRequest(options.vram, options.context, options.concurrency)
    return VllmBackend(
        model, gpu, host, request, extra_args=options.extra_args,
        detect_free=lambda: next((g.free_bytes for g in detect_gpus()), None),
        command=options.command,
    )  # fmt: skip


def build_engine(options: EngineOptions) -> Supervisor:
    return Supervisor(build_backend(options), options.supervisor)
