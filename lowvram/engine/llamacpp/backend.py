"""llama-cpp-python's OpenAI server: the CPU (and small-GPU) engine for GGUF models.

llama-cpp-python runs one request at a time, so the plan tells the gateway `max_batch=1`
and the gateway queues the rest. It would otherwise cut a running stream short whenever
the next request arrives (`interrupt_requests`, on by default): we turn that off.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import replace

from lowvram.engine.backend import Launch
from lowvram.engine.errors import SetupError
from lowvram.engine.handle import ServedModel
from lowvram.engine.hardware import Hardware
from lowvram.engine.llamacpp.fetch import resolve_gguf
from lowvram.engine.llamacpp.gguf import read_metadata
from lowvram.engine.llamacpp.plan import MIN_CONTEXT, LlamaCppPlan, plan_llamacpp, usable_cores
from lowvram.engine.settings import EngineSettings

FAILURES = {
    "out_of_memory": ("out of memory", "failed to allocate", "cudaMalloc failed"),
}
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_N_CTX = re.compile(r"n_ctx\s*=\s*(\d+)")


class LlamaCppBackend:
    name = "llamacpp"
    health_path = "/v1/models"

    def __init__(self, plan: LlamaCppPlan, settings: EngineSettings) -> None:
        self.plan = plan
        command = shlex.split(settings.command) if settings.command else None
        self._command = command or [sys.executable, "-m", "llama_cpp.server"]
        self._extra_args = shlex.split(settings.extra_args)
        self.observed: dict[str, int] = {}

    @classmethod
    def from_settings(cls, settings: EngineSettings, hardware: Hardware) -> LlamaCppBackend:
        """Resolve the model (fetching it if need be) and plan it for this machine."""
        if settings.command is None and importlib.util.find_spec("llama_cpp") is None:
            raise SetupError(
                "no engine installed: llama-cpp-python for the CPU (pip install -e '.[cpu]', "
                "or `make serve`), or vLLM on an NVIDIA GPU (pip install -e '.[vllm]')"
            )
        model = resolve_gguf(settings.model, settings.models_dir)
        plan = plan_llamacpp(
            model,
            read_metadata(model.path),
            gpu=hardware.gpu,
            vram=int(settings.vram) if settings.vram is not None else None,
            context=settings.context,
            threads=settings.threads or usable_cores(),
        )
        return cls(plan, settings)

    def launch(self, port: int, api_key: str) -> Launch:
        self.observed = {}
        argv = [
            *self._command,
            *self.plan.to_argv(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *self._extra_args,
        ]
        # llama-cpp-python lets HOST and PORT from the environment override its flags, and
        # reads its key (API_KEY) and a CONFIG_FILE from there: set or clear all four.
        env: dict[str, str | None] = {
            "API_KEY": api_key,
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "CONFIG_FILE": None,
        }
        return Launch(argv, env, self.plan.explain())

    def served_model(self) -> ServedModel:
        return ServedModel(
            id=self.plan.model.served_name,
            context_length=self.plan.n_ctx,
            max_batch=1,
            tokenizer="llamacpp",
            stream_usage=False,
            chat_template=self.plan.chat_template,
        )

    def observe(self, line: str) -> None:
        if match := _OFFLOADED.search(line):
            self.observed["gpu_layers"] = int(match.group(1))
        elif "n_ctx" in line and (match := _N_CTX.search(line)) and "n_ctx" not in self.observed:
            self.observed["n_ctx"] = int(match.group(1))

    def failure(self, tail: Sequence[str]) -> str | None:
        text = "\n".join(tail).lower()
        for kind, needles in FAILURES.items():
            if any(needle in text for needle in needles):
                return kind
        return None

    def step_down(self, failure: str) -> str | None:
        plan = self.plan
        if plan.n_gpu_layers:
            self.plan = replace(plan, n_gpu_layers=plan.n_gpu_layers * 3 // 4)
            return f"{self.plan.n_gpu_layers} layers on the GPU (was {plan.n_gpu_layers})"
        if plan.n_ctx > MIN_CONTEXT:
            self.plan = replace(plan, n_ctx=max(MIN_CONTEXT, plan.n_ctx // 2))
            return f"context {self.plan.n_ctx} (was {plan.n_ctx})"
        return None

    def verify(self) -> list[str]:
        problems = []
        layers = self.observed.get("gpu_layers")
        if layers is not None and self.plan.n_gpu_layers and layers < self.plan.n_gpu_layers:
            problems.append(
                f"llama.cpp put {layers} layers on the GPU, the plan {self.plan.n_gpu_layers} "
                "(is llama-cpp-python built with CUDA?)"
            )
        n_ctx = self.observed.get("n_ctx")
        if n_ctx is not None and n_ctx < self.plan.n_ctx:
            problems.append(f"llama.cpp runs a {n_ctx}-token context, the plan {self.plan.n_ctx}")
        return problems

    def report(self) -> str:
        return (
            f"llama.cpp ready: {self.plan.model.served_name}, context {self.plan.n_ctx}, "
            f"{self.observed.get('gpu_layers', 0)}/{self.plan.layers} layers on the GPU, "
            f"{self.plan.n_threads} threads"
        )
