"""What the supervisor needs from an engine backend (vLLM, llama.cpp)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lowvram.engine.handle import ServedModel
from lowvram.engine.startup import Phases


@dataclass(frozen=True)
class Launch:
    """How to start the engine once: its command line, extra environment, and why."""

    argv: list[str]
    env: dict[str, str | None] = field(default_factory=dict)
    """Added to the gateway's environment; None removes a variable."""
    description: str = ""


class Backend(Protocol):
    name: str
    """Short name for logs: "vllm", "llamacpp"."""
    health_path: str
    """GET path that answers 200 once the engine serves (sent with the internal key)."""
    phases: Phases
    """The start's phases, by the lines that begin them (startup.py)."""

    def launch(self, port: int, api_key: str) -> Launch:
        """The command for one start on 127.0.0.1:`port`; the key travels in the environment."""
        ...

    def served_models(self) -> tuple[ServedModel, ...]:
        """What the engine serves once ready, the default model first."""
        ...

    def observe(self, line: str) -> None:
        """Read one line of the engine's output (for verification and reports)."""
        ...

    def failure(self, tail: Sequence[str]) -> str | None:
        """Name the known start-up failure in the last lines of output, if any."""
        ...

    def step_down(self, failure: str) -> str | None:
        """Re-plan one rung down after `failure`; describe the change, or None if out of rungs."""
        ...

    def verify(self) -> list[str]:
        """Once ready: where the running engine does not match the plan (each is fatal)."""
        ...

    def report(self) -> str:
        """Once ready: what was observed next to what was planned, one line."""
        ...
