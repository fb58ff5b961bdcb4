"""The request fields the gateway acts on, validated; everything else passes through untouched.

These models only check. The forwarded body is the client's own JSON object with the
shims of `shaping.py` applied, so engine-specific fields (vLLM's `top_k`, `ignore_eos`,
`guided_json`, ...) and number formats reach the engine exactly as sent.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

Role = Literal["system", "user", "assistant", "tool", "developer", "function"]


class _Passthrough(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Passthrough):
    include_usage: StrictBool | None = None


class ChatMessage(_Passthrough):
    role: Role
    content: StrictStr | list[dict[str, Any]] | None = None


class FunctionName(_Passthrough):
    name: StrictStr = Field(min_length=1)


class Tool(_Passthrough):
    """A tool a chat request offers: a function with a name (its schema passes through)."""

    type: Literal["function"] = "function"
    function: FunctionName


class NamedToolChoice(_Passthrough):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class _Sampling(_Passthrough):
    model: StrictStr | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: StrictInt | None = Field(None, ge=1, le=128)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None


class CompletionRequest(_Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class ResponsesRequest(_Passthrough):
    """The Responses API (`/v1/responses`): `input` is a string or a list of items."""

    model: StrictStr | None = None
    input: StrictStr | list[dict[str, Any]]
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: StrictBool | None = None
    instructions: StrictStr | None = None
    tools: list[dict[str, Any]] | None = None


class EmbeddingRequest(_Passthrough):
    model: StrictStr | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
