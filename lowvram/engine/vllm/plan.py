"""The plan: what the engine will be told, and why, as one frozen, validated object.

plan = plan_vllm(model, gpu, host, EngineSettings(vram="6GiB"))
subprocess.Popen([*vllm_command, *plan.to_argv()], env=os.environ | plan.to_env())
print(plan.explain())
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lowvram.engine.units import GiB, gib

OFFLOAD_VOCAB_ENV = "LOWVRAM_OFFLOAD_VOCAB"
"""How a plan tells lowvram's vLLM plugin which vocabulary tensors to move."""
MULTI_GPU_ENV = {
    # No NVLink multicast (NVLS): on shared hosts a program using it can take the GPUs out
    # of service; NCCL, PyTorch's symmetric memory and NVSHMEM each have their switch.
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    # vLLM 0.26 all-reduces through symmetric memory by default, which wants multicast:
    # NCCL's and its own custom all-reduce (CUDA IPC over NVLink) do without.
    "VLLM_ALLREDUCE_USE_SYMM_MEM": "0",
}
"""The environment of an engine over several GPUs (tensor or pipeline parallel)."""


class VramEstimate(BaseModel):
    """Bytes the engine will hold on the GPU once ready, by kind."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    cuda_context: int
    """CUDA context, workspaces and warm-up buffers: what vLLM holds whatever the model."""
    weights: int
    """Weights left on the GPU: embeddings, lm_head, layers not offloaded, quant states."""
    kv_cache: int
    """The KV cache, exactly as configured with --kv-cache-memory-bytes."""
    activations: int
    """Peak activations of a max_num_batched_tokens forward pass (and bnb's dequantized weight)."""
    cuda_graphs: int = 0
    """Captured CUDA graphs; zero when eager."""

    @property
    def total(self) -> int:
        return (
            self.cuda_context + self.weights + self.kv_cache + self.activations + self.cuda_graphs
        )


class EnginePlan(BaseModel):
    """A vLLM configuration that fits a VRAM budget, with the reasons for each choice."""

    model_config = ConfigDict(frozen=True, use_attribute_docstrings=True)

    model: str
    """Local directory or Hub id handed to vLLM."""
    served_name: str
    """The model id the engine (and the gateway) serves."""
    budget: int = Field(gt=0)
    """VRAM the engine may use on each of its GPUs, bytes."""
    gpu_total: int = Field(gt=0)
    """The card's memory, bytes (sets --gpu-memory-utilization for vLLM's start-up check)."""
    dtype: Literal["bfloat16", "float16", "auto"]
    quantization: str | None
    """None (the checkpoint's dtype), "fp8" or "bitsandbytes" (quantized as vLLM loads the
    checkpoint), or a pre-quantized checkpoint's own method (awq, gptq, ...)."""
    quantization_arg: str | None = None
    """What `--quantization` says: set only for quantizing at load time."""
    tensor_parallel: int = Field(1, ge=1)
    """GPUs each layer is split over (vLLM's --tensor-parallel-size)."""
    pipeline_parallel: int = Field(1, ge=1)
    """GPUs the layers are divided between (vLLM's --pipeline-parallel-size)."""
    offloaded_layers: int = Field(ge=0)
    """Per GPU: its layers (or shards of layers) kept in host memory."""
    cpu_offload_bytes: int = Field(ge=0)
    """Per GPU: bytes of decoder layer weights kept in pinned host memory and read over PCIe
    each step (vLLM's --cpu-offload-gb is per GPU too)."""
    vocab_offload: Literal["none", "embed", "all"] = "none"
    """Vocabulary tensors in host memory too, by lowvram's vLLM plugin: none, the input
    embedding, or it and the lm_head (LOWVRAM_OFFLOAD_VOCAB in the engine's environment)."""
    embedding_offload_bytes: int = Field(0, ge=0)
    """Per GPU: the input embedding's bytes in host memory."""
    lm_head_offload_bytes: int = Field(0, ge=0)
    """Per GPU: the lm_head's bytes in host memory (0 where it is tied to the embedding)."""
    tied_embeddings: bool = False
    """The lm_head is the embedding: offloading one offloads both."""
    kv_cache_bytes: int = Field(gt=0)
    kv_bytes_per_token: int = Field(gt=0)
    max_model_len: int = Field(ge=64)
    max_num_seqs: int = Field(ge=1)
    max_num_batched_tokens: int = Field(ge=16)
    enforce_eager: bool
    block_size: int = 16
    tool_call_parser: str | None = None
    """vLLM's parser for tool calls (turns on `tool_choice="auto"`); None: no tool calls."""
    reasoning_parser: str | None = None
    """vLLM's parser that moves a reasoning model's thinking to `reasoning_content`."""
    estimate: VramEstimate
    pcie_bytes_per_s: float = Field(25e9, gt=0)
    """The host-to-GPU rate the offload estimate used."""
    tokens_per_s: float = Field(0.0, ge=0)
    """Estimated decode tokens/s over all its sequences (for comparing plans; an upper
    bound where layers are offloaded)."""
    reasons: tuple[str, ...]
    """Why each choice was made, in the order the planner made them."""
    warnings: tuple[str, ...] = ()
    rung: int = Field(0, ge=0)
    """How many times the plan was stepped down after a start-up failure."""

    @model_validator(mode="after")
    def _consistent(self) -> EnginePlan:
        if self.kv_cache_bytes < self.max_model_len * self.kv_bytes_per_token:
            raise ValueError("the KV cache must hold at least one max_model_len sequence")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError("max_num_batched_tokens must be at least max_num_seqs")
        if self.estimate.total > self.budget:
            raise ValueError("the estimate exceeds the budget")
        if self.estimate.kv_cache != self.kv_cache_bytes:
            raise ValueError("the estimate must count the configured KV cache")
        return self

    @property
    def gpus(self) -> int:
        """GPUs one engine of this plan runs on."""
        return self.tensor_parallel * self.pipeline_parallel

    @property
    def kv_cache_tokens(self) -> int:
        return self.kv_cache_bytes // self.kv_bytes_per_token

    @property
    def gpu_memory_utilization(self) -> float:
        """vLLM refuses to start unless this fraction of the card is free; the KV size is ours."""
        return max(0.01, math.floor(self.budget / self.gpu_total * 1000) / 1000)

    def to_argv(self) -> list[str]:
        """vLLM OpenAI server arguments (host, port and key are the supervisor's)."""
        argv = [
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            "--max-num-seqs",
            str(self.max_num_seqs),
            "--max-num-batched-tokens",
            str(self.max_num_batched_tokens),
            "--kv-cache-memory-bytes",
            str(self.kv_cache_bytes),
            "--gpu-memory-utilization",
            f"{self.gpu_memory_utilization:.3f}",
            "--block-size",
            str(self.block_size),
        ]
        if self.tensor_parallel > 1:
            argv += ["--tensor-parallel-size", str(self.tensor_parallel)]
        if self.pipeline_parallel > 1:
            argv += ["--pipeline-parallel-size", str(self.pipeline_parallel)]
        if self.quantization_arg:
            argv += ["--quantization", self.quantization_arg]
        if self.offload_budget:
            # Offload goes parameter by parameter, in the order modules are built, until this
            # many GiB: whole layers (and the embedding, built before them), rounded down.
            gb = math.floor(self.offload_budget / GiB * 1e6) / 1e6
            argv += ["--cpu-offload-gb", f"{gb:.6f}"]
        if self.enforce_eager:
            argv.append("--enforce-eager")
        # Grammars allow any whitespace between JSON tokens, and a model can fill its whole
        # max_tokens with it (random weights do; real models have too): compact JSON only.
        argv += [
            "--structured-outputs-config",
            '{"backend": "xgrammar", "disable_any_whitespace": true}',
        ]
        if self.tool_call_parser:
            argv += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        if self.reasoning_parser:
            argv += ["--reasoning-parser", self.reasoning_parser]
        return argv

    @property
    def offload_budget(self) -> int:
        """vLLM's --cpu-offload-gb, in bytes: the layers and the embedding. The lm_head is
        built after every layer, so the plugin puts it on top of the budget (which would
        otherwise go to more layers first)."""
        return self.cpu_offload_bytes + self.embedding_offload_bytes

    @property
    def host_offload_bytes(self) -> int:
        """Everything in host memory: layers, embedding, lm_head."""
        return self.offload_budget + self.lm_head_offload_bytes

    @property
    def pcie_bytes_per_step(self) -> int:
        """What a decode step reads over PCIe: the offloaded layers, and the lm_head where
        it is in host memory (a tied one is the embedding)."""
        head = self.embedding_offload_bytes if self.tied_embeddings else self.lm_head_offload_bytes
        return self.cpu_offload_bytes + head

    @property
    def vocab_modules(self) -> tuple[str, ...]:
        """What the plugin is asked to move: "embed" and, untied, "lm_head"."""
        if self.vocab_offload == "none":
            return ()
        if self.vocab_offload == "all" and not self.tied_embeddings:
            return ("embed", "lm_head")
        return ("embed",)

    def to_env(self) -> dict[str, str]:
        env = {
            # vLLM 0.26's V2 model runner ignores --cpu-offload-gb without a word, and
            # JIT-compiles Triton kernels for minutes at start; V1 does neither.
            "VLLM_USE_V2_MODEL_RUNNER": "0",
            # FlashInfer's sampler JIT-compiles for minutes on a cold cache.
            "VLLM_USE_FLASHINFER_SAMPLER": "0",
        }
        if self.vocab_modules:
            env[OFFLOAD_VOCAB_ENV] = ",".join(self.vocab_modules)  # read by plugin.py
        if self.gpus > 1:
            env |= MULTI_GPU_ENV
        return env

    def explain(self) -> str:
        est = self.estimate
        rows = [
            ("CUDA context and workspaces", est.cuda_context),
            ("weights on the GPU", est.weights),
            (f"KV cache ({self.kv_cache_tokens:,} tokens)", est.kv_cache),
            (f"activations ({self.max_num_batched_tokens} batched tokens)", est.activations),
            ("CUDA graphs", est.cuda_graphs),
        ]
        width = max(len(name) for name, _ in rows) + 2
        per_gpu = f" per GPU, on {self.gpus} GPUs" if self.gpus > 1 else ""
        lines = [
            f"plan for {self.served_name} within {gib(self.budget)}{per_gpu} (rung {self.rung})",
            "",
        ]
        lines += [f"  {name:<{width}}{gib(value):>12}" for name, value in rows]
        lines += [f"  {'total (estimate)':<{width}}{gib(est.total):>12}", ""]
        if self.host_offload_bytes:
            each = " (each GPU)" if self.gpus > 1 else ""
            parts = [f"{self.offloaded_layers} layers, {gib(self.cpu_offload_bytes)}"]
            if self.embedding_offload_bytes:
                name = "embedding and lm_head (tied)" if self.tied_embeddings else "embedding"
                parts.append(f"{name} {gib(self.embedding_offload_bytes)}")
            if self.lm_head_offload_bytes:
                parts.append(f"lm_head {gib(self.lm_head_offload_bytes)}")
            lines.append(f"  offloaded to host{each}: " + "; ".join(parts))
        lines += ["why:"] + [f"  - {reason}" for reason in self.reasons]
        if self.warnings:
            lines += ["warnings:"] + [f"  - {warning}" for warning in self.warnings]
        lines += ["", "vllm serve arguments:", "  " + " ".join(self.to_argv())]
        lines += ["environment:", "  " + " ".join(f"{k}={v}" for k, v in self.to_env().items())]
        return "\n".join(lines)
