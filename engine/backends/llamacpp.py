"""llama-cpp-python's OpenAI server: the CPU (and small-GPU) engine for GGUF models.

llama-cpp-python runs one request at a time, so the plan tells the gateway `max_batch=1`
and the gateway queues the rest. It would otherwise cut a running stream short whenever
the next request arrives (`interrupt_requests`, on by default): we turn that off.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from engine.backends.base import Launch
from engine.facts import GpuFacts
from engine.gguf import read_metadata
from engine.handle import ServedModel
from engine.models import ResolvedModel
from engine.units import MiB, gib

DEFAULT_CONTEXT = 4096
MIN_CONTEXT = 512
GPU_OVERHEAD = 512 * MiB
"""CUDA context and compute buffers of a llama.cpp process with layers on the GPU."""

FAILURES = {
    "out_of_memory": ("out of memory", "failed to allocate", "cudaMalloc failed"),
}
_OFFLOADED = re.compile(r"offloaded (\d+)/(\d+) layers to GPU")
_N_CTX = re.compile(r"n_ctx\s*=\s*(\d+)")


@dataclass(frozen=True)
class LlamaCppPlan:
    model: ResolvedModel
    n_ctx: int
    n_gpu_layers: int
    n_threads: int
    layers: int
    reasons: tuple[str, ...]
    chat_template: str | None = None

    def to_argv(self) -> list[str]:
        return [
            "--model", str(self.model.path),
            "--model_alias", self.model.served_name,
            "--n_ctx", str(self.n_ctx),
            "--n_gpu_layers", str(self.n_gpu_layers),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--interrupt_requests", "False",
        ]  # fmt: skip

    def explain(self) -> str:
        lines = [
            f"plan for {self.model.served_name} ({self.model.source}): {self.model.path}",
            f"  context {self.n_ctx} tokens, {self.n_gpu_layers}/{self.layers} layers on the GPU,"
            f" {self.n_threads} CPU threads",
        ]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons])


def plan_llamacpp(
    model: ResolvedModel,
    metadata: dict[str, Any],
    *,
    gpu: GpuFacts | None,
    vram: int | None,
    context: int | None,
    threads: int,
) -> LlamaCppPlan:
    arch = metadata.get("general.architecture", "llama")
    layers = int(metadata.get(f"{arch}.block_count", 0))
    trained = int(metadata.get(f"{arch}.context_length", DEFAULT_CONTEXT))
    n_ctx = max(MIN_CONTEXT, min(context or DEFAULT_CONTEXT, trained))
    reasons = [f"context {n_ctx} of the {trained} the model was trained for"]
    gpu_layers = 0
    if gpu is not None and layers:
        budget = vram if vram is not None else int(gpu.free_bytes * 0.9)
        kv = _kv_bytes(metadata, arch, n_ctx)
        per_layer = model.path.stat().st_size / layers
        gpu_layers = max(0, min(layers, int((budget - GPU_OVERHEAD - kv) // per_layer)))
        reasons.append(
            f"{gpu_layers} of {layers} layers ({gib(gpu_layers * per_layer)}) fit in {gib(budget)} "
            "beside the KV cache; the rest run on the CPU"
        )
    else:
        reasons.append("no GPU: every layer on the CPU")
    reasons.append(f"{threads} threads: the cores this process may use")
    template = metadata.get("tokenizer.chat_template")
    return LlamaCppPlan(
        model, n_ctx, gpu_layers, threads, layers, tuple(reasons),
        template if isinstance(template, str) else None,
    )  # fmt: skip


def _kv_bytes(metadata: dict[str, Any], arch: str, n_ctx: int) -> int:
    layers = int(metadata.get(f"{arch}.block_count", 0))
    heads = int(metadata.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(metadata.get(f"{arch}.embedding_length", 0)) // heads
    return 2 * layers * kv_heads * head_dim * 2 * n_ctx  # K and V, f16


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class LlamaCppBackend:
    name = "llamacpp"
    health_path = "/v1/models"

    def __init__(
        self,
        model: ResolvedModel,
        *,
        gpu: GpuFacts | None = None,
        vram: int | None = None,
        context: int | None = None,
        threads: int | None = None,
        command: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._command = list(command or (sys.executable, "-m", "llama_cpp.server"))
        self._extra_args = list(extra_args)
        self.plan = plan_llamacpp(
            model,
            read_metadata(Path(model.path)),
            gpu=gpu,
            vram=vram,
            context=context,
            threads=threads or usable_cores(),
        )
        self.observed: dict[str, int] = {}

    def launch(self, port: int, api_key: str) -> Launch:
        self.observed = {}
        argv = [*self._command, *self.plan.to_argv(), "--host", "127.0.0.1", "--port", str(port),
                *self._extra_args]  # fmt: skip
        # llama-cpp-python lets HOST and PORT from the environment override its flags, and
        # reads its key (API_KEY) and a CONFIG_FILE from there: set or clear all four.
        env: dict[str, str | None] = {
            "API_KEY": api_key, "HOST": "127.0.0.1", "PORT": str(port), "CONFIG_FILE": None,
        }  # fmt: skip
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
