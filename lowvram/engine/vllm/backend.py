"""vLLM's own OpenAI server (the AsyncLLM engine), run from a plan on its GPUs.

One backend is one engine: on one GPU, or split over a group of them (vLLM's tensor or
pipeline parallelism, its own worker processes). Replicas are several backends, each with
its group (engine/factory.py).
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Callable, Sequence

from pydantic import ByteSize

from lowvram.engine.backend import Launch
from lowvram.engine.errors import PlanError, SetupError
from lowvram.engine.handle import ModelDetails, ServedModel
from lowvram.engine.hardware import Hardware, detect_gpus, devices_by_index, gpu_memory_used
from lowvram.engine.settings import EngineSettings
from lowvram.engine.startup import VLLM_PHASES
from lowvram.engine.units import GiB, gib
from lowvram.engine.vllm import plugin
from lowvram.engine.vllm.deployment import Deployment, plan_deployment
from lowvram.engine.vllm.model import ModelFacts
from lowvram.engine.vllm.plan import EnginePlan
from lowvram.engine.vllm.sleep import SLEEP_ENV, SharedGpu, sleep_args

SERVER_MODULE = "vllm.entrypoints.openai.api_server"

# Start-up failures we know how to answer by re-planning one rung down.
FAILURES: dict[str, tuple[str, ...]] = {
    "out_of_memory": ("CUDA out of memory", "OutOfMemoryError", "CUDA error: out of memory"),
    "kv_cache_too_small": (
        "No available memory for the cache blocks",
        "larger than the available KV cache memory",
    ),
    "gpu_busy": ("is less than desired GPU memory utilization",),
}

_OFFLOADED = re.compile(r"Total CPU offloaded parameters: ([0-9.]+)")
_VOCAB_MOVED = re.compile(re.escape(plugin.MARK) + r" (embed|lm_head): ([0-9.]+) GiB")
_LOADED = re.compile(r"Model loading took ([0-9.]+) GiB")
_KV_TOKENS = re.compile(r"GPU KV cache size: ([0-9,]+) tokens")


def _free_now(indices: Sequence[int]) -> int | None:
    """The least memory free now on any of these GPUs."""
    free = [gpu.free_bytes for gpu in detect_gpus() if gpu.index in indices]
    return min(free) if free else None


class VllmBackend:
    name = "vllm"
    health_path = "/health"
    phases = VLLM_PHASES

    def __init__(
        self,
        model: ModelFacts,
        hardware: Hardware,
        settings: EngineSettings,
        *,
        deployment: Deployment | None = None,
        replica: int = 0,
        detect_free: Callable[[Sequence[int]], int | None] = _free_now,
        measure_vram: Callable[[int], int | None] = gpu_memory_used,
        shared: SharedGpu | None = None,
    ) -> None:
        """`shared`: one engine of several on one GPU (vllm/several.py)."""
        if hardware.gpu is None:
            raise SetupError("vLLM needs an NVIDIA GPU and none was found")
        self._model = model
        self.settings = settings
        command = shlex.split(settings.command) if settings.command else None
        self._command = command or [sys.executable, "-m", SERVER_MODULE]
        self._extra_args = shlex.split(settings.extra_args)
        self._detect_free = detect_free
        self._measure_vram = measure_vram
        self.shared = shared
        self.deployment = deployment or plan_deployment(model, hardware, settings)
        if self.deployment.replicas > 1 and not devices_by_index():
            raise SetupError(
                "replicas need CUDA_VISIBLE_DEVICES as GPU indices (e.g. 0,1), not UUIDs"
            )
        self.gpus = self.deployment.groups[replica]
        """This engine's GPUs, by index."""
        self.observed: dict[str, float] = {}
        self.plugin_said: list[str] = []
        """The plugin's warnings: what it could not move, and why."""
        self.vram_used: dict[int, int] = {}
        """Bytes in use on each of its GPUs once ready (nvidia-smi's figure)."""

    @property
    def plan(self) -> EnginePlan:
        """This engine's plan (re-planned one rung down after a failed start)."""
        return self.deployment.plan

    def launch(self, port: int, api_key: str) -> Launch:
        self.observed = {}
        self.plugin_said = []
        argv = [
            *self._command,
            *self.plan.to_argv(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--disable-uvicorn-access-log",
            *(sleep_args(self.shared.served_name) if self.shared else []),
            *self._extra_args,
        ]
        # The key goes in the environment: a command line is visible to every local user.
        env: dict[str, str | None] = {**self.plan.to_env(), "VLLM_API_KEY": api_key}
        if self.shared:
            env |= SLEEP_ENV
        if devices_by_index():
            # Its GPUs, numbered as NVML and nvidia-smi number them (the planner's numbers).
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in self.gpus)
        return Launch(argv, env, self.deployment.explain())

    def served_models(self) -> tuple[ServedModel, ...]:
        return (self.served_model(),)

    def served_model(self) -> ServedModel:
        return ServedModel(
            id=self.shared.served_name if self.shared else self.plan.served_name,
            context_length=self.plan.max_model_len,
            max_batch=self.plan.max_num_seqs,
            tokenizer="vllm",
            serves_embeddings=False,  # a generating model: vLLM runs it as such
            details=ModelDetails(
                format="safetensors",
                family=self._model.architecture,
                size_bytes=self._model.checkpoint_bytes,
                parameter_size=f"{self._model.total_params / 1e9:.1f}B",
                quantization=self.plan.quantization or self._model.dtype,
            ),
        )

    def observe(self, line: str) -> None:
        if plugin.MARK in line or plugin.UNCHANGED in line:
            if match := _VOCAB_MOVED.search(line):
                self.observed[f"{match.group(1)}_gib"] = float(match.group(2))
            else:
                self.plugin_said.append(line[line.index("lowvram plugin") :].strip())
            return
        for key, pattern in (
            ("offloaded_gib", _OFFLOADED),
            ("weights_gib", _LOADED),
            ("kv_tokens", _KV_TOKENS),
        ):
            if match := pattern.search(line):
                self.observed[key] = float(match.group(1).replace(",", ""))

    def failure(self, tail: Sequence[str]) -> str | None:
        text = "\n".join(tail)
        for kind, needles in FAILURES.items():
            if any(needle in text for needle in needles):
                return kind
        return None

    def step_down(self, failure: str) -> str | None:
        settings, rung = self.settings, self.plan.rung + 1
        if failure == "gpu_busy":
            free = self._detect_free(self.gpus)
            if free is not None and (settings.vram is None or free < settings.vram):
                # Something else holds part of a card: plan for what is free now.
                settings = settings.model_copy(update={"vram": ByteSize(int(free * 0.95))})
        try:
            deployment = self.deployment.replan(settings, self._model, rung)
        except PlanError:
            return None
        before, plan = self.plan, deployment.plan
        self.settings, self.deployment = settings, deployment
        return (
            f"rung {rung}: {plan.offloaded_layers} layers offloaded "
            f"(was {before.offloaded_layers}), "
            f"KV {plan.kv_cache_tokens:,} tokens (was {before.kv_cache_tokens:,}), "
            f"{plan.max_num_batched_tokens} batched tokens (was {before.max_num_batched_tokens})"
        )

    def verify(self) -> list[str]:
        problems = self._verify_vocab()
        planned = self.plan.offload_budget / GiB
        offloaded = self.observed.get("offloaded_gib")
        if planned and offloaded is None:
            problems.append(
                f"offload of {planned:.2f} GiB was planned but vLLM never logged "
                "'Total CPU offloaded parameters' (VLLM_USE_V2_MODEL_RUNNER=0 ignored?)"
            )
        elif (
            planned
            and offloaded is not None
            and abs(offloaded - planned) > max(0.05, planned * 0.05)
        ):
            problems.append(f"vLLM offloaded {offloaded:.2f} GiB, the plan {planned:.2f} GiB")
        elif not planned and offloaded:
            problems.append(f"vLLM offloaded {offloaded:.2f} GiB though the plan offloads nothing")
        kv_tokens = self.observed.get("kv_tokens")
        if kv_tokens is not None and kv_tokens < self.plan.max_model_len:
            problems.append(
                f"vLLM's KV cache holds {kv_tokens:,.0f} tokens, less than one "
                f"{self.plan.max_model_len}-token sequence"
            )
        self.vram_used = {
            index: used for index in self.gpus if (used := self._measure_vram(index)) is not None
        }
        allowed = self.plan.budget + (self.shared.others_bytes if self.shared else 0)
        over = {i: used for i, used in self.vram_used.items() if used > allowed}
        if over:
            problems.append(
                "over the budget of "
                + gib(allowed)
                + ": "
                + ", ".join(f"GPU {i} uses {gib(used)}" for i, used in over.items())
                + " (lower ENGINE_VRAM to leave more room)"
            )
        return problems

    def _verify_vocab(self) -> list[str]:
        """Each vocabulary tensor the plan moves, moved by the plugin, and no more."""
        problems = []
        sizes = {
            "embed": self.plan.embedding_offload_bytes,
            "lm_head": self.plan.lm_head_offload_bytes,
        }
        for kind in self.plan.vocab_modules:
            planned = sizes[kind] / GiB
            moved = self.observed.get(f"{kind}_gib")
            if moved is None:
                said = (
                    f": it said '{self.plugin_said[0]}'"
                    if self.plugin_said
                    else (
                        " (is lowvram installed where vLLM runs? ENGINE_OFFLOAD_VOCAB=none plans "
                        "without it)"
                    )
                )
                problems.append(
                    f"the plan puts the {kind} ({planned:.2f} GiB) in host memory, but lowvram's "
                    f"vLLM plugin did not move it{said}"
                )
            elif abs(moved - planned) > max(0.05, planned * 0.05):
                problems.append(
                    f"the plugin moved {moved:.2f} GiB of {kind}, the plan {planned:.2f}"
                )
        weights = self.observed.get("weights_gib")
        expected = self.plan.estimate.weights / GiB
        if weights is not None and weights > expected + max(0.5, 0.25 * expected):
            problems.append(
                f"vLLM's weights take {weights:.2f} GiB on the GPU ('Model loading took'), the "
                f"plan {expected:.2f} GiB: less was offloaded than planned"
            )
        return problems

    def report(self) -> str:
        est = self.plan.estimate
        weights, kv_tokens = (
            self.observed.get("weights_gib", 0.0),
            self.observed.get("kv_tokens", 0),
        )
        parts = [
            f"weights {weights:.2f} GiB (est {est.weights / GiB:.2f})",
            f"KV {kv_tokens:,.0f} tokens (plan {self.plan.kv_cache_tokens:,})",
        ]
        if self.plan.offload_budget:
            parts.append(
                f"offloaded {self.observed.get('offloaded_gib', 0):.2f} GiB "
                f"(plan {self.plan.offload_budget / GiB:.2f})"
            )
        for kind in self.plan.vocab_modules:
            parts.append(f"{kind} {self.observed.get(f'{kind}_gib', 0):.2f} GiB on the host")
        if self.vram_used:
            split = len(self.gpus) > 1
            used = ", ".join(
                f"GPU {i} {gib(b)}" if split else gib(b) for i, b in self.vram_used.items()
            )
            each = " each" if split else ""
            parts.append(
                f"VRAM {used} (est {gib(est.total)}, budget {gib(self.plan.budget)}{each})"
            )
        return "vLLM ready: " + ", ".join(parts)
