"""llama.cpp's own server (`llama-server`): the CPU engine for GGUF models.

It runs with `--jinja`, the model's own chat template from the GGUF, so tool calls,
`response_format` JSON schemas (as grammars), reasoning and content parts are the
server's work, not the gateway's. Its key travels in the environment (`LLAMA_API_KEY`);
every other `LLAMA_ARG_*` variable is cleared so that the plan alone decides.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from dataclasses import replace

from lowvram.engine.backend import Launch
from lowvram.engine.handle import ServedModel
from lowvram.engine.hardware import Hardware
from lowvram.engine.llamacpp.build import Build, ensure_server
from lowvram.engine.llamacpp.fetch import resolve_gguf
from lowvram.engine.llamacpp.gguf import read_metadata
from lowvram.engine.llamacpp.plan import MIN_CONTEXT, LlamaCppPlan, plan_llamacpp
from lowvram.engine.settings import EngineSettings
from lowvram.engine.startup import LLAMACPP_PHASES

FAILURES = {
    "out_of_memory": ("failed to allocate", "out of memory", "unable to allocate"),
}
_SLOTS = re.compile(r"n_slots = (\d+), n_ctx_slot = (\d+)")


def served_model(name: str, plan: LlamaCppPlan) -> ServedModel:
    """What the gateway needs to know of a model llama-server runs with this plan."""
    return ServedModel(
        id=name,
        context_length=plan.context,
        max_batch=plan.parallel,
        tokenizer="llamacpp",
        max_choices=plan.parallel,
        accepts_images=False,  # no multimodal projector is loaded
        serves_embeddings=False,  # a chat model, started without --embeddings
        named_tool_choice=False,
        seed_needs_fresh_prompt=True,
        tool_call_opener=plan.tool_call_opener,
        tool_call_closer=plan.tool_call_closer,
        details=plan.details,
    )


class LlamaCppBackend:
    name = "llamacpp"
    health_path = "/health"
    phases = LLAMACPP_PHASES

    def __init__(
        self, plan: LlamaCppPlan, settings: EngineSettings, server: Build | Sequence[str]
    ) -> None:
        self.plan = plan
        self._server = server
        self._extra_args = shlex.split(settings.extra_args)
        self.observed: dict[str, int] = {}

    @classmethod
    def from_settings(
        cls, settings: EngineSettings, hardware: Hardware, replicas: int = 1
    ) -> list[LlamaCppBackend]:
        """Fetch the model if need be, build llama.cpp's server if need be, and plan one
        backend per replica (each its own server process). The model first: a wrong name
        fails in a second, not after an eight-minute build."""
        model = resolve_gguf(settings.model, settings.models_dir)
        server = shlex.split(settings.command) if settings.command else ensure_server()
        metadata = read_metadata(model.path)
        plan = plan_llamacpp(model, metadata, settings, hardware.host, replicas)
        return [cls(plan, settings, server) for _ in range(replicas)]

    def launch(self, port: int, api_key: str) -> Launch:
        self.observed = {}
        server = self._server
        command = [str(server.binary)] if isinstance(server, Build) else list(server)
        argv = [*command, *self.plan.to_argv(), "--host", "127.0.0.1", "--port", str(port)]
        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("LLAMA_ARG_")}
        env["LLAMA_API_KEY"] = api_key
        return Launch([*argv, *self._extra_args], env, self.plan.explain())

    def served_models(self) -> tuple[ServedModel, ...]:
        return (self.served_model(),)

    def served_model(self) -> ServedModel:
        return served_model(self.plan.model.served_name, self.plan)

    def observe(self, line: str) -> None:
        if match := _SLOTS.search(line):
            self.observed["slots"] = int(match.group(1))
            self.observed["n_ctx_slot"] = int(match.group(2))

    def failure(self, tail: Sequence[str]) -> str | None:
        text = "\n".join(tail).lower()
        for kind, needles in FAILURES.items():
            if any(needle in text for needle in needles):
                return kind
        return None

    def step_down(self, failure: str) -> str | None:
        plan = self.plan
        if plan.parallel > 1:
            self.plan = replace(plan, parallel=plan.parallel // 2)
            return f"{self.plan.parallel} sequences (was {plan.parallel})"
        if plan.context > MIN_CONTEXT:
            self.plan = replace(plan, context=max(MIN_CONTEXT, plan.context // 2))
            return f"context {self.plan.context} (was {plan.context})"
        return None

    def verify(self) -> list[str]:
        problems = []
        slots, n_ctx = self.observed.get("slots"), self.observed.get("n_ctx_slot")
        if slots is not None and slots != self.plan.parallel:
            problems.append(f"llama.cpp runs {slots} sequences, the plan {self.plan.parallel}")
        if n_ctx is not None and n_ctx < self.plan.context:
            problems.append(f"llama.cpp runs a {n_ctx}-token context, the plan {self.plan.context}")
        return problems

    def report(self) -> str:
        return (
            f"llama.cpp ready: {self.plan.model.served_name}, {self.plan.parallel} sequences x "
            f"{self.plan.context} tokens, {self.plan.threads} threads"
        )
