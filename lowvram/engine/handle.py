"""The seam between the gateway and whatever engine serves the model.

The gateway asks an `EngineHandle` for three things per request: where to send it
(`base_url`, `api_key`), whether it may (`state`), and what the model allows (`model`).
It never cares whether the engine is a process we supervise or a server someone else runs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

TokenizerStyle = Literal["vllm", "llamacpp"]


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ServedModel:
    """What the gateway needs to know about the served model."""

    id: str
    """The name the engine serves it under (sent upstream as `model`)."""
    context_length: int | None = None
    """Prompt plus completion tokens per sequence; None: unknown, no fitting."""
    max_batch: int | None = None
    """Sequences the engine runs at once; the gateway's default in-flight bound."""
    tokenizer: TokenizerStyle | None = None
    """Which tokenize endpoint the engine has, for counting prompt tokens."""
    stream_usage: bool = True
    """Whether the engine honours `stream_options.include_usage`."""
    chat_template: str | None = field(default=None, repr=False)
    """The model's Jinja chat template, for counting prompts where the engine cannot."""


StateListener = Callable[[EngineState], None]


class EngineHandle(Protocol):
    @property
    def base_url(self) -> str:
        """Root URL of the engine's OpenAI server, without the trailing /v1."""
        ...

    @property
    def api_key(self) -> str | None: ...

    @property
    def state(self) -> EngineState: ...

    @property
    def model(self) -> ServedModel | None: ...

    @property
    def detail(self) -> str:
        """A line for logs and operators: why it is in this state."""
        ...

    def add_listener(self, listener: StateListener) -> None:
        """Call `listener` on every state change (from the event loop's thread)."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class StateMixin:
    """State bookkeeping shared by the handles: one place that notifies listeners."""

    def __init__(self) -> None:
        self._state = EngineState.STARTING
        self._detail = ""
        self._listeners: list[StateListener] = []

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def detail(self) -> str:
        return self._detail

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def _set_state(self, state: EngineState, detail: str = "") -> None:
        changed = state is not self._state
        self._state, self._detail = state, detail
        if changed:
            for listener in self._listeners:
                listener(state)
