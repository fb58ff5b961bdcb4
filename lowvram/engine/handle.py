"""The seam between the gateway and whatever engine serves the model.

The gateway asks an `EngineHandle` for three things per request: where to send it
(`base_url`, `api_key`), whether it may (`state`), and what the model allows (`model`).
It never cares whether the engine is a process we supervise or a server someone else runs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

TokenizerStyle = Literal["vllm", "llamacpp"]
"""vLLM: `POST /tokenize` counts messages or a prompt. llama.cpp's server: `POST /tokenize`
tokenizes text, `POST /v1/chat/completions/input_tokens` counts a chat request."""


class EngineState(enum.StrEnum):
    STARTING = "starting"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    STOPPED = "stopped"


@dataclass(frozen=True)
class ModelDetails:
    """What a model is, as Ollama's /api/tags and /api/show say it (managed engines know)."""

    format: str
    """gguf (llama.cpp) or safetensors (vLLM)."""
    family: str
    """The architecture: qwen2, llama, ..."""
    size_bytes: int | None = None
    parameter_size: str | None = None
    """As the model's card says it: 0.5B, 7.6B."""
    quantization: str | None = None
    """Q4_K_M, awq, bitsandbytes, bf16."""


@dataclass(frozen=True)
class ServedModel:
    """What the gateway needs to know about the served model and the engine serving it.

    None means unknown (an engine someone else runs): the gateway then passes the request
    on and lets the engine answer.
    """

    id: str
    """The name the engine serves it under (sent upstream as `model`)."""
    context_length: int | None = None
    """Prompt plus completion tokens per sequence; None: unknown, no fitting."""
    max_batch: int | None = None
    """Sequences the engine runs at once; the gateway's default in-flight bound."""
    tokenizer: TokenizerStyle | None = None
    """Which tokenize endpoints the engine has, for counting prompt tokens."""
    max_choices: int | None = None
    """The most choices (`n`) one request may ask for."""
    accepts_images: bool | None = None
    """Whether image content parts reach a model that can see them."""
    serves_embeddings: bool | None = None
    """Whether `/v1/embeddings` is served."""
    seed_needs_fresh_prompt: bool = False
    """Whether a seeded request repeats only with its prompt recomputed: llama.cpp's
    prompt cache changes the last logits slightly (batched vs. not), enough to change what
    a seed samples; the gateway then sends `cache_prompt: false` with a `seed`."""
    named_tool_choice: bool = True
    """Whether `tool_choice: {"type": "function", ...}` is honoured (else the gateway
    narrows `tools` to the named one and asks for `required`, which means the same)."""
    details: ModelDetails | None = None
    """Format, family, size: for Ollama's model listing; None where unknown."""
    tool_call_opener: str | None = None
    """What the model writes to open a tool call (`<tool_call>\n` in Qwen's and Hermes'
    templates), where the engine lets a model write text before a required call (llama.cpp
    does): the gateway prefills it, so that the call comes first, as `required` promises."""
    tool_call_closer: str | None = None
    """What closes that call (`</tool_call>`): a forced single call stops there, since the
    engine's one-call grammar does not hold once the opener is prefilled."""


StateListener = Callable[[EngineState], None]

_REASONS = {
    EngineState.STARTING: "the engine is starting",
    EngineState.READY: "",
    EngineState.RESTARTING: "the engine stopped and is restarting",
    EngineState.FAILED: "the engine failed and the gateway gave up on it",
    EngineState.STOPPED: "the gateway is shutting down",
}


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
    def model(self) -> ServedModel | None:
        """The default model (the first it serves); None while not ready."""
        ...

    @property
    def models(self) -> tuple[ServedModel, ...]:
        """Every model it serves, the default first; none while not ready."""
        ...

    @property
    def detail(self) -> str:
        """A line for logs and operators: why it is in this state (may name paths)."""
        ...

    @property
    def reason(self) -> str:
        """Why it is not serving, said to clients and on /ready: no paths, no internals."""
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
        self._reason = "the engine is starting"
        self._listeners: list[StateListener] = []

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def detail(self) -> str:
        return self._detail

    @property
    def reason(self) -> str:
        return self._reason

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def _set_state(self, state: EngineState, detail: str = "", reason: str | None = None) -> None:
        """`reason` (for clients) defaults to the state's plain meaning."""
        changed = state is not self._state
        self._state, self._detail = state, detail
        self._reason = reason or _REASONS[state]
        if changed:
            self._notify()

    def _notify(self) -> None:
        """Tell the listeners the state, also where it stays but what it means changed."""
        for listener in self._listeners:
            listener(self._state)
