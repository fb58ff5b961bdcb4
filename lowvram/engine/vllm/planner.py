"""The VRAM planner: facts in, a frozen `EnginePlan` out, no side effects.

It plans for tokens per second at the concurrency asked (`ENGINE_CONCURRENCY`, default 8),
not only for fit:

1. The ladder of weight formats, best first: the checkpoint's dtype; FP8, quantized as vLLM
   loads it, on GPUs with FP8 (compute capability 8.9+); 4-bit bitsandbytes. A pre-quantized
   checkpoint (AWQ, GPTQ, FP8, ...) keeps its own method (vLLM runs AWQ and GPTQ on Marlin).
2. The first format that runs every asked sequence with nothing offloaded wins, with CUDA
   graphs when their memory fits too.
3. Otherwise offload whole decoder layers to pinned host memory (vLLM reads them over PCIe
   at every decode step, whatever the batch), choosing format and layers for the most
   tokens/s over all sequences: each step costs the offloaded bytes over the link plus the
   rest of the weights read on the GPU, and serves as many sequences as the KV cache holds.
   Keeping a layer on the GPU speeds one stream up a little; the KV room it takes can cost
   many sequences. `ENGINE_OPTIMIZE=latency` keeps the most layers on the GPU instead.
4. The KV cache is paged: it holds at least one full context, and all the rest the budget
   allows. Sequences are assumed a quarter of the context long on average (chat turns are
   shorter than the window) when counting how many run at once.
5. Only when nothing fits with every layer offloaded, shorten the context, down to a
   floor; below that, refuse.

The memory model (what vLLM 0.26 holds on the GPU once ready, as nvidia-smi shows it):
    fixed overhead  +  weights left on the GPU  +  KV cache  +  peak activations  (+ graphs)
Activations are those of vLLM's start-up profiling pass over max_num_batched_tokens
tokens, which the allocator keeps cached; bitsandbytes adds the bf16 output of its
dequantizing matmuls and one dequantized weight matrix, and leaves the scratch of
quantizing at load time cached too. The constants were fitted to vLLM 0.26.0 runs on an
H200 (docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
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
DEFAULT_CONCURRENCY = 8
MIN_CONTEXT = 512
BATCHED_TOKENS = (2048, 1024, 512, 256)
BLOCK_SIZE = 16
TYPICAL_FRACTION = 4
"""A sequence holds a quarter of the context on average, for counting how many run at once."""

DEFAULT_PCIE_BYTES_PER_S = 25e9
"""A practical PCIe 4.0 x16 host-to-device rate, where the link cannot be read."""
GPU_BYTES_PER_S = 1.5e12
"""How fast a decode step reads weights on the GPU, for comparing plans only: a 24 GB
consumer card reads ~1 TB/s, an H100 3 TB/s. Offloaded plans are bound by PCIe, far below."""
EAGER_STEP = 0.008
"""A decode step's fixed cost without CUDA graphs (kernel launches), seconds."""

HOST_RESERVE = 4 * GiB
"""Host RAM left to the OS, the gateway and vLLM's own process beside offloaded layers."""

PARALLEL_OVERHEAD = 512 * MiB
"""Per GPU of a split engine: NCCL's communicators and vLLM's custom all-reduce buffers
(an estimate from their documented sizes; not yet measured here)."""
ALLREDUCE_SECONDS = 30e-6
"""One all-reduce of a decode step's hidden states (KiBs to a few MiB: latency-bound),
two per layer with tensor parallelism; 10-30 us over NVLink, more over PCIe."""
STAGE_HANDOFF_SECONDS = 50e-6
"""Handing a batch's hidden states from one pipeline stage to the next."""

PREQUANTIZED_BYTES_PER_PARAM = {"awq": 0.52, "gptq": 0.52, "fp8": 1.0, "bitsandbytes": 0.5}


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
    """How much slower than bf16 its matmuls read weights (bitsandbytes: ~4x)."""

    @property
    def quantization_arg(self) -> str | None:
        """What `--quantization` says: only for quantizing at load; vLLM reads a
        pre-quantized checkpoint's method from its config."""
        return self.name if self.name in ("fp8", "bitsandbytes") else None


def ladder(model: ModelFacts, gpu: GpuFacts) -> list[Scheme]:
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
        schemes.append(Scheme("fp8", linear + small, load_scratch=scratch))
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


