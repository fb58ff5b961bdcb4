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

What a candidate holds on the GPU is the memory model's (memory.py); what a decode step
costs is here (`_step_seconds`): the offloaded bytes over PCIe plus the rest of the weights
read on the GPU. One `Search` holds what every candidate of one call shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lowvram.engine.errors import PlanError
from lowvram.engine.hardware import GpuFacts, HostFacts
from lowvram.engine.settings import EngineSettings
from lowvram.engine.units import gib
from lowvram.engine.vllm import memory
from lowvram.engine.vllm.memory import (
    BLOCK_SIZE,
    HOST_RESERVE,
    Scheme,
    Shape,
    VocabOffload,
    ladder,
)
from lowvram.engine.vllm.model import ModelFacts
from lowvram.engine.vllm.parsers import choose_parsers
from lowvram.engine.vllm.plan import EnginePlan, VramEstimate

__all__ = ["HOST_RESERVE", "Layout", "Search", "ladder", "plan_vllm"]

DEFAULT_CONTEXT = 4096
DEFAULT_CONCURRENCY = 8
MIN_CONTEXT = 512
BATCHED_TOKENS = (2048, 1024, 512, 256)
VOCAB_ORDER: tuple[VocabOffload, ...] = ("none", "embed", "all")
TYPICAL_FRACTION = 4
"""A sequence holds a quarter of the context on average, for counting how many run at once."""

DEFAULT_PCIE_BYTES_PER_S = 25e9
"""A practical PCIe 4.0 x16 host-to-device rate, where the link cannot be read."""
GPU_BYTES_PER_S = 1.5e12
"""How fast a decode step reads weights on the GPU, for comparing plans only: a 24 GB
consumer card reads ~1 TB/s, an H100 3 TB/s. Offloaded plans are bound by PCIe, far below."""
EAGER_STEP = 0.008
"""A decode step's fixed cost without CUDA graphs (kernel launches), seconds."""
ALLREDUCE_SECONDS = 30e-6
"""One all-reduce of a decode step's hidden states (KiBs to a few MiB: latency-bound),
two per layer with tensor parallelism; 10-30 us over NVLink, more over PCIe."""
STAGE_HANDOFF_SECONDS = 50e-6
"""Handing a batch's hidden states from one pipeline stage to the next."""


@dataclass(frozen=True)
class Search:
    """What every candidate of one plan shares: the model (one GPU's shard of it), the
    room, the machine, and what was asked."""

    model: ModelFacts
    usable: int
    """Bytes a plan may fill on each GPU (the budget less its safety margin)."""
    seqs: int
    margin: float = 1.0
    pcie_bytes_per_s: float = DEFAULT_PCIE_BYTES_PER_S
    host_bytes: int | None = None
    """Host RAM the offloaded layers may take; None: no limit."""
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    vocab_modes: tuple[VocabOffload, ...] = ("none",)
    """The vocabulary offloads a plan may use ("none" alone: the plugin is not there)."""

    @property
    def split(self) -> bool:
        return self.tensor_parallel * self.pipeline_parallel > 1

    def shape(
        self,
        scheme: Scheme,
        context: int,
        batched_tokens: int,
        offloaded: int,
        vocab: VocabOffload = "none",
        graphs: bool = False,
    ) -> Shape:
        """A candidate's shape; CUDA graphs only where nothing is offloaded."""
        eager = not graphs or offloaded > 0 or vocab != "none"
        return Shape(
            scheme,
            context,
            self.seqs,
            batched_tokens,
            eager,
            offloaded,
            self.split,
            self.margin,
            vocab,
        )

    def vocab_options(self, offloaded: int) -> tuple[VocabOffload, ...]:
        """The vocabulary offloads to try beside `offloaded` layers. An untied embedding
        goes whenever a layer does (a few rows read per token: its whole size freed for
        nothing); the lm_head is read whole every step, so it is a choice on tokens/s."""
        modes = self.vocab_modes
        if offloaded and "embed" in modes and not self.model.tied_embeddings:
            return tuple(m for m in modes if m != "none") or modes
        return modes

    @property
    def most_vocab(self) -> VocabOffload:
        """The most of the vocabulary a plan may put in host memory (for the floor)."""
        return self.vocab_modes[-1]


