"""The VRAM planner: facts in, a frozen `EnginePlan` out, no side effects.

Rules, in order:
1. Keep the checkpoint's dtype when the model fits on the GPU with the KV cache it needs.
2. A pre-quantized checkpoint (AWQ, GPTQ, FP8, ...) keeps its method.
3. Otherwise quantize to 4-bit with bitsandbytes as vLLM loads it.
4. Offload only what still does not fit, in whole decoder layers (vLLM's UVA offload
   reads them over PCIe on every forward pass, so each offloaded layer costs speed).
5. Only when every layer is offloaded and it still does not fit, shrink the KV cache:
   fewer sequences, then a shorter context, down to a floor; below that, refuse.

The memory model (what vLLM 0.26 holds on the GPU once ready, as nvidia-smi shows it):
    fixed overhead  +  weights left on the GPU  +  KV cache  +  peak activations  (+ graphs)
Activations are those of vLLM's start-up profiling pass over max_num_batched_tokens
tokens, which the allocator keeps cached; bitsandbytes adds the bf16 output of its
dequantizing matmuls and one dequantized weight matrix, and leaves the scratch of
quantizing at load time cached too. The constants were fitted to vLLM 0.26.0 runs on an
H200 (docs/benchmarks.md): the estimates there came within 5% of nvidia-smi.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lowvram.engine.errors import PlanError
from lowvram.engine.hardware import GpuFacts, HostFacts
from lowvram.engine.settings import EngineSettings
from lowvram.engine.units import GiB, MiB, gib
from lowvram.engine.vllm.model import ModelFacts
from lowvram.engine.vllm.parsers import choose_parsers
from lowvram.engine.vllm.plan import EnginePlan, VramEstimate

FIXED_OVERHEAD = 1536 * MiB
"""CUDA context, cuBLAS and attention workspaces, warm-up buffers: 1.46-1.56 GiB measured
(H200, CUDA 13, torch 2.11) whatever the model; smaller cards need somewhat less."""
CUDA_GRAPHS = 256 * MiB
"""Captured graphs and torch.compile's buffers when a plan is not eager (0.05 GiB measured
for a 0.5B model: this leaves room for larger ones)."""
SAFETY_FRACTION = 0.05
SAFETY_MIN = 256 * MiB
DEFAULT_CONTEXT = 4096
DEFAULT_CONCURRENCY = 4
MIN_CONTEXT = 512
BATCHED_TOKENS = (2048, 1024, 512, 256)
BLOCK_SIZE = 16
PCIE_BYTES_PER_S = 25e9
"""A practical PCIe 4.0 x16 host-to-device rate, for the speed estimate in the reasons
(a PCIe 5.0 H200 host measured 55 GB/s pinned; consumer boards are mostly 4.0)."""

PREQUANTIZED_BYTES_PER_PARAM = {"awq": 0.52, "gptq": 0.52, "fp8": 1.0, "bitsandbytes": 0.5}


@dataclass(frozen=True)
class _Scheme:
    """How one decoder layer's weights are stored, and which part can go to the host."""

    name: str | None  # None: the checkpoint's own dtype
    layer_bytes: int  # per layer: what offload moves (and vLLM counts as offloaded)
    gpu_extra_per_layer: int  # per layer kept on the GPU, beyond layer_bytes
    resident_per_layer: int  # per layer, on the GPU even when offloaded (bnb's quant state)
    load_scratch: int  # left cached by quantizing at load time
    dequant_bytes: int  # one dequantized bf16 weight matrix, in batched matmuls
    mlp_outputs: int  # bf16 intermediate-sized outputs per token in the MLP


