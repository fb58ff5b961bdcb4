"""Build the managed engine from its settings: pick the backend, plan, wrap supervisors.

    engine = build_engine(EngineSettings())   # raises an EngineError that says what to fix

One engine is one `Supervisor` (ENGINE_MODELS on llama.cpp: one router serving them all);
several (ENGINE_REPLICAS, or the vLLM planner's choice on several GPUs) are a `Replicas`
pool of them, each with its own log file. Everything
that can fail before the engines run (no GPU, no model, no plan that fits) fails here,
before the gateway listens.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Literal

from lowvram.engine.backend import Backend
from lowvram.engine.errors import SetupError
from lowvram.engine.handle import EngineHandle
from lowvram.engine.hardware import Hardware, detect_hardware
from lowvram.engine.replicas import Replicas
from lowvram.engine.settings import EngineSettings
from lowvram.engine.supervisor import Supervisor

DEFAULT_VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"


def choose_backend(settings: EngineSettings, hardware: Hardware) -> Literal["vllm", "llamacpp"]:
    """vLLM where there is an NVIDIA GPU and vLLM is installed; llama.cpp elsewhere."""
    if settings.backend != "auto":
        return settings.backend
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if hardware.gpu is not None and has_vllm else "llamacpp"


def build_backends(settings: EngineSettings) -> tuple[list[Backend], list[str]]:
    """One backend per engine to run, and the engines' names (for logs, /ready, /metrics)."""
    hardware = detect_hardware(settings)
    if choose_backend(settings, hardware) == "vllm":
        if settings.models:
            raise SetupError(
                "ENGINE_MODELS runs on llama.cpp for now (ENGINE_BACKEND=llamacpp); with vLLM, "
                "serve one model per gateway (ENGINE_MODEL)"
            )
        if hardware.gpu is None:
            raise SetupError(
                "vLLM needs an NVIDIA GPU and none was found "
                "(ENGINE_BACKEND=llamacpp serves on the CPU; ENGINE_GPU_MEMORY plans for one)"
            )
        from lowvram.engine.vllm.backend import VllmBackend
        from lowvram.engine.vllm.deployment import plan_deployment
        from lowvram.engine.vllm.environment import missing_plugin
        from lowvram.engine.vllm.model import load_model_facts

        model = load_model_facts(settings.model or DEFAULT_VLLM_MODEL)
        missing = missing_plugin(settings.command)
        deployment = plan_deployment(model, hardware, settings, plugin_missing=missing)
        backends: list[Backend] = [
            VllmBackend(model, hardware, settings, deployment=deployment, replica=i)
            for i in range(deployment.replicas)
        ]
        names = ["gpu" + "+".join(str(i) for i in group) for group in deployment.groups]
        return backends, names
    if settings.models:
        if (settings.replicas or 1) > 1:
            raise SetupError("ENGINE_MODELS serves each model once: leave ENGINE_REPLICAS unset")
        from lowvram.engine.llamacpp.router import LlamaCppRouterBackend

        return [LlamaCppRouterBackend.from_settings(settings, hardware)], ["cpu0"]
    from lowvram.engine.llamacpp.backend import LlamaCppBackend

    replicas = settings.replicas or 1
    return list(LlamaCppBackend.from_settings(settings, hardware, replicas)), [
        f"cpu{i}" for i in range(replicas)
    ]


def build_engine(settings: EngineSettings) -> EngineHandle | Replicas:
    backends, names = build_backends(settings)
    if len(backends) == 1:
        return Supervisor(backends[0], settings)
    return Replicas(supervise_each(backends, names, settings), names)


def supervise_each(
    backends: Sequence[Backend], names: Sequence[str], settings: EngineSettings
) -> list[Supervisor]:
    """A supervisor per replica, each writing its engine's output to its own file."""
    log = settings.log_file
    return [
        Supervisor(
            backend,
            settings.model_copy(update={"log_file": log.with_name(f"{log.stem}-{i}{log.suffix}")}),
            name=name,
        )
        for i, (backend, name) in enumerate(zip(backends, names, strict=True))
    ]
