"""Build the managed engine from its settings: pick the backend, plan, wrap a supervisor.

    engine = build_engine(EngineSettings())   # raises an EngineError that says what to fix

Everything that can fail before the engine runs (no GPU, no model, no plan that fits)
fails here, before the gateway listens.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from lowvram.engine.backend import Backend
from lowvram.engine.errors import SetupError
from lowvram.engine.hardware import Hardware, detect_hardware
from lowvram.engine.settings import EngineSettings
from lowvram.engine.supervisor import Supervisor

DEFAULT_VLLM_MODEL = "Qwen/Qwen2.5-7B-Instruct"


def choose_backend(settings: EngineSettings, hardware: Hardware) -> Literal["vllm", "llamacpp"]:
    """vLLM where there is an NVIDIA GPU and vLLM is installed; llama.cpp elsewhere."""
    if settings.backend != "auto":
        return settings.backend
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if hardware.gpu is not None and has_vllm else "llamacpp"


def build_backend(settings: EngineSettings) -> Backend:
    hardware = detect_hardware(settings)
    if choose_backend(settings, hardware) == "vllm":
        if hardware.gpu is None:
            raise SetupError(
                "vLLM needs an NVIDIA GPU and none was found "
                "(ENGINE_BACKEND=llamacpp serves on the CPU; ENGINE_GPU_MEMORY plans for one)"
            )
        from lowvram.engine.vllm.backend import VllmBackend
        from lowvram.engine.vllm.model import load_model_facts

        model = load_model_facts(settings.model or DEFAULT_VLLM_MODEL)
        return VllmBackend(model, hardware, settings)
    from lowvram.engine.llamacpp.backend import LlamaCppBackend

    return LlamaCppBackend.from_settings(settings, hardware)


def build_engine(settings: EngineSettings) -> Supervisor:
    return Supervisor(build_backend(settings), settings)
