"""Build the managed engine from its settings: pick the backend, plan, wrap supervisors.

    engine = build_engine(EngineSettings())   # raises an EngineError that says what to fix

One engine is one `Supervisor` (ENGINE_MODELS on llama.cpp: one router serving them all);
several (ENGINE_REPLICAS, or the vLLM planner's choice on several GPUs) are a `Replicas`
pool of them, each with its own log file; ENGINE_MODELS on vLLM is a `SwapPool` of an
engine per model, one awake at a time. Everything
that can fail before the engines run (no GPU, no model, no plan that fits) fails here,
before the gateway listens.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from typing import Literal

from lowvram.engine.backend import Backend
from lowvram.engine.errors import ModelError, PlanError, SetupError
from lowvram.engine.handle import EngineHandle
from lowvram.engine.hardware import Hardware, detect_hardware
from lowvram.engine.replicas import Replicas
from lowvram.engine.settings import EngineSettings
from lowvram.engine.supervisor import Supervisor
from lowvram.engine.swap import SwapPolicy
from lowvram.engine.units import gib

DEFAULT_VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"

logger = logging.getLogger(__name__)


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
        if hardware.gpu is None:
            raise SetupError(
                "vLLM needs an NVIDIA GPU and none was found "
                "(ENGINE_BACKEND=llamacpp serves on the CPU; ENGINE_GPU_MEMORY plans for one)"
            )
        from lowvram.engine.vllm.backend import VllmBackend
        from lowvram.engine.vllm.deployment import plan_deployment
        from lowvram.engine.vllm.environment import missing_plugin
        from lowvram.engine.vllm.model import load_model_facts

        missing = missing_plugin(settings.command)
        if settings.models:
            return vllm_models(settings, hardware, missing)
        model = load_model_facts(settings.model or DEFAULT_VLLM_MODEL)
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


def vllm_models(
    settings: EngineSettings, hardware: Hardware, plugin_missing: str | None
) -> tuple[list[Backend], list[str]]:
    """ENGINE_MODELS on vLLM: an engine per model with sleep mode, each planned for the
    budget less what the sleeping others keep (vllm/several.py)."""
    from lowvram.engine.vllm.backend import VllmBackend
    from lowvram.engine.vllm.deployment import plan_deployment
    from lowvram.engine.vllm.memory import HOST_RESERVE
    from lowvram.engine.vllm.model import ModelFacts, load_model_facts
    from lowvram.engine.vllm.several import SLEEPING_RESIDUAL, budget_each, host_room
    from lowvram.engine.vllm.sleep import SharedGpu

    if (settings.replicas or 1) > 1 or (settings.gpus or 1) > 1:
        raise SetupError("ENGINE_MODELS on vLLM runs on one GPU: leave ENGINE_REPLICAS unset")
    # A model that cannot be found is left out, said on its own; the others serve.
    found: dict[str, ModelFacts] = {}
    for name, source in settings.models.items():
        try:
            found[name] = load_model_facts(source)
        except ModelError as exc:
            logger.warning("model %s left out: %s", name, exc)
    if not found:
        raise ModelError("none of ENGINE_MODELS could be found (the log says why for each)")
    each = budget_each(settings, hardware, len(found))
    asleep = (len(found) - 1) * SLEEPING_RESIDUAL  # the others, while one runs
    engines: list[VllmBackend] = []
    for name, model in found.items():
        source = settings.models[name]
        alone = settings.model_copy(update={"model": source, "models": {}, "vram": each})
        try:
            deployment = plan_deployment(model, hardware, alone, plugin_missing=plugin_missing)
        except PlanError as exc:
            raise PlanError(
                f"{name}: {exc} (the other models, asleep, keep {gib(asleep)} of the budget)"
            ) from exc
        shared = SharedGpu(served_name=name, others_bytes=asleep)
        engines.append(VllmBackend(model, hardware, alone, deployment=deployment, shared=shared))
    names = list(found)
    if host_room([e.plan for e in engines], hardware) < 0:
        listed = ", ".join(
            f"{n} {gib(e.plan.host_offload_bytes)}"
            for n, e in zip(names, engines, strict=True)
            if e.plan.host_offload_bytes
        )
        available = hardware.host.available_bytes - HOST_RESERVE
        raise PlanError(
            f"the models' weights in host memory add up to more than the host has free "
            f"({listed}; {gib(available)} available beside {gib(HOST_RESERVE)} kept): raise "
            "ENGINE_VRAM so that less is offloaded, or serve fewer models"
        )
    return list(engines), names


def build_engine(settings: EngineSettings) -> EngineHandle | Replicas:
    backends, names = build_backends(settings)
    if settings.models and len(backends) > 1:
        from lowvram.engine.vllm.backend import VllmBackend
        from lowvram.engine.vllm.several import SwapPool, sleep_level

        plans = [b.plan for b in backends if isinstance(b, VllmBackend)]
        level = settings.sleep_level or sleep_level(plans, detect_hardware(settings))
        policy = SwapPolicy(settings.swap_min_awake, settings.swap_drain_seconds)
        members = supervise_each(backends, names, settings)
        return SwapPool(members, names, level, policy, settings.ready_timeout)
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
