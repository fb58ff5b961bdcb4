"""The memory model: what vLLM 0.26 holds on one GPU once ready, as nvidia-smi shows it.

    fixed overhead  +  weights left on the GPU  +  KV cache  +  peak activations  (+ graphs)

    shape = Shape(scheme, context=4096, seqs=8, batched_tokens=512, eager=True, offloaded=30)
    room = kv_room(model, shape, usable)          # bytes the KV cache may have
    est = estimate(model, shape, kv_tokens=8192)  # a VramEstimate, part by part

Activations are those of vLLM's start-up profiling pass over max_num_batched_tokens tokens,
which the allocator keeps cached; bitsandbytes adds the bf16 output of its dequantizing
matmuls and one dequantized weight matrix, and leaves the scratch of quantizing at load
time cached too. Every constant was fitted to vLLM 0.26.0 runs on an H200 (CUDA 13, torch
2.11; docs/benchmarks.md), and tests/engine/test_planner_calibration.py holds the runs:
each estimate within 10% of what nvidia-smi showed.

Nothing here decides: the planner (planner.py) searches over shapes with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from lowvram.engine.hardware import GpuFacts
from lowvram.engine.units import GiB, MiB
from lowvram.engine.vllm.model import ModelFacts
from lowvram.engine.vllm.plan import VramEstimate

FIXED_OVERHEAD = 1536 * MiB
"""CUDA context, cuBLAS and attention workspaces, warm-up buffers: 1.46-1.56 GiB measured
(H200, CUDA 13, torch 2.11) whatever the model; smaller cards need somewhat less."""
CUDA_GRAPHS = 256 * MiB
"""Captured graphs and torch.compile's buffers when a plan is not eager (0.05 GiB measured
for a 0.5B model: this leaves room for larger ones)."""
PARALLEL_OVERHEAD = 512 * MiB
"""Per GPU of a split engine: NCCL's communicators and vLLM's custom all-reduce buffers
(an estimate from their documented sizes; not yet measured here)."""
SAFETY_FRACTION = 0.05
SAFETY_MIN = 256 * MiB
"""Kept free of the budget: the larger of 5% and 256 MiB (allocator fragmentation)."""
BLOCK_SIZE = 16
"""Tokens per KV cache block (vLLM's --block-size)."""
HOST_RESERVE = 4 * GiB
"""Host RAM left to the OS, the gateway and vLLM's own process beside offloaded layers."""
PREQUANTIZED_BYTES_PER_PARAM = {"awq": 0.52, "gptq": 0.52, "fp8": 1.0, "bitsandbytes": 0.5}
"""Bytes per linear weight of a pre-quantized checkpoint (4-bit formats: with their
scales and zeros, one per 128-weight group)."""


@dataclass(frozen=True)
class Scheme:
    """How one decoder layer's weights are stored, and which part can go to the host."""

    name: str | None
    """None: the checkpoint's own dtype; "fp8" or "bitsandbytes": quantized as vLLM loads
    it; else the checkpoint's own method."""
    layer_bytes: int
    """Per layer: what offload moves (and vLLM counts as offloaded)."""
    gpu_extra_per_layer: int = 0
    """Per layer kept on the GPU, beyond layer_bytes."""
    resident_per_layer: int = 0
    """Per layer, on the GPU even when offloaded (bnb's quant state)."""
    load_scratch: int = 0
    """Left cached by quantizing at load time."""
    dequant_bytes: int = 0
    """One dequantized bf16 weight matrix, in batched matmuls."""
    mlp_outputs: int = 3
    """bf16 intermediate-sized outputs per token in the MLP."""
    slowdown: float = 1.0
    """How much slower than bf16 its matmuls read weights (bitsandbytes: ~2.5x)."""
    offloadable: bool = True
    """Whether vLLM can keep any of it in host memory."""

    @property
    def quantization_arg(self) -> str | None:
        """What `--quantization` says: only for quantizing at load; vLLM reads a
        pre-quantized checkpoint's method from its config."""
        return self.name if self.name in ("fp8", "bitsandbytes") else None


def ladder(model: ModelFacts, gpu: GpuFacts) -> list[Scheme]:
    """The weight formats this model can run in on this GPU, best (least lossy) first."""
    small = model.small_params_per_layer * 2
    linear = model.linear_params_per_layer
    if model.quant_method:
        per_param = PREQUANTIZED_BYTES_PER_PARAM.get(
            model.quant_method, (model.quant_bits or 8) / 8
        )
        return [Scheme(model.quant_method, int(linear * per_param) + small)]
    schemes = [Scheme(None, linear * 2 + small)]
    if gpu.has_fp8:
        # One byte per weight and a scale per tensor, quantized one layer at a time as it
        # loads; vLLM then holds ~3 bf16 copies of the largest matrix more than the weights
        # (a Qwen3-8B shape measured 9.09 GiB loaded against 8.79 of weights, on an H200).
        scratch = 6 * model.largest_linear_params
        # vLLM 0.26 builds FP8-at-load weights on the meta device and makes them real as
        # they load, after its offloader has copied parameters to the host: "Cannot copy
        # out of meta tensor" (H200, Qwen3-8B shape, 36 layers offloaded). On the GPU only.
        schemes.append(Scheme("fp8", linear + small, load_scratch=scratch, offloadable=False))
    # vLLM packs 4-bit weights into uint8 parameters (the part offload moves) and keeps
    # bitsandbytes' double-quantized absmax on the GPU: ~1/64 byte per weight. A layer left
    # on the GPU measured another 1/64 byte per weight (allocator rounding).
    schemes.append(
        Scheme(
            "bitsandbytes",
            layer_bytes=linear // 2 + small,
            gpu_extra_per_layer=linear // 64,
            resident_per_layer=linear // 64 + linear // (64 * 256) * 4,
            load_scratch=5 * model.largest_linear_params,
            dequant_bytes=2 * model.largest_linear_params,
            mlp_outputs=5,  # gate_up (2), its bf16 copy out of the 4-bit matmul (2), act (1)
            slowdown=2.5,  # with CUDA graphs; measured 175 tok/s against FP8's 272 (8B, H200)
        )
    )
    return schemes


VocabOffload = Literal["none", "embed", "all"]
"""Which vocabulary tensors go to host memory with lowvram's vLLM plugin (plugin.py): none,
the input embedding, or it and the lm_head. A tied model's lm_head is its embedding."""


def vocab_on_host(model: ModelFacts, vocab: VocabOffload) -> int:
    """Bytes of vocabulary tensors in host memory (bf16/fp16 in every format: vLLM
    quantizes neither the embedding nor the lm_head of these checkpoints)."""
    if vocab == "none":
        return 0
    lm_head = model.lm_head_params if vocab == "all" else 0
    return (model.embedding_params + lm_head) * 2


def lm_head_over_pcie(model: ModelFacts, vocab: VocabOffload) -> int:
    """Bytes a decode step reads over PCIe for the logits: the whole lm_head where it is in
    host memory (a tied model's is its embedding). The embedding itself costs a few rows
    per token: nothing to count."""
    if model.tied_embeddings:
        return model.embedding_params * 2 if vocab != "none" else 0
    return model.lm_head_params * 2 if vocab == "all" else 0


@dataclass(frozen=True)
class Shape:
    """One configuration of an engine, as far as memory goes."""

    scheme: Scheme
    context: int
    """Tokens per sequence (--max-model-len)."""
    seqs: int
    """Sequences at once (--max-num-seqs): the logits of the profiling pass."""
    batched_tokens: int
    """Tokens per forward pass (--max-num-batched-tokens): the activations."""
    eager: bool
    offloaded: int
    """Decoder layers in host memory."""
    split: bool = False
    """Part of an engine over several GPUs (tensor or pipeline parallel)."""
    margin: float = 1.0
    """Raises overhead and activations after a failed start (1.3 per rung)."""
    vocab: VocabOffload = "none"


def usable_bytes(budget: int) -> int:
    """What a plan may fill of a budget: the rest is the safety margin."""
    return budget - max(SAFETY_MIN, int(budget * SAFETY_FRACTION))


def activations(model: ModelFacts, tokens: int, seqs: int, scheme: Scheme) -> int:
    """Peak activations of a `tokens`-token forward pass with `seqs` sequences' logits."""
    inter = (
        model.expert_intermediate * 8 if model.experts else model.intermediate
    )  # routed tokens fan out to up to 8 experts
    per_token = (scheme.mlp_outputs * inter + 3 * model.hidden) * 2
    logits = seqs * model.vocab * 4 * 2
    return tokens * per_token + logits + scheme.dequant_bytes


def resident(model: ModelFacts, scheme: Scheme, vocab: VocabOffload = "none") -> int:
    """Weights on the GPU whatever layers are offloaded: the vocabulary tensors not in host
    memory, the final norm, quant state, load scratch."""
    embeddings = (model.embedding_params + model.lm_head_params + model.hidden) * 2
    embeddings -= vocab_on_host(model, vocab)
    return embeddings + model.layers * scheme.resident_per_layer + scheme.load_scratch


def weights_on_gpu(model: ModelFacts, shape: Shape) -> int:
    scheme = shape.scheme
    on_gpu = model.layers - shape.offloaded
    per_layer = scheme.layer_bytes + scheme.gpu_extra_per_layer
    return resident(model, scheme, shape.vocab) + on_gpu * per_layer


def overhead(shape: Shape) -> int:
    return int((FIXED_OVERHEAD + (PARALLEL_OVERHEAD if shape.split else 0)) * shape.margin)


def kv_room(model: ModelFacts, shape: Shape, usable: int) -> int:
    """Bytes left for the KV cache in `usable` bytes (negative: it does not fit at all)."""
    acts = int(activations(model, shape.batched_tokens, shape.seqs, shape.scheme) * shape.margin)
    graphs = 0 if shape.eager else CUDA_GRAPHS
    return usable - (overhead(shape) + acts + graphs + weights_on_gpu(model, shape))


def estimate(model: ModelFacts, shape: Shape, kv_tokens: int) -> VramEstimate:
    """What the engine holds once ready, with a KV cache of `kv_tokens` tokens."""
    acts = int(activations(model, shape.batched_tokens, shape.seqs, shape.scheme) * shape.margin)
    return VramEstimate(
        cuda_context=overhead(shape),
        weights=weights_on_gpu(model, shape),
        kv_cache=kv_tokens * model.kv_bytes_per_token(),
        activations=acts,
        cuda_graphs=0 if shape.eager else CUDA_GRAPHS,
    )


def kv_blocks(n_bytes: int, per_token: int) -> int:
    """Whole KV blocks that fit in `n_bytes`, in tokens."""
    return n_bytes // (per_token * BLOCK_SIZE) * BLOCK_SIZE


def host_bytes(model: ModelFacts, shape: Shape) -> int:
    """Host RAM the offloaded weights take, with the reserve for everything else."""
    layers = shape.offloaded * shape.scheme.layer_bytes
    return layers + vocab_on_host(model, shape.vocab) + HOST_RESERVE


def floor(model: ModelFacts, shape: Shape) -> int:
    """The smallest budget a plan of this shape could use for this model (or shard): its
    layers and vocabulary offloaded, one sequence of its context, its batched tokens."""
    scheme = shape.scheme
    kv = math.ceil(shape.context / BLOCK_SIZE) * BLOCK_SIZE * model.kv_bytes_per_token()
    acts = int(activations(model, shape.batched_tokens, 1, scheme) * shape.margin)
    usable = overhead(shape) + acts + kv + weights_on_gpu(model, shape)
    return max(usable + SAFETY_MIN, math.ceil(usable / (1 - SAFETY_FRACTION)))
