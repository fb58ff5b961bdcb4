"""What llama.cpp is told: context, layers on the GPU, threads; and why.

plan = plan_llamacpp(model, read_metadata(model.path), gpu=None, vram=None,
                     context=None, threads=2)
plan.to_argv(), plan.explain()
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lowvram.engine.hardware import GpuFacts
from lowvram.engine.llamacpp.fetch import ResolvedModel
from lowvram.engine.units import MiB, gib

DEFAULT_CONTEXT = 4096
MIN_CONTEXT = 512
GPU_OVERHEAD = 512 * MiB
"""CUDA context and compute buffers of a llama.cpp process with layers on the GPU."""


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
            "--model",
            str(self.model.path),
            "--model_alias",
            self.model.served_name,
            "--n_ctx",
            str(self.n_ctx),
            "--n_gpu_layers",
            str(self.n_gpu_layers),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
            "--interrupt_requests",
            "False",
        ]

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
        model,
        n_ctx,
        gpu_layers,
        threads,
        layers,
        tuple(reasons),
        template if isinstance(template, str) else None,
    )


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
