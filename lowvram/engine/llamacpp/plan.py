"""What llama.cpp's server is told: sequences, context, threads; and why.

    plan = plan_llamacpp(model, read_metadata(model.path), settings, host)
    plan.to_argv(), plan.explain()

The server decodes `parallel` sequences at once (continuous batching) from one KV cache
they share; each may be `context` tokens long. Weights are memory-mapped from the GGUF.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from lowvram.engine.errors import PlanError
from lowvram.engine.handle import ModelDetails
from lowvram.engine.hardware import HostFacts
from lowvram.engine.llamacpp.fetch import ResolvedModel
from lowvram.engine.settings import EngineSettings
from lowvram.engine.units import GiB, gib

DEFAULT_CONTEXT = 4096
DEFAULT_PARALLEL = 4
"""llama.cpp's own default: on a CPU, decoding 4 sequences costs little more than 1."""
MIN_CONTEXT = 512
HOST_RESERVE = 1 * GiB
"""Left to the gateway, the OS and the compute buffers."""
FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    32: "BF16",
}
"""GGUF's general.file_type: llama.cpp's llama_ftype, as its names say them."""


@dataclass(frozen=True)
class LlamaCppPlan:
    model: ResolvedModel
    context: int
    """Tokens per sequence (prompt and completion)."""
    parallel: int
    """Sequences decoded at once."""
    threads: int
    layers: int
    kv_bytes: int
    reasons: tuple[str, ...]
    tool_call_opener: str | None = None
    """How the model's chat template opens a tool call, if it marks one."""
    tool_call_closer: str | None = None
    """And how it closes one."""
    details: ModelDetails | None = None
    """What the GGUF says it is (for Ollama's model listing)."""

    def to_argv(self) -> list[str]:
        """llama-server arguments (host, port and key are the supervisor's)."""
        return [
            *("--model", str(self.model.path), "--alias", self.model.served_name),
            *("--parallel", str(self.parallel), "--kv-unified"),
            # One KV pool for all sequences, each capped at `context`.
            *("--ctx-size", str(self.context * self.parallel)),
            *("--kv-unified-per-slot", str(self.context)),
            *("--threads", str(self.threads), "--threads-batch", str(self.threads)),
            "--jinja",  # the model's own chat template: tool calls, reasoning, JSON schemas
            "--no-webui",
        ]

    def explain(self) -> str:
        lines = [
            f"plan for {self.model.served_name} ({self.model.source}): {self.model.path}",
            f"  {self.parallel} sequences x {self.context} tokens, {self.threads} CPU threads,"
            f" KV cache {gib(self.kv_bytes)}",
        ]
        return "\n".join(lines + [f"  - {reason}" for reason in self.reasons])


def plan_llamacpp(
    model: ResolvedModel,
    metadata: dict[str, Any],
    settings: EngineSettings,
    host: HostFacts,
    replicas: int = 1,
) -> LlamaCppPlan:
    """One server's plan; with `replicas`, one of that many sharing the cores and the RAM
    (the mapped weights once: the page cache shares them; a KV cache each)."""
    arch = metadata.get("general.architecture", "llama")
    layers = int(metadata.get(f"{arch}.block_count", 0))
    trained = int(metadata.get(f"{arch}.context_length", DEFAULT_CONTEXT))
    context = max(MIN_CONTEXT, min(settings.context or DEFAULT_CONTEXT, trained))
    parallel = settings.concurrency or DEFAULT_PARALLEL
    threads = settings.threads or max(1, usable_cores() // replicas)
    per_token = kv_bytes_per_token(metadata, arch)
    weights = model.path.stat().st_size
    reasons = [
        f"context {context} of the {trained} the model was trained for",
        f"{parallel} sequences at once share one KV cache ({per_token // 1024} KiB per token, f16)",
        f"{threads} threads: the cores this process may use"
        + (f", shared by {replicas} replicas" if replicas > 1 else ""),
    ]
    room = (host.available_bytes - weights - HOST_RESERVE) // replicas
    while parallel > 1 and parallel * context * per_token > room:
        parallel //= 2
    if parallel * context * per_token > room:
        raise PlanError(
            f"{model.served_name} needs {gib(weights)} of weights and "
            f"{gib(context * per_token)} of KV cache for one {context}-token sequence; "
            f"{gib(host.available_bytes)} of RAM is available. Lower ENGINE_CONTEXT or "
            "use a smaller model."
        )
    if parallel < (settings.concurrency or DEFAULT_PARALLEL):
        reasons.append(f"only {parallel} sequences fit in the RAM available")
    template = metadata.get("tokenizer.chat_template")
    marks_calls = isinstance(template, str) and "<tool_call>" in template
    opener, closer = ("<tool_call>\n", "</tool_call>") if marks_calls else (None, None)
    return LlamaCppPlan(
        model=model,
        context=context,
        parallel=parallel,
        threads=threads,
        layers=layers,
        kv_bytes=parallel * context * per_token,
        reasons=tuple(reasons),
        tool_call_opener=opener,
        tool_call_closer=closer,
        details=ModelDetails(
            format="gguf",
            family=arch,
            size_bytes=model.path.stat().st_size if model.path.exists() else None,
            parameter_size=metadata.get("general.size_label"),
            quantization=FILE_TYPES.get(int(metadata.get("general.file_type", -1))),
        ),
    )


def kv_bytes_per_token(metadata: dict[str, Any], arch: str) -> int:
    layers = int(metadata.get(f"{arch}.block_count", 0))
    heads = int(metadata.get(f"{arch}.attention.head_count", 1))
    kv_heads = int(metadata.get(f"{arch}.attention.head_count_kv", heads))
    head_dim = int(
        metadata.get(f"{arch}.attention.key_length")
        or int(metadata.get(f"{arch}.embedding_length", 0)) // heads
    )
    return 2 * layers * kv_heads * head_dim * 2  # K and V, f16


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