@dataclass(frozen=True)
class Layout:
    """One candidate: a format, layers on the host, and the KV cache the rest leaves."""

    shape: Shape
    kv_tokens: int
    estimate: VramEstimate
    step_seconds: float
    """Estimated time of one decode step (for comparing plans)."""

    @property
    def scheme(self) -> Scheme:
        return self.shape.scheme

    @property
    def context(self) -> int:
        return self.shape.context

    @property
    def seqs(self) -> int:
        return self.shape.seqs

    @property
    def batched_tokens(self) -> int:
        return self.shape.batched_tokens

    @property
    def eager(self) -> bool:
        return self.shape.eager

    @property
    def offloaded(self) -> int:
        return self.shape.offloaded

    @property
    def vocab(self) -> VocabOffload:
        return self.shape.vocab

    @property
    def running(self) -> int:
        """Sequences the KV cache holds at once, at a typical length."""
        typical = max(BLOCK_SIZE, self.context // TYPICAL_FRACTION)
        return max(1, min(self.seqs, self.kv_tokens // typical))

    @property
    def tokens_per_s(self) -> float:
        """Estimated decode tokens/s over all running sequences."""
        return self.running / self.step_seconds


def layout(search: Search, shape: Shape, kv_tokens: int | None = None) -> Layout | None:
    """This shape's memory and speed on one GPU; None if one full context does not fit,
    or the offloaded layers do not fit in the host RAM (with a reserve).

    `kv_tokens` None gives the KV cache all the room left (capped at seqs x context).
    """
    model = search.model
    if not layout_fits_host(search, shape):
        return None
    per_token = model.kv_bytes_per_token()
    room = memory.kv_room(model, shape, search.usable)
    if kv_tokens is None:
        kv_tokens = min(
            memory.kv_blocks(room, per_token),
            math.ceil(shape.seqs * shape.context / BLOCK_SIZE) * BLOCK_SIZE,
        )
    if kv_tokens < shape.context or kv_tokens * per_token > room:
        return None
    estimate = memory.estimate(model, shape, kv_tokens)
    return Layout(shape, kv_tokens, estimate, _step_seconds(search, shape))


def layout_fits_host(search: Search, shape: Shape) -> bool:
    """Whether the host RAM holds what this shape offloads."""
    needed = memory.host_bytes(search.model, shape)
    return search.host_bytes is None or needed <= search.host_bytes


def _step_seconds(search: Search, shape: Shape) -> float:
    """One decode step: the offloaded bytes over PCIe, the rest read on the GPU, the
    split's communication."""
    model, scheme = search.model, shape.scheme
    tp, pp = search.tensor_parallel, search.pipeline_parallel
    # Each GPU reads its own offloaded layers over its own link, at the same time; an
    # lm_head in host memory is read whole for every step's logits too.
    over_pcie = shape.offloaded * scheme.layer_bytes + memory.lm_head_over_pcie(model, shape.vocab)
    transfer = over_pcie / search.pcie_bytes_per_s
    read = (model.layers * scheme.layer_bytes + memory.resident(model, scheme)) / GPU_BYTES_PER_S
    # Pipeline stages run one after another for a token: a step is all of them (vLLM
    # keeps each busy with another batch, which is what lets the KV cache hold more).
    step = (transfer + read * scheme.slowdown) * pp
    step += EAGER_STEP if shape.eager else 0.0
    if tp > 1:
        step += 2 * model.layers * pp * ALLREDUCE_SECONDS
    step += (pp - 1) * STAGE_HANDOFF_SECONDS
    return step


def _served_name(model: str) -> str:
    path = Path(model).expanduser()
    return path.name if path.is_dir() else model


@dataclass(frozen=True)
class Asked:
    """The machine one plan is for, and what was asked of it."""

    gpu: GpuFacts
    host: HostFacts
    settings: EngineSettings
    budget: int
    """VRAM the engine may use on each of its GPUs."""
    rung: int = 0
    """Steps down after failed starts: each raises the estimates 30%."""


def plan_vllm(
    model: ModelFacts,
    gpu: GpuFacts,
    host: HostFacts,
    settings: EngineSettings,
    *,
    rung: int = 0,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    plugin_missing: str | None = None,
) -> EnginePlan:
    """The plan for `model` on `gpu` within `settings.vram`; `rung` > 0 is more cautious.

    With parallel sizes above 1 the engine spans that many GPUs like `gpu`, each with the
    budget, and `host` is the host RAM this engine's GPUs may offload to.
    `plugin_missing` says why the vLLM that will run cannot load lowvram's plugin (the
    vocabulary then stays on the GPU); None: it can.
    """
    tp, pp = tensor_parallel, pipeline_parallel
    _check_split(model, tp, pp)
    vocab_modes, vocab_note = _vocab_modes(model, settings, pp, plugin_missing)
    whole, model = model, model.shard(tp, pp)
    asked = Asked(gpu, host, settings, budget_for(settings, gpu), rung)
    search = Search(
        model,
        memory.usable_bytes(asked.budget),
        settings.concurrency or DEFAULT_CONCURRENCY,
        margin=1.0 + 0.3 * rung,
        pcie_bytes_per_s=gpu.pcie_bytes_per_s or DEFAULT_PCIE_BYTES_PER_S,
        host_bytes=host.available_bytes,
        tensor_parallel=tp,
        pipeline_parallel=pp,
        vocab_modes=vocab_modes,
    )
    steps = Ladder(search, _formats(model, gpu, settings), settings.optimize, rung)
    context = min(settings.context or DEFAULT_CONTEXT, model.max_position)
    chosen, why = steps.choose(context)
    warnings: list[str] = []
    ctx = context
    while chosen is None and ctx > MIN_CONTEXT:  # the last rung: a shorter context
        ctx = max(MIN_CONTEXT, ctx // 2)
        chosen, why = steps.choose(ctx)
        if chosen is not None:
            wanted = "asked" if settings.context else "default"
            warnings.append(f"context reduced to {ctx} tokens to fit ({wanted} {context})")
    if chosen is None:
        raise steps.refusal(asked)
    if search.split:
        why.insert(0, _split_reason(whole, tp, pp))
    if vocab_note and chosen.offloaded:
        why.append(vocab_note)
    plan = _finish(whole, search, asked, chosen, why, warnings)
    return plan.model_copy(update={"tensor_parallel": tp, "pipeline_parallel": pp})


def _vocab_modes(
    model: ModelFacts, settings: EngineSettings, pp: int, plugin_missing: str | None
) -> tuple[tuple[VocabOffload, ...], str | None]:
    """The vocabulary offloads to search (ENGINE_OFFLOAD_VOCAB), and why there are none."""
    wanted = settings.offload_vocab
    if wanted == "none":
        return ("none",), None
    why_not = plugin_missing or (
        "pipeline parallel (the embedding lives on the first stage only)" if pp > 1 else None
    )
    if why_not:
        if wanted != "auto":
            raise PlanError(f"ENGINE_OFFLOAD_VOCAB={wanted} cannot be done: {why_not}")
        return ("none",), f"the embedding and lm_head stay on the GPU: {why_not}"
    tied = model.tied_embeddings  # its lm_head is the embedding: "all" is "embed"
    if wanted == "embed":
        return ("embed",), None
    if wanted == "all":
        return ("embed" if tied else "all",), None
    return (("none", "embed") if tied else ("none", "embed", "all")), None


def _check_split(model: ModelFacts, tp: int, pp: int) -> None:
    if tp > 1 and (problem := model.tensor_parallel_problem(tp)):
        raise PlanError(f"{model.name} cannot be split over {tp} GPUs by tensors: {problem}")
    if pp > model.layers:
        raise PlanError(f"{model.name} has {model.layers} layers, too few for {pp} stages")


def budget_for(settings: EngineSettings, gpu: GpuFacts) -> int:
    """ENGINE_VRAM, else 95% of what the GPU has free; never more than the GPU has."""
    budget = int(settings.vram) if settings.vram is not None else int(gpu.free_bytes * 0.95)
    if budget > gpu.total_bytes:
        raise PlanError(
            f"the budget {gib(budget)} is more than the GPU has ({gib(gpu.total_bytes)})"
        )
    return budget


def _formats(model: ModelFacts, gpu: GpuFacts, settings: EngineSettings) -> list[Scheme]:
    """The ladder of formats, or the one ENGINE_QUANTIZATION forces."""
    schemes = ladder(model, gpu)
    if settings.quantization == "auto":
        return schemes
    forced = None if settings.quantization == "none" else settings.quantization
    schemes = [s for s in schemes if s.name == forced]
    if not schemes:
        own = f" (a {model.quant_method} checkpoint keeps its own)" if model.quant_method else ""
        raise PlanError(
            f"ENGINE_QUANTIZATION={settings.quantization} is not available for "
            f"{model.name} on this GPU{own}"
        )
    return schemes


@dataclass(frozen=True)
class Ladder:
    """The search for one plan: formats best first, then CUDA graphs, then offloaded
    layers, each candidate with all the KV cache the rest leaves."""

    search: Search
    schemes: list[Scheme]
    optimize: str
    rung: int

    @property
    def token_choices(self) -> list[int]:
        """Prefill chunks to try, largest first (smaller after failed starts)."""
        seqs, limit = self.search.seqs, max(256, 2048 >> self.rung)
        return [t for t in BATCHED_TOKENS if t <= limit and t >= seqs] or [seqs]

    def candidates(
        self, scheme: Scheme, ctx: int, graphs: bool, offloads: range, with_vocab: bool = True
    ) -> Iterator[Layout]:
        """Layouts that fit, for each number of offloaded layers (and, `with_vocab`, each
        vocabulary offload that goes with it) and prefill chunk."""
        search = self.search
        for offloaded in offloads:
            vocabs = search.vocab_options(offloaded) if with_vocab else ("none",)
            if not scheme.offloadable:
                if offloaded:
                    return
                vocabs = ("none",)
            for vocab in vocabs:
                for tokens in self.token_choices:
                    shape = search.shape(scheme, ctx, tokens, offloaded, vocab, graphs)
                    if (found := layout(search, shape)) is not None:
                        yield found

    def choose(self, context: int) -> tuple[Layout | None, list[str]]:
        """The layout to run, and why, for one context length.

        Without offload, the best format whose plan runs every asked sequence wins, unless a
        better format runs fewer but still gives more tokens/s (FP8 against 4-bit
        bitsandbytes, whose matmuls are ~2.5x slower). Where no format runs them all
        without offload, every format and number of offloaded layers compete on tokens/s.
        """
        whole = self._without_offload(context)
        seqs = self.search.seqs
        if self.optimize == "latency" and whole:
            first = whole[min(whole)]
            return first, [f"{_label(first.scheme)}: every layer fits on the GPU (latency first)"]
        serving = [i for i, c in whole.items() if c.running >= seqs]
        if serving and self.optimize == "throughput":
            return _serving_choice(whole, serving[0], seqs)
        layers = self.search.model.layers
        every = [
            c for s in self.schemes for c in self.candidates(s, context, False, range(layers + 1))
        ]
        every += whole.values()
        if not every:
            return None, []
        if self.optimize == "latency":
            best = min(every, key=lambda c: (c.step_seconds, -c.running, -c.batched_tokens))
            return best, [f"{_label(best.scheme)}: the fastest single stream that fits (latency)"]
        top = max(c.tokens_per_s for c in every)
        # Within 2% of the best: fewer offloaded layers (one stream is faster), less of
        # the vocabulary moved, then the better format (the ladder's order), then the
        # larger prefill chunk.
        near = [c for c in every if c.tokens_per_s >= 0.98 * top]
        best = min(
            near,
            key=lambda c: (
                c.offloaded,
                VOCAB_ORDER.index(c.vocab),
                self.schemes.index(c.scheme),
                -c.batched_tokens,
            ),
        )
        return best, [
            f"no format runs {seqs} sequences with every layer on the GPU; "
            f"{_label(best.scheme)} with {best.offloaded} layers offloaded gives the most "
            "tokens/s over all sequences"
        ]

    def _without_offload(self, context: int) -> dict[int, Layout]:
        """Each format's fastest layout with every layer on the GPU (graphs if they fit)."""
        whole: dict[int, Layout] = {}
        for i, scheme in enumerate(self.schemes):
            for graphs in (True, False) if self.rung == 0 else (False,):
                found = _fastest(
                    self.candidates(scheme, context, graphs, range(1), with_vocab=False)
                )
                if found is not None:
                    whole[i] = found
                    break
        return whole

    def refusal(self, asked: Asked) -> PlanError:
        """Nothing fits: say where the floor is (the lowest of every format), and what host
        RAM offloading needs."""
        search = self.search
        model = search.model
        tokens = self.token_choices[-1]
        shapes = [
            search.shape(scheme, MIN_CONTEXT, tokens, model.layers, search.most_vocab)
            if scheme.offloadable
            else search.shape(scheme, MIN_CONTEXT, tokens, 0)
            for scheme in self.schemes
        ]

        # The lowest floor among the formats whose offload the host RAM holds: a budget
        # there plans. One that would go lower with more RAM is said too.
        def floor_of(shape: Shape) -> int:
            return memory.floor(model, shape)

        held = [s for s in shapes if layout_fits_host(search, s)]
        lowest = min(shapes, key=floor_of)
        chosen = min(held, key=floor_of) if held else lowest
        ram = ""
        if not layout_fits_host(search, lowest):
            ram = (
                f"; offloading {lowest.scheme.name or 'the dtype'} would go down to "
                f"{gib(floor_of(lowest))} but needs ~{gib(memory.host_bytes(model, lowest))} "
                f"of host RAM, {gib(asked.host.available_bytes)} is free"
            )
        gpus = search.tensor_parallel * search.pipeline_parallel
        per_gpu = f" per GPU over {gpus} GPUs" if gpus > 1 else ""
        vocab = {"none": "", "embed": ", the embedding", "all": ", the vocabulary"}
        what = (
            f"every layer{vocab[chosen.vocab]} offloaded"
            if chosen.offloaded
            else "nothing offloaded: vLLM cannot offload it"
        )
        return PlanError(
            f"{model.name} does not fit in {gib(asked.budget)}{per_gpu}: the floor is "
            f"{gib(floor_of(chosen))} ({what}, one {MIN_CONTEXT}-token sequence, "
            f"{tokens} batched tokens, {chosen.scheme.name or 'the dtype'}){ram}. "
            "Raise --vram, add GPUs, or use a smaller model."
        )


def _fastest(found: Iterator[Layout]) -> Layout | None:
    return max(found, key=lambda c: (c.tokens_per_s, c.batched_tokens), default=None)


def _serving_choice(whole: dict[int, Layout], pick: int, seqs: int) -> tuple[Layout, list[str]]:
    """The first format that runs every sequence, or a better one that runs fewer but
    still more tokens/s."""
    rival = whole[pick]
    faster = [i for i in whole if i < pick and whole[i].tokens_per_s >= rival.tokens_per_s]
    chosen = whole[faster[0] if faster else pick]
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


def _label(scheme: Scheme) -> str:
    return {
        None: "the checkpoint's own dtype",
        "fp8": "FP8 (quantized as vLLM loads it)",
        "bitsandbytes": "4-bit bitsandbytes (quantized as vLLM loads it)",
    }.get(scheme.name, f"the checkpoint's {scheme.name}")


def _finish(
    whole: ModelFacts,
    search: Search,
    asked: Asked,
    chosen: Layout,
    reasons: list[str],
    warnings: list[str],
) -> EnginePlan:
    """The plan for the chosen layout, with the reasons and warnings that go with it."""
    model, gpu, host, settings = search.model, asked.gpu, asked.host, asked.settings
    budget, rung, pcie = asked.budget, asked.rung, search.pcie_bytes_per_s
    scheme = chosen.scheme
    offload_bytes = chosen.offloaded * scheme.layer_bytes
    embedding = model.embedding_params * 2 if chosen.vocab != "none" else 0
    lm_head = model.lm_head_params * 2 if chosen.vocab == "all" else 0
    over_pcie = offload_bytes + memory.lm_head_over_pcie(model, chosen.vocab)
    on_host = offload_bytes + embedding + lm_head
    link = "measured from the PCIe link" if gpu.pcie_bytes_per_s else "assumed: PCIe 4.0 x16"
    if chosen.offloaded:
        reasons.append(
            f"{chosen.offloaded} of {model.layers} layers ({gib(offload_bytes)}) offloaded to "
            "pinned host memory, whole layers"
        )
    reasons += _vocab_reasons(model, chosen, search)
    if over_pcie:
        reasons.append(
            f"each decode step reads {gib(over_pcie)} over PCIe at {pcie / 1e9:.0f} GB/s "
            f"({link}): at most {pcie / over_pcie:.1f} steps/s, shared by up to "
            f"{chosen.running} sequences (~{chosen.tokens_per_s:.0f} tokens/s in all, an "
            "upper bound)"
        )
    if 2 * on_host > host.available_bytes:
        warnings.append(
            f"pinning {gib(on_host)} can briefly take twice that in host RAM; "
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
        vocab_offload=chosen.vocab,
        embedding_offload_bytes=embedding,
        lm_head_offload_bytes=lm_head,
        tied_embeddings=model.tied_embeddings,
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


def _vocab_reasons(model: ModelFacts, chosen: Layout, search: Search) -> list[str]:
    """What the plan does with the embedding and the lm_head, and why."""
    embedding = gib(model.embedding_params * 2)
    if chosen.vocab == "none":
        if chosen.offloaded and "embed" in search.vocab_modes:  # tied: a choice, lost
            return [
                f"the tied embedding and lm_head ({embedding}) stay on the GPU: reading them "
                "over PCIe every step would cost more tokens/s than the room they free buys"
            ]
        return []
    if model.tied_embeddings:
        return [
            f"the tied embedding and lm_head ({embedding}) in host memory too (lowvram's vLLM "
            "plugin): the logits read it whole over PCIe every step, counted above"
        ]
    lines = [
        f"the input embedding ({embedding}) in host memory too (lowvram's vLLM plugin): a "
        "step reads a few rows of it, so its whole size is freed for next to nothing"
    ]
    lm_head = gib(model.lm_head_params * 2)
    if chosen.vocab == "all":
        lines.append(
            f"the lm_head ({lm_head}) in host memory as well: read whole over PCIe every step "
            "(counted above), and the room it frees buys more tokens/s than that costs"
        )
    elif "all" in search.vocab_modes:
        lines.append(
            f"the lm_head ({lm_head}) stays on the GPU: reading it over PCIe every step would "
            "cost more tokens/s than the room it frees buys"
        )
    return lines
