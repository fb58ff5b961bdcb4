"""How one model is spread over the GPUs: engines (replicas), each on a group of GPUs.

    deployment = plan_deployment(model, hardware, EngineSettings(gpus=2, vram="10GiB"))
    deployment.groups      # ((0, 1),): one engine split over both, or ((0,), (1,)): two
    deployment.plan        # one engine's plan; its tensor/pipeline sizes say how it splits

Every way of cutting the N GPUs into equal groups is a candidate: a group of one GPU runs
a whole engine (a replica), a larger group one engine split by tensors (by layers where
the attention heads do not split that many ways; vLLM does both, we only choose). Each
candidate is planned as one engine within the per-GPU budget, and its tokens/s multiplied
by its replicas. The most tokens/s wins; within 2%, the most replicas: a crash then takes
out a share of the capacity, not all of it, and no GPU waits on another's all-reduce.

A model that fits one GPU is served fastest by replicas (each reads its own copy of the
weights; splitting adds all-reduces and saves nothing). A model that does not fit, and
offloads layers over PCIe, is served faster split: each GPU holds a larger part of its
share, and the GPUs read what is offloaded over their own links at once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lowvram.engine.errors import PlanError
from lowvram.engine.hardware import GpuFacts, Hardware, HostFacts
from lowvram.engine.settings import EngineSettings
from lowvram.engine.units import gib
from lowvram.engine.vllm.model import ModelFacts
from lowvram.engine.vllm.plan import EnginePlan
from lowvram.engine.vllm.planner import HOST_RESERVE, plan_vllm

NEAR = 0.98
"""Candidates within 2% of the most tokens/s are as good: the one with more replicas wins."""


@dataclass(frozen=True)
class Deployment:
    plan: EnginePlan
    """What each engine runs (the same plan for every replica)."""
    groups: tuple[tuple[int, ...], ...]
    """Each engine's GPUs, by index (PCI bus order, as CUDA_VISIBLE_DEVICES names them)."""
    gpu: GpuFacts
    """The GPU the plan was made for: the one with the least memory free."""
    host: HostFacts
    """The host RAM one engine may offload to: its GPUs' share."""
    reasons: tuple[str, ...] = ()
    plugin_missing: str | None = None
    """Why the vLLM that runs cannot load lowvram's plugin (environment.py); None: it can."""

    @property
    def replicas(self) -> int:
        return len(self.groups)

    @property
    def tokens_per_s(self) -> float:
        """Estimated decode tokens/s of all engines together."""
        return self.plan.tokens_per_s * self.replicas

    def replan(self, settings: EngineSettings, model: ModelFacts, rung: int) -> Deployment:
        """The same split with each engine's plan one rung down (after a failed start)."""
        plan = plan_vllm(
            model,
            self.gpu,
            self.host,
            settings,
            rung=rung,
            tensor_parallel=self.plan.tensor_parallel,
            pipeline_parallel=self.plan.pipeline_parallel,
            plugin_missing=self.plugin_missing,
        )
        return replace(self, plan=plan)

    def explain(self) -> str:
        if self.replicas == 1 and len(self.groups[0]) == 1:
            return self.plan.explain()
        groups = " | ".join(",".join(str(i) for i in group) for group in self.groups)
        size = len(self.groups[0])
        shape = (
            f"one engine over {size} GPUs"
            if self.replicas == 1
            else f"{self.replicas} replicas, {size} GPU{'s' if size > 1 else ''} each"
        )
        lines = [
            f"deployment: {shape} (GPUs {groups}), ~{self.tokens_per_s:.0f} tokens/s in all "
            "(estimate)",
            "why:",
            *(f"  - {reason}" for reason in self.reasons),
            "",
            "each engine:",
            self.plan.explain(),
        ]
        return "\n".join(lines)


def gpus_to_use(hardware: Hardware, settings: EngineSettings) -> tuple[GpuFacts, ...]:
    """ENGINE_GPUS of the visible GPUs; by default all, or one per replica where a budget
    is given without a count (a budget usually means a card shared with something else)."""
    if settings.gpus is not None:
        count = settings.gpus
    elif settings.vram is not None:
        count = settings.replicas or 1
    else:
        count = len(hardware.gpus)
    if count > len(hardware.gpus) or not hardware.gpus:
        raise PlanError(
            f"{count} GPU(s) asked, {len(hardware.gpus)} visible "
            "(ENGINE_GPUS, ENGINE_REPLICAS; CUDA_VISIBLE_DEVICES narrows what is visible)"
        )
    return hardware.gpus[:count]