def _scheme(model: ModelFacts, quantize: bool) -> _Scheme:
    small = model.small_params_per_layer * 2
    linear = model.linear_params_per_layer
    if model.quant_method:
        per_param = PREQUANTIZED_BYTES_PER_PARAM.get(
            model.quant_method, (model.quant_bits or 8) / 8
        )
        return _Scheme(model.quant_method, int(linear * per_param) + small, 0, 0, 0, 0, 3)
    if quantize:
        # vLLM packs 4-bit weights into uint8 parameters (the part offload moves) and keeps
        # bitsandbytes' double-quantized absmax on the GPU: ~1/64 byte per weight. A layer
        # left on the GPU measured another 1/64 byte per weight (allocator rounding).
        return _Scheme(
            "bitsandbytes",
            layer_bytes=linear // 2 + small,
            gpu_extra_per_layer=linear // 64,
            resident_per_layer=linear // 64 + linear // (64 * 256) * 4,
            load_scratch=5 * model.largest_linear_params,
            dequant_bytes=2 * model.largest_linear_params,
            mlp_outputs=5,  # gate_up (2), its bf16 copy out of the 4-bit matmul (2), act (1)
        )
    return _Scheme(None, linear * 2 + small, 0, 0, 0, 0, 3)


def _activations(model: ModelFacts, tokens: int, seqs: int, scheme: _Scheme) -> int:
    inter = (
        model.expert_intermediate * 8 if model.experts else model.intermediate
    )  # routed tokens fan out to up to 8 experts
    per_token = (scheme.mlp_outputs * inter + 3 * model.hidden) * 2
    logits = seqs * model.vocab * 4 * 2
    return tokens * per_token + logits + scheme.dequant_bytes


def _round_kv(tokens: int, per_token: int) -> int:
    blocks = math.ceil(tokens / BLOCK_SIZE)
    return blocks * BLOCK_SIZE * per_token


@dataclass(frozen=True)
class _Layout:
    scheme: _Scheme
    context: int
    seqs: int
    batched_tokens: int
    eager: bool
    offloaded: int
    estimate: VramEstimate


