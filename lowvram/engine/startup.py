"""An engine's start, phase by phase, from the lines it prints: what a slow or failed start
was doing when it stopped.

    timeline = Timeline(VLLM_PHASES)
    timeline.see(line)               # each line the engine prints
    timeline.phase                   # "loading weights", since timeline.since seconds
    str(timeline)                    # "spawned 0 s, engine 4 s, NCCL 9 s, weights 12-97 s, ..."

A vLLM start over several GPUs spawns a worker per GPU, sets up NCCL between them, loads
each one's share of the weights, profiles and captures graphs: a start that stops in one of
those says which, instead of "not ready after 900 s".
"""

from __future__ import annotations

import time
from collections.abc import Sequence

Phases = Sequence[tuple[str, str]]
"""(a substring of the line that begins it, the phase's name), in the order they come."""

VLLM_PHASES: Phases = (
    ("non-default args", "API server up"),
    ("Initializing a V1 LLM engine", "engine process started"),
    ("world_size=", "distributed group (NCCL) set up"),
    ("Starting to load model", "loading weights"),
    ("Loading weights took", "weights read"),
    ("Model loading took", "weights loaded"),
    ("GPU KV cache size", "KV cache allocated"),
    ("Capturing CUDA graph", "capturing CUDA graphs"),
    ("init engine (profile, create kv cache, warmup model) took", "warmed up"),
    ("Starting vLLM server on", "serving"),
)
LLAMACPP_PHASES: Phases = (
    ("load_model: loading model", "loading the model"),
    ("model loaded", "model loaded"),
    ("listening on", "serving"),
)


class Timeline:
    def __init__(self, phases: Phases) -> None:
        self._phases = phases
        self._started = time.monotonic()
        self.seen: list[tuple[float, str]] = [(0.0, "process spawned")]

    def see(self, line: str) -> None:
        for needle, phase in self._phases:
            if needle in line and phase not in (name for _, name in self.seen):
                self.seen.append((time.monotonic() - self._started, phase))
                return

    @property
    def phase(self) -> str:
        return self.seen[-1][1]

    @property
    def since(self) -> float:
        """When the current phase began, seconds after the spawn."""
        return self.seen[-1][0]

    def stopped_in(self) -> str:
        """Where a start that did not finish stopped."""
        elapsed = time.monotonic() - self._started
        return f"it stopped in '{self.phase}' (from {self.since:.0f} s of {elapsed:.0f} s; {self})"

    def __str__(self) -> str:
        return ", ".join(f"{name} {at:.0f} s" for at, name in self.seen)