def plan_deployment(
    model: ModelFacts,
    hardware: Hardware,
    settings: EngineSettings,
    *,
    plugin_missing: str | None = None,
) -> Deployment:
    """`plugin_missing`: why the vLLM that will run cannot load lowvram's plugin (then the
    vocabulary stays on the GPU); None: it can."""
    gpus = gpus_to_use(hardware, settings)
    n = len(gpus)
    gpu = min(gpus, key=lambda g: (g.free_bytes, g.total_bytes))
    host = hardware.host
    if n > 1:
        # Offloaded layers of every GPU share the host's RAM.
        share = max(0, host.available_bytes - HOST_RESERVE) // n + HOST_RESERVE
        host = HostFacts(host.total_bytes, share)
    if settings.replicas is not None:
        if n % settings.replicas:
            raise PlanError(f"ENGINE_REPLICAS={settings.replicas} does not divide {n} GPUs evenly")
        sizes = [n // settings.replicas]
    else:
        sizes = [size for size in range(1, n + 1) if n % size == 0]

    planned: list[tuple[EnginePlan, int]] = []
    lines: list[str] = []
    refusal: PlanError | None = None
    for size in sizes:
        tp, pp, label = _split(model, size, n)
        try:
            plan = plan_vllm(
                model,
                gpu,
                host,
                settings,
                tensor_parallel=tp,
                pipeline_parallel=pp,
                plugin_missing=plugin_missing,
            )
        except PlanError as exc:
            refusal = exc
            lines.append(f"{label}: does not fit ({exc})")
            continue
        planned.append((plan, n // size))
        lines.append(
            f"{label}: ~{plan.tokens_per_s * (n // size):.0f} tokens/s in all, " + _gist(plan)
        )
    if not planned:
        assert refusal is not None
        raise refusal
    top = max(plan.tokens_per_s * replicas for plan, replicas in planned)
    plan, replicas = next(
        (p, r) for p, r in planned if p.tokens_per_s * r >= NEAR * top
    )  # sizes ascend: the first near the top has the most replicas
    size = n // replicas
    groups = tuple(tuple(g.index for g in gpus[i : i + size]) for i in range(0, n, size))
    reasons = [f"{n} GPU{'s' if n > 1 else ''} ({gpu.name}), {gib(plan.budget)} each"]
    if len(sizes) > 1:
        reasons += [*lines, _why(plan, replicas, planned)]
    elif n > 1:
        reasons += [*lines, f"ENGINE_REPLICAS={replicas} asks for this split"]
    return Deployment(plan, groups, gpu, host, tuple(reasons), plugin_missing)


def _split(model: ModelFacts, size: int, n: int) -> tuple[int, int, str]:
    """Tensor and pipeline sizes of a group of `size` GPUs, and how to say it."""
    replicas = f"{n // size} replicas" if n > size else "one engine"
    if size == 1:
        return 1, 1, f"{replicas} of one GPU"
    if model.tensor_parallel_problem(size) is None:
        return size, 1, f"{replicas} over {size} GPUs, tensor parallel"
    return 1, size, f"{replicas} over {size} GPUs, pipeline parallel"


def _gist(plan: EnginePlan) -> str:
    offload = (
        f"{plan.offloaded_layers} layers offloaded per GPU"
        if plan.offloaded_layers
        else "nothing offloaded"
    )
    return f"{plan.max_num_seqs} sequences per engine, {offload}, {plan.quantization or 'dtype'}"


def _why(plan: EnginePlan, replicas: int, planned: list[tuple[EnginePlan, int]]) -> str:
    ours = plan.tokens_per_s * replicas
    others = [(p, r) for p, r in planned if p is not plan]
    if not others:
        return "the only way that fits"
    best_other = max(others, key=lambda pr: pr[0].tokens_per_s * pr[1])
    ratio = ours / max(1e-9, best_other[0].tokens_per_s * best_other[1])
    if plan.gpus == 1:
        return (
            f"replicas: each GPU serves the whole model on its own, {ratio:.2f}x the "
            "tokens/s of splitting it, and a crash takes out one replica, not the service"
        )
    why = (
        f"splitting one engine over {plan.gpus} GPUs gives {ratio:.2f}x the tokens/s of the "
        "next best"
    )
    if any(p.gpus == 1 and p.offloaded_layers > plan.offloaded_layers for p, _ in others):
        why += ": each GPU holds more of its share, and offloaded weights cross every link at once"
    return why
