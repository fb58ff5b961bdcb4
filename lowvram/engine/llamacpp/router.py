"""Several GGUF models behind one llama.cpp server: its own router mode.

    ENGINE_MODELS=chat=Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf,coder=~/m/coder.gguf

llama-server started with `--models-preset FILE` and no model is a router: it starts one
server per model the first time a request names it (`"model": "coder"`), forwards requests
to it, and stops the least recently used one when `--models-max` are running. A request
for a model that is not loaded waits while it loads (a 0.5B: ~2 s on 2 cores); no
connection is reset. Each model is planned as if it ran alone (plan.py), and as many run
at once as the host's RAM holds (weights and KV caches), at least one.

A model whose file cannot be found is left out and said so on its own (the plan's
explanation, the ready line in the log); the others serve. Which models are loaded is the
router's to say (`GET /models`): the gateway shows it on /v1/models, /ready and /metrics
(gateway/model_states.py).
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lowvram.engine.backend import Launch
from lowvram.engine.errors import ModelError, PlanError
from lowvram.engine.handle import ServedModel
from lowvram.engine.hardware import Hardware, HostFacts
from lowvram.engine.llamacpp.backend import served_model
from lowvram.engine.llamacpp.build import Build, ensure_server
from lowvram.engine.llamacpp.fetch import resolve_gguf
from lowvram.engine.llamacpp.gguf import read_metadata
from lowvram.engine.llamacpp.plan import HOST_RESERVE, LlamaCppPlan, plan_llamacpp
from lowvram.engine.settings import EngineSettings
from lowvram.engine.startup import Phases
from lowvram.engine.units import gib

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RouterPlan:
    models: tuple[tuple[str, LlamaCppPlan], ...]
    """Each model by the name clients use, with its own plan; the default first."""
    loaded_at_once: int
    """llama.cpp's --models-max: how many run at once."""
    failed: tuple[tuple[str, str], ...] = ()
    """Models left out, and why."""

    def presets(self) -> str:
        """The --models-preset file: a section per model, with its plan's arguments."""
        lines = ["version = 1", "", "[*]", "jinja = true", ""]
        for name, plan in self.models:
            lines += [
                f"[{name}]",
                f"model = {plan.model.path}",
                f"parallel = {plan.parallel}",
                "kv-unified = true",
                f"ctx-size = {plan.context * plan.parallel}",
                f"kv-unified-per-slot = {plan.context}",
                f"threads = {plan.threads}",
                f"threads-batch = {plan.threads}",
                "",
            ]
        return "\n".join(lines)

    def to_argv(self, presets: Path) -> list[str]:
        return [
            *("--models-preset", str(presets)),
            *("--models-max", str(self.loaded_at_once)),
            "--no-webui",
        ]

    def explain(self) -> str:
        names = ", ".join(name for name, _ in self.models)
        lines = [
            f"llama.cpp router: {len(self.models)} models ({names}), "
            f"{self.loaded_at_once} loaded at once (the least recently used stops first)"
        ]
        for name, plan in self.models:
            lines.append(f"  {name}: " + plan.explain().replace("\n", "\n  "))
        lines += [f"  - {name} left out: {why}" for name, why in self.failed]
        return "\n".join(lines)


def plan_router(settings: EngineSettings, host: HostFacts) -> RouterPlan:
    """Resolve and plan every model of ENGINE_MODELS; refuse only if none can run."""
    planned: list[tuple[str, LlamaCppPlan]] = []
    failed: list[tuple[str, str]] = []
    for name, source in settings.models.items():
        try:
            resolved = resolve_gguf(source, settings.models_dir)
            plan = plan_llamacpp(resolved, read_metadata(resolved.path), settings, host)
        except (ModelError, PlanError) as exc:
            logger.warning("model %s cannot be served: %s", name, exc)
            failed.append((name, str(exc)))
            continue
        planned.append((name, plan))
    if not planned:
        raise PlanError(
            "no model of ENGINE_MODELS can be served: "
            + "; ".join(f"{name}: {why}" for name, why in failed)
        )
    loaded = min(settings.models_loaded or loaded_at_once(planned, host), len(planned))
    return RouterPlan(tuple(planned), loaded, tuple(failed))


def loaded_at_once(planned: list[tuple[str, LlamaCppPlan]], host: HostFacts) -> int:
    """How many models fit in RAM at once, the largest first (so that any set of that many
    does), and at least one."""
    costs = sorted(
        (plan.model.path.stat().st_size + plan.kv_bytes for _, plan in planned), reverse=True
    )
    room, fits = host.available_bytes - HOST_RESERVE, 0
    for cost in costs:
        if cost > room:
            break
        room -= cost
        fits += 1
    if fits < len(costs):
        logger.info(
            "%d of %d models fit in RAM at once (%s available)",
            max(1, fits),
            len(costs),
            gib(host.available_bytes),
        )
    return max(1, fits)


class LlamaCppRouterBackend:
    """The Backend (engine/backend.py) of a llama.cpp router serving ENGINE_MODELS."""

    name = "llamacpp"
    health_path = "/health"
    phases: Phases = (("listening on", "serving"),)

    def __init__(
        self, plan: RouterPlan, settings: EngineSettings, server: Build | Sequence[str]
    ) -> None:
        self.plan = plan
        self.settings = settings
        self._server = server
        self._extra_args = shlex.split(settings.extra_args)
        self.presets_file = settings.log_file.with_name("llamacpp-models.ini")

    @classmethod
    def from_settings(cls, settings: EngineSettings, hardware: Hardware) -> LlamaCppRouterBackend:
        plan = plan_router(settings, hardware.host)  # the models first: a bad name fails fast
        server = shlex.split(settings.command) if settings.command else ensure_server()
        return cls(plan, settings, server)

    def launch(self, port: int, api_key: str) -> Launch:
        self.presets_file.parent.mkdir(parents=True, exist_ok=True)
        self.presets_file.write_text(self.plan.presets())
        server = self._server
        command = [str(server.binary)] if isinstance(server, Build) else list(server)
        argv = [*command, *self.plan.to_argv(self.presets_file)]
        argv += ["--host", "127.0.0.1", "--port", str(port), *self._extra_args]
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LLAMA_ARG_")}
        env["LLAMA_API_KEY"] = api_key  # the router's, and each model's it starts
        return Launch(argv, env, self.plan.explain())

    def served_models(self) -> tuple[ServedModel, ...]:
        return tuple(served_model(name, plan) for name, plan in self.plan.models)

    def observe(self, line: str) -> None:
        return None  # each model's server starts later, on its first request

    def failure(self, tail: Sequence[str]) -> str | None:
        return None

    def step_down(self, failure: str) -> str | None:
        return None

    def verify(self) -> list[str]:
        return []

    def report(self) -> str:
        names = ", ".join(name for name, _ in self.plan.models)
        left_out = "".join(f"; {name} left out: {why}" for name, why in self.plan.failed)
        return (
            f"llama.cpp router ready: {names} ({self.plan.loaded_at_once} loaded at once)"
            + left_out
        )