def _activations(model: ModelFacts, tokens: int, seqs: int, scheme: Scheme) -> int:
    inter = (
        model.expert_intermediate * 8 if model.experts else model.intermediate
    )  # routed tokens fan out to up to 8 experts
    per_token = (scheme.mlp_outputs * inter + 3 * model.hidden) * 2
    logits = seqs * model.vocab * 4 * 2
    return tokens * per_token + logits + scheme.dequant_bytes


def _resident(model: ModelFacts, scheme: Scheme) -> int:
    """Weights on the GPU whatever is offloaded: embeddings, lm_head, quant state, scratch."""
    embeddings = (model.embedding_params + model.lm_head_params + model.hidden) * 2
    return embeddings + model.layers * scheme.resident_per_layer + scheme.load_scratch


def _blocks(n_bytes: int, per_token: int) -> int:
    """Whole KV blocks that fit in `n_bytes`, in tokens."""
    return n_bytes // (per_token * BLOCK_SIZE) * BLOCK_SIZE


@dataclass(frozen=True)
class Layout:
    """One candidate: a format, layers on the host, and the KV cache the rest leaves."""

    scheme: Scheme
    context: int
    seqs: int
    batched_tokens: int
    eager: bool
    offloaded: int
    kv_tokens: int
    estimate: VramEstimate
    step_seconds: float
    """Estimated time of one decode step (for comparing plans)."""

    @property
    def running(self) -> int:
        """Sequences the KV cache holds at once, at a typical length."""
        typical = max(BLOCK_SIZE, self.context // TYPICAL_FRACTION)
        return max(1, min(self.seqs, self.kv_tokens // typical))

    @property
    def tokens_per_s(self) -> float:
        """Estimated decode tokens/s over all running sequences."""
        return self.running / self.step_seconds


def layout(
    model: ModelFacts,
    scheme: Scheme,
    usable: int,
    *,
    context: int,
    seqs: int,
    batched_tokens: int,
    eager: bool,
    offloaded: int,
    margin: float = 1.0,
    pcie_bytes_per_s: float = DEFAULT_PCIE_BYTES_PER_S,
    kv_tokens: int | None = None,
    host_bytes: int | None = None,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> Layout | None:
    """This configuration's memory and speed on one GPU; None if one full context does not
    fit, or the offloaded layers do not fit in `host_bytes` of host RAM (with a reserve).

    `model` is what one GPU holds (`ModelFacts.shard` of a split engine); the parallel
    sizes add the split's memory and the time its GPUs spend talking.
    `kv_tokens` None gives the KV cache all the room left (capped at seqs x context).
    """
    if host_bytes is not None and offloaded * scheme.layer_bytes + HOST_RESERVE > host_bytes:
        return None
    split = tensor_parallel * pipeline_parallel > 1
    per_token = model.kv_bytes_per_token()
    activations = int(_activations(model, batched_tokens, seqs, scheme) * margin)
    overhead = int((FIXED_OVERHEAD + (PARALLEL_OVERHEAD if split else 0)) * margin)
    graphs = 0 if eager else CUDA_GRAPHS
    on_gpu = model.layers - offloaded
    weights = _resident(model, scheme) + on_gpu * (scheme.layer_bytes + scheme.gpu_extra_per_layer)
    room = usable - (overhead + activations + graphs + weights)
    if kv_tokens is None:
        kv_tokens = min(
            _blocks(room, per_token), math.ceil(seqs * context / BLOCK_SIZE) * BLOCK_SIZE
        )
    kv = kv_tokens * per_token
    if kv_tokens < context or kv > room:
        return None
    # Each GPU reads its own offloaded layers over its own link, at the same time.
    transfer = offloaded * scheme.layer_bytes / pcie_bytes_per_s
    read = (model.layers * scheme.layer_bytes + _resident(model, scheme)) / GPU_BYTES_PER_S
    # Pipeline stages run one after another for a token: a step is all of them (vLLM
    # keeps each busy with another batch, which is what lets the KV cache hold more).
    step = (transfer + read * scheme.slowdown) * pipeline_parallel
    step += EAGER_STEP if eager else 0.0
    if tensor_parallel > 1:
        step += 2 * model.layers * pipeline_parallel * ALLREDUCE_SECONDS
    step += (pipeline_parallel - 1) * STAGE_HANDOFF_SECONDS
    estimate = VramEstimate(
        cuda_context=overhead,
        weights=weights,
        kv_cache=kv,
        activations=activations,
        cuda_graphs=graphs,
    )
    return Layout(
        scheme, context, seqs, batched_tokens, eager, offloaded, kv_tokens, estimate, step
    )


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
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
) -> EnginePlan:
    """The plan for `model` on `gpu` within `settings.vram`; `rung` > 0 is more cautious.

    With parallel sizes above 1 the engine spans that many GPUs like `gpu`, each with the
    budget, and `host` is the host RAM this engine's GPUs may offload to.
    """
    tp, pp = tensor_parallel, pipeline_parallel
    if tp > 1 and (problem := model.tensor_parallel_problem(tp)):
        raise PlanError(f"{model.name} cannot be split over {tp} GPUs by tensors: {problem}")
    if pp > model.layers:
        raise PlanError(f"{model.name} has {model.layers} layers, too few for {pp} stages")
    whole, model = model, model.shard(tp, pp)
    budget = int(settings.vram) if settings.vram is not None else int(gpu.free_bytes * 0.95)
    if budget > gpu.total_bytes:
        raise PlanError(
            f"the budget {gib(budget)} is more than the GPU has ({gib(gpu.total_bytes)})"
        )
    usable = budget - max(SAFETY_MIN, int(budget * SAFETY_FRACTION))
    margin = 1.0 + 0.3 * rung
    pcie = gpu.pcie_bytes_per_s or DEFAULT_PCIE_BYTES_PER_S
    context = min(settings.context or DEFAULT_CONTEXT, model.max_position)
    seqs = settings.concurrency or DEFAULT_CONCURRENCY
    schemes = ladder(model, gpu)
    if settings.quantization != "auto":
        forced = None if settings.quantization == "none" else settings.quantization
        schemes = [s for s in schemes if s.name == forced]
        if not schemes:
            raise PlanError(
                f"ENGINE_QUANTIZATION={settings.quantization} is not available for "
                f"{model.name} on this GPU"
                + (
                    f" (a {model.quant_method} checkpoint keeps its own)"
                    if model.quant_method
                    else ""
                )
            )
    token_choices = [t for t in BATCHED_TOKENS if t <= max(256, 2048 >> rung) and t >= seqs]
    token_choices = token_choices or [seqs]

    def candidates(scheme: Scheme, ctx: int, graphs: bool, offloads: range) -> Iterator[Layout]:
        for offloaded in offloads:
            for tokens in token_choices:
                found = layout(
                    model,
                    scheme,
                    usable,
                    context=ctx,
                    seqs=seqs,
                    batched_tokens=tokens,
                    eager=not graphs or offloaded > 0,  # graphs only without offload
                    offloaded=offloaded,
                    margin=margin,
                    pcie_bytes_per_s=pcie,
                    host_bytes=host.available_bytes,
                    tensor_parallel=tp,
                    pipeline_parallel=pp,
                )
                if found is not None:
                    yield found

    def choose(ctx: int) -> tuple[Layout | None, list[str]]:
        return _choose(schemes, candidates, ctx, seqs, model.layers, settings.optimize, rung)

    chosen, why = choose(context)
    warnings: list[str] = []
    ctx = context
    while chosen is None and ctx > MIN_CONTEXT:
        ctx = max(MIN_CONTEXT, ctx // 2)
        chosen, why = choose(ctx)
        if chosen is not None:
            wanted = "asked" if settings.context else "default"
            warnings.append(f"context reduced to {ctx} tokens to fit ({wanted} {context})")
    if chosen is None:
        floor = _floor(model, schemes[-1], margin, split=tp * pp > 1)
        offload = model.layers * schemes[-1].layer_bytes + HOST_RESERVE
        free = gib(host.available_bytes)
        ram = f"; offloading it needs ~{gib(offload)} of host RAM, {free} is free"
        gpus = f" per GPU over {tp * pp} GPUs" if tp * pp > 1 else ""
        raise PlanError(
            f"{model.name} does not fit in {gib(budget)}{gpus}: the floor is {gib(floor)} "
            f"(every layer offloaded, one {MIN_CONTEXT}-token sequence, "
            f"{token_choices[-1]} batched tokens, {schemes[-1].name})"
            + (ram if offload > host.available_bytes else "")
            + ". Raise --vram, add GPUs, or use a smaller model."
        )
    if tp * pp > 1:
        why.insert(0, _split_reason(whole, tp, pp))
    plan = _finish(whole, model, gpu, host, settings, chosen, budget, rung, pcie, why, warnings)
    return plan.model_copy(update={"tensor_parallel": tp, "pipeline_parallel": pp})


def _split_reason(model: ModelFacts, tp: int, pp: int) -> str:
    if tp > 1:
        kv = (
            f"{model.kv_heads // tp} of its {model.kv_heads}"
            if model.kv_heads >= tp
            else f"a copy of 1 of its {model.kv_heads}"
        )
        return (
            f"tensor parallel over {tp} GPUs: each holds 1/{tp} of every layer "
            f"({model.heads // tp} of {model.heads} attention heads, {kv} key/value heads), "
            f"and they all-reduce twice per layer per step"
        )
    return (
        f"pipeline parallel over {pp} GPUs: each holds {-(-model.layers // pp)} of the "
        f"{model.layers} layers ({model.tensor_parallel_problem(pp) or 'by choice'})"
    )


Candidates = Callable[[Scheme, int, bool, range], Iterator[Layout]]


def _choose(
    schemes: list[Scheme],
    candidates: Candidates,
    context: int,
    seqs: int,
    layers: int,
    optimize: str,
    rung: int,
) -> tuple[Layout | None, list[str]]:
    """The layout to run, and why, for one context length.

    Without offload, the best format whose plan runs every asked sequence wins, unless a
    better format runs fewer but still gives more tokens/s (FP8 against 4-bit
    bitsandbytes, whose matmuls are ~4x slower). Where no format runs them all without
    offload, every format and number of offloaded layers compete on tokens/s.
    """

    def fastest(found: Iterator[Layout]) -> Layout | None:
        return max(found, key=lambda c: (c.tokens_per_s, c.batched_tokens), default=None)

    whole: dict[int, Layout] = {}
    for i, scheme in enumerate(schemes):
        for graphs in (True, False) if rung == 0 else (False,):
            found = fastest(candidates(scheme, context, graphs, range(1)))
            if found is not None:
                whole[i] = found
                break
    if optimize == "latency" and whole:
        first = whole[min(whole)]
        return first, [f"{_label(first.scheme)}: every layer fits on the GPU (latency first)"]
    serving = [i for i, c in whole.items() if c.running >= seqs]
    if serving and optimize == "throughput":
        pick = serving[0]
        rival = whole[pick]
        faster = [i for i in whole if i < pick and whole[i].tokens_per_s >= rival.tokens_per_s]
        pick = faster[0] if faster else pick
        chosen = whole[pick]
        why = [f"{_label(chosen.scheme)}: every layer fits on the GPU"]
        if chosen.running >= seqs:
            why[0] += f" with the KV cache for {seqs} sequences"
        else:
            why.append(
                f"it runs {chosen.running} of {seqs} sequences at once, and still more tokens/s "
                f"than {_label(rival.scheme)} running all of them"
            )
        why.append(
            "eager mode: no room for CUDA graphs"
            if chosen.eager
            else "CUDA graphs fit too: faster decoding than eager mode"
        )
        return chosen, why
    every = [c for s in schemes for c in candidates(s, context, False, range(layers + 1))]
    every += whole.values()
    if not every:
        return None, []
    if optimize == "latency":
        best = min(every, key=lambda c: (c.step_seconds, -c.running, -c.batched_tokens))
        return best, [f"{_label(best.scheme)}: the fastest single stream that fits (latency)"]
    top = max(c.tokens_per_s for c in every)
    # Within 2% of the best: fewer offloaded layers (one stream is faster), then the better
    # format (the ladder's order), then the larger prefill chunk.
    near = [c for c in every if c.tokens_per_s >= 0.98 * top]
    best = min(near, key=lambda c: (c.offloaded, schemes.index(c.scheme), -c.batched_tokens))
    return best, [
        f"no format runs {seqs} sequences with every layer on the GPU; "
        f"{_label(best.scheme)} with {best.offloaded} layers offloaded gives the most tokens/s "
        "over all sequences"
    ]


def _label(scheme: Scheme) -> str:
    return {
        None: "the checkpoint's own dtype",
        "fp8": "FP8 (quantized as vLLM loads it)",
        "bitsandbytes": "4-bit bitsandbytes (quantized as vLLM loads it)",
    }.get(scheme.name, f"the checkpoint's {scheme.name}")


def _floor(model: ModelFacts, scheme: Scheme, margin: float, split: bool = False) -> int:
    """The smallest budget any plan could use for this model (or this shard of it)."""
    kv = math.ceil(MIN_CONTEXT / BLOCK_SIZE) * BLOCK_SIZE * model.kv_bytes_per_token()
    act = int(_activations(model, BATCHED_TOKENS[-1], 1, scheme) * margin)
    overhead = FIXED_OVERHEAD + (PARALLEL_OVERHEAD if split else 0)
    usable = int(overhead * margin) + act + kv + _resident(model, scheme)
    return max(usable + SAFETY_MIN, math.ceil(usable / (1 - SAFETY_FRACTION)))


def _finish(
    whole: ModelFacts,
    model: ModelFacts,
    gpu: GpuFacts,
    host: HostFacts,
    settings: EngineSettings,
    chosen: Layout,
    budget: int,
    rung: int,
    pcie: float,
    reasons: list[str],
    warnings: list[str],
) -> EnginePlan:
    scheme = chosen.scheme
    offload_bytes = chosen.offloaded * scheme.layer_bytes
    link = "measured from the PCIe link" if gpu.pcie_bytes_per_s else "assumed: PCIe 4.0 x16"
    if chosen.offloaded:
        reasons.append(
            f"{chosen.offloaded} of {model.layers} layers ({gib(offload_bytes)}) offloaded to "
            "pinned host memory, whole layers"
        )
        reasons.append(
            f"each decode step reads the offloaded {gib(offload_bytes)} over PCIe at "
            f"{pcie / 1e9:.0f} GB/s ({link}): at most {pcie / offload_bytes:.1f} steps/s, "
            f"shared by up to {chosen.running} sequences (~{chosen.tokens_per_s:.0f} tokens/s "
            "in all, an upper bound)"
        )
        if 2 * offload_bytes > host.available_bytes:
            warnings.append(
                f"pinning {gib(offload_bytes)} can briefly take twice that in host RAM; "
                f"{gib(host.available_bytes)} is available"
            )
    reasons.append(
        f"KV cache: {chosen.kv_tokens:,} tokens (paged: at least one {chosen.context}-token "
        f"context; {chosen.running} of the {chosen.seqs} sequences at a quarter of it each)"
    )
    reasons.append(
        f"{chosen.batched_tokens} batched tokens per step: the largest prefill chunk of the plan"
    )
    if rung:
        reasons.append(f"rung {rung}: estimates raised {30 * rung}% after a failed start")
    dtype: Literal["bfloat16", "float16", "auto"] = "bfloat16" if gpu.has_bfloat16 else "float16"
    if model.quant_method:
        dtype = "auto"
    elif dtype == "float16":
        reasons.append("this GPU has no bfloat16: float16")
    if scheme.name == "fp8" and gpu.compute_capability == (0, 0):
        warnings.append("FP8 needs compute capability 8.9 or newer (Ada, Hopper); assumed here")
    parsers = choose_parsers(whole, settings.tool_parser, settings.reasoning_parser)
    return EnginePlan(
        model=model.name,
        served_name=_served_name(model.name),
        budget=budget,
        gpu_total=gpu.total_bytes,
        dtype=dtype,
        quantization=scheme.name,
        quantization_arg=scheme.quantization_arg,
        offloaded_layers=chosen.offloaded,
        cpu_offload_bytes=offload_bytes,
        kv_cache_bytes=chosen.estimate.kv_cache,
        kv_bytes_per_token=model.kv_bytes_per_token(),
        max_model_len=chosen.context,
        max_num_seqs=chosen.seqs,
        max_num_batched_tokens=chosen.batched_tokens,
        enforce_eager=chosen.eager,
        block_size=BLOCK_SIZE,
        tool_call_parser=parsers.tool,
        reasoning_parser=parsers.reasoning,
        estimate=chosen.estimate,
        pcie_bytes_per_s=pcie,
        tokens_per_s=chosen.tokens_per_s,
        reasons=tuple(reasons + list(parsers.reasons)),
        warnings=tuple(warnings),
        rung=rung,
    )
