"""Every error the engine side raises, under one base that the CLI prints as one line.

    EngineError          the engine cannot be set up or run as asked
    ├── SetupError       the settings or this machine rule out what was asked
    ├── ModelError       a model could not be found, fetched, read or verified
    │   └── GgufError    not a GGUF file, or one this reader does not understand
    ├── PlanError        no configuration fits the budget; the message names the floor
    ├── BuildError       llama.cpp's server could not be built
    └── ProbeError       a running server did not answer like an OpenAI-compatible one

Every message says what went wrong and, where there is one, what to change.
"""

from __future__ import annotations


class EngineError(Exception):
    """The engine cannot be set up or run as asked."""


class SetupError(EngineError):
    """The settings or this machine rule out what was asked."""


class ModelError(EngineError):
    """A model could not be found, fetched, read or verified."""


class GgufError(ModelError):
    """Not a GGUF file, or one this reader does not understand."""


class PlanError(EngineError):
    """No configuration fits; the message names the floor and what was tried."""


class BuildError(EngineError):
    """llama.cpp's server could not be built."""


class ProbeError(EngineError):
    """The server did not answer like an OpenAI-compatible server that is ready."""