def _layout(
    model: ModelFacts,
    scheme: _Scheme,
    usable: int,
    *,
    context: int,
    seqs: int,
    batched_tokens: int,
    eager: bool,
    margin: float,
) -> _Layout | None:
    """Place the layers for one configuration: how many must go to the host, if any."""
    kv = _round_kv(context * seqs, model.kv_bytes_per_token())
    activations = int(_activations(model, batched_tokens, seqs, scheme) * margin)
    context_bytes = int(FIXED_OVERHEAD * margin)
    graphs = 0 if eager else CUDA_GRAPHS
    resident = _resident(model, scheme)
    room = usable - (context_bytes + activations + graphs + kv + resident)
    if room < 0:
        return None
    per_layer = scheme.layer_bytes + scheme.gpu_extra_per_layer
    on_gpu = min(model.layers, room // per_layer)
    offloaded = model.layers - on_gpu
    estimate = VramEstimate(
        cuda_context=context_bytes,
        weights=resident + on_gpu * per_layer,
        kv_cache=kv,
        activations=activations,
        cuda_graphs=graphs,
    )
    return _Layout(scheme, context, seqs, batched_tokens, eager, offloaded, estimate)


def _resident(model: ModelFacts, scheme: _Scheme) -> int:
    """Weights on the GPU whatever is offloaded: embeddings, lm_head, quant state, scratch."""
    embeddings = (model.embedding_params + model.lm_head_params + model.hidden) * 2
    return embeddings + model.layers * scheme.resident_per_layer + scheme.load_scratch


def _served_name(model: str) -> str:
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model


def plan_vllm(
    model: ModelFacts,
    gpu: GpuFacts,
    host: HostFacts,
    settings: EngineSettings,
    *,
    rung: int = 0,
) -> EnginePlan:
    """The plan for `model` on `gpu` within `settings.vram`; `rung` > 0 is more cautious."""
    budget = int(settings.vram) if settings.vram is not None else int(gpu.free_bytes * 0.95)
    if budget > gpu.total_bytes:
        raise PlanError(
            f"the budget {gib(budget)} is more than the GPU has ({gib(gpu.total_bytes)})"
        )
    usable = budget - max(SAFETY_MIN, int(budget * SAFETY_FRACTION))
    margin = 1.0 + 0.3 * rung
    wanted_context = min(settings.context or DEFAULT_CONTEXT, model.max_position)
    wanted_seqs = settings.concurrency or DEFAULT_CONCURRENCY
    token_choices = [t for t in BATCHED_TOKENS if t <= max(256, 2048 >> rung)]
    reasons: list[str] = []
    warnings: list[str] = []

    def fit(scheme: _Scheme, context: int, seqs: int, eager: bool) -> _Layout | None:
        """Fewest offloaded layers over the batch sizes; ties go to the larger batch."""
        layouts = [
            layout
            for tokens in token_choices
            if tokens >= seqs
            and (
                layout := _layout(
                    model,
                    scheme,
                    usable,
                    context=context,
                    seqs=seqs,
                    batched_tokens=tokens,
                    eager=eager,
                    margin=margin,
                )
            )
        ]
        return min(layouts, key=lambda lay: (lay.offloaded, -lay.batched_tokens), default=None)

    chosen: _Layout | None = None
    if model.quant_method:
        reasons.append(f"pre-quantized checkpoint ({model.quant_method}): kept as it is")
        chosen = fit(_scheme(model, quantize=False), wanted_context, wanted_seqs, eager=True)
    else:
        native = _scheme(model, quantize=False)
        for eager in (False, True) if rung == 0 else (True,):
            layout = fit(native, wanted_context, wanted_seqs, eager)
            if layout is not None and layout.offloaded == 0:
                chosen = layout
                reasons.append(
                    f"{model.dtype} weights fit with the KV cache they need: no quantization"
                )
                if not eager:
                    reasons.append("room for CUDA graphs: faster decoding than eager mode")
                break
        if chosen is None:
            reasons.append(
                f"{model.dtype} weights ({gib(model.total_params * 2)}) do not fit with their KV "
                "cache: 4-bit bitsandbytes, quantized as vLLM loads the checkpoint"
            )
            chosen = fit(_scheme(model, quantize=True), wanted_context, wanted_seqs, eager=True)
    scheme = _scheme(model, quantize=not model.quant_method)
    if chosen is None:
        chosen = _shrink(fit, scheme, wanted_context, wanted_seqs, warnings, settings)
    if chosen is None:
        floor = _floor(model, scheme, margin)
        raise PlanError(
            f"{model.name} does not fit in {gib(budget)}: the floor is {gib(floor)} "
            f"(every layer offloaded, 1 sequence of {MIN_CONTEXT} tokens, "
            f"{token_choices[-1]} batched tokens, {model.quant_method or 'bitsandbytes 4-bit'}). "
            "Raise --vram, or use a smaller model."
        )
    parsers = choose_parsers(model, settings.tool_parser, settings.reasoning_parser)
    plan = _finish(
        model, gpu, host, chosen, budget, rung, reasons + list(parsers.reasons), warnings
    )
    return plan.model_copy(
        update={"tool_call_parser": parsers.tool, "reasoning_parser": parsers.reasoning}
    )


def _shrink(
    fit: Callable[[_Scheme, int, int, bool], _Layout | None],
    scheme: _Scheme,
    context: int,
    seqs: int,
    warnings: list[str],
    asked: EngineSettings,
) -> _Layout | None:
    """Every layer offloaded and still too big: fewer sequences, then a shorter context."""
    candidates = [(context, s) for s in (seqs // 2, 1) if 1 <= s < seqs]
    c = context
    while c > MIN_CONTEXT:
        c = max(MIN_CONTEXT, c // 2)
        candidates.append((c, 1))
    for ctx, s in candidates:
        layout = fit(scheme, ctx, s, True)
        if layout is not None:
            if s < seqs:
                wanted = "asked" if asked.concurrency else "default"
                warnings.append(f"only {s} concurrent sequence(s) fit ({wanted} {seqs})")
            if ctx < context:
                wanted = "asked" if asked.context else "default"
                warnings.append(f"context reduced to {ctx} tokens to fit ({wanted} {context})")
            return layout
    return None


def _floor(model: ModelFacts, scheme: _Scheme, margin: float) -> int:
    """The smallest budget any plan could use for this model."""
    kv = _round_kv(MIN_CONTEXT, model.kv_bytes_per_token())
    act = int(_activations(model, BATCHED_TOKENS[-1], 1, scheme) * margin)
    usable = int(FIXED_OVERHEAD * margin) + act + kv + _resident(model, scheme)
    return max(usable + SAFETY_MIN, math.ceil(usable / (1 - SAFETY_FRACTION)))


def _finish(
    model: ModelFacts,
    gpu: GpuFacts,
    host: HostFacts,
    chosen: _Layout,
    budget: int,
    rung: int,
    reasons: list[str],
    warnings: list[str],
) -> EnginePlan:
    scheme = chosen.scheme
    offload_bytes = chosen.offloaded * scheme.layer_bytes
    if chosen.offloaded:
        reasons.append(
            f"{chosen.offloaded} of {model.layers} layers ({gib(offload_bytes)}) do not fit: "
            "offloaded to pinned host memory, whole layers"
        )
        steps = PCIE_BYTES_PER_S / offload_bytes
        reasons.append(
            f"each decode step reads the offloaded {gib(offload_bytes)} over PCIe: at ~25 GB/s "
            f"(PCIe 4.0 x16) at most ~{steps:.1f} steps/s, shared by all sequences in the batch"
        )
        _check_host(host, offload_bytes, warnings)
    if chosen.eager:
        reasons.append("eager mode: no CUDA graph memory to budget, a faster start")
    reasons.append(
        f"KV cache for {chosen.seqs} x {chosen.context} tokens "
        f"({model.kv_bytes_per_token() // 1024} KiB per token), set in bytes, not as a fraction"
    )
    reasons.append(
        f"{chosen.batched_tokens} batched tokens per step: the largest prefill chunk that "
        "leaves the most layers on the GPU"
    )
    if rung:
        reasons.append(f"rung {rung}: estimates raised {30 * rung}% after a failed start")
    modern = gpu.compute_capability >= (8, 0) or gpu.compute_capability == (0, 0)
    dtype: Literal["bfloat16", "float16", "auto"] = "bfloat16" if modern else "float16"
    if model.quant_method:
        dtype = "auto"
    elif dtype == "float16":
        reasons.append("this GPU has no bfloat16: float16")
    return EnginePlan(
        model=model.name,
        served_name=_served_name(model.name),
        budget=budget,
        gpu_total=gpu.total_bytes,
        dtype=dtype,
        quantization=scheme.name if chosen.scheme.name else None,
        offloaded_layers=chosen.offloaded,
        cpu_offload_bytes=offload_bytes,
        kv_cache_bytes=chosen.estimate.kv_cache,
        kv_bytes_per_token=model.kv_bytes_per_token(),
        max_model_len=chosen.context,
        max_num_seqs=chosen.seqs,
        max_num_batched_tokens=chosen.batched_tokens,
        enforce_eager=chosen.eager,
        block_size=BLOCK_SIZE,
        estimate=chosen.estimate,
        reasons=tuple(reasons),
        warnings=tuple(warnings),
        rung=rung,
    )


def _check_host(host: HostFacts, offload_bytes: int, warnings: list[str]) -> None:
    reserve = 4 * GiB
    if offload_bytes + reserve > host.available_bytes:
        raise PlanError(
            f"offloading {gib(offload_bytes)} needs that much free host RAM plus ~4 GiB; "
            f"{gib(host.available_bytes)} is available"
        )
    if 2 * offload_bytes > host.available_bytes:
        warnings.append(
            f"pinning {gib(offload_bytes)} can briefly take twice that in host RAM; "
            f"{gib(host.available_bytes)} is available"
        )
