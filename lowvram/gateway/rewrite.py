"""Rewrite a client's request into the one the engine gets: validate, resolve, shim, fit.

Each step edits the client's own JSON object, never a re-serialised model, so fields we do
not know reach the engine untouched.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lowvram.engine.handle import ServedModel
from lowvram.gateway.errors import BadRequest, ModelNotFound, param_from_loc
from lowvram.gateway.exchange import Endpoint
from lowvram.gateway.keystore import KeyRecord
from lowvram.gateway.tokens import TokenCounter, upper_bound

Model = TypeVar("Model", bound=BaseModel)

# pydantic names union members in error locations ("str", "list[str]"); they are not fields.
_SCALAR_TAGS = {"str", "int", "float", "bool", "none"}

_HINTS = {
    "stop": "expected a string or a list of at most 16 strings",
    "prompt": "expected a string, a list of strings, or token ids",
    "input": "expected a string, a list of strings, or token ids",
    "tool_choice": 'expected "none", "auto", "required" or '
    '{"type": "function", "function": {"name": "..."}}',
}
_INSTANCE_OF = re.compile(r" or instance of \w+")


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(
            "We could not parse the JSON body of your request. Send a JSON object."
        ) from None
    except RecursionError:
        raise BadRequest("The JSON body of your request is nested too deeply.") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    if _SURROGATE_ESCAPE.search(raw):
        _refuse_lone_surrogates(body)
    return body


# A \uD800-\uDFFF escape: JSON allows one alone, UTF-8 (and every engine) does not.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(body: dict[str, Any]) -> None:
    """Only paired surrogates make text; a lone one cannot be sent on, or even echoed."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise BadRequest(
            "The request contains a lone UTF-16 surrogate escape (\\uD800-\\uDFFF without "
            "its pair), which is not text."
        ) from None
    except RecursionError:  # json.loads nests deeper than json.dumps can follow
        raise BadRequest("The JSON body of your request is nested too deeply.") from None


def validate(model: type[Model], body: dict[str, Any]) -> Model:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        loc = tuple(p for p in error["loc"] if not _is_union_tag(p))
        param = param_from_loc(loc)
        top = str(loc[0]) if loc else ""
        message = _INSTANCE_OF.sub("", error["msg"])  # our class names mean nothing to clients
        reason = _HINTS.get(top, message) if len(loc) == 1 else message
        if error["type"] == "missing":
            raise BadRequest(f"Missing required parameter: '{param}'.", param=param) from None
        raise BadRequest(f"Invalid value for '{param}': {reason}.", param=param) from None


def _is_union_tag(part: int | str) -> bool:
    return isinstance(part, str) and (part in _SCALAR_TAGS or "[" in part)


def resolve_model(
    requested: object,
    models: Sequence[ServedModel],
    aliases: dict[str, str],
    key: KeyRecord,
    *,
    ollama_names: bool = False,
) -> ServedModel:
    """The served model the client named; 404 for anything else (or one its key may not use).

    No model, or "default", means the default model (the first): examples and clients that
    must name one work whatever the engine serves. With `ollama_names` (Ollama's routes), a
    name:tag names a model too where its name holds both (qwen2.5:0.5b for
    qwen2.5-coder-0.5b-instruct; name:latest for name).
    """
    if requested is not None and not isinstance(requested, str):
        raise BadRequest("Invalid value for 'model': expected a string.", param="model")
    if requested in (None, "", "default"):
        chosen: ServedModel | None = models[0]
    else:
        target = aliases.get(requested, requested)
        chosen = next((m for m in models if m.id == target), None)
        if chosen is None and ollama_names:
            chosen = next((m for m in models if _ollama_name_of(target, m.id)), None)
    if chosen is None or not key_may_use(key, requested, chosen.id, chosen is models[0]):
        raise ModelNotFound(
            f"The model '{requested}' does not exist or you do not have access to it.",
            param="model",
        )
    return chosen


def _ollama_name_of(name: str, served: str) -> bool:
    base, _, tag = name.partition(":")
    served = served.lower()
    return (
        bool(base) and base.lower() in served and (tag in ("", "latest") or tag.lower() in served)
    )


def key_may_use(key: KeyRecord, name: str | None, served_id: str, default: bool = True) -> bool:
    """A key's model list may name the model, the alias asked for, or "default" (which is
    the default model)."""
    if key.models is None:
        return True
    names = {name, served_id} | ({"default"} if default else set())
    return bool(names & set(key.models))


def apply_shims(endpoint: Endpoint, body: dict[str, Any], served: ServedModel) -> None:
    """Where engines and clients disagree, speak the engine's dialect."""
    if endpoint is Endpoint.CHAT:
        _chat_shims(body, served)
    if body.get("seed") is not None and served.seed_needs_fresh_prompt:
        body.setdefault("cache_prompt", False)  # a seed is asked for to repeat the answer


def _chat_shims(body: dict[str, Any], served: ServedModel) -> None:
    messages = body["messages"]
    if any(m.get("role") == "developer" for m in messages):
        # Newer OpenAI clients send `developer`; most chat templates only know `system`.
        body["messages"] = [
            {**m, "role": "system"} if m.get("role") == "developer" else m for m in messages
        ]
    if body.get("max_completion_tokens") is not None:
        body["max_tokens"] = body.pop("max_completion_tokens")
    if "parallel_tool_calls" in body and not body.get("tools"):
        # LangChain sends it with no tools bound; engines reject that combination.
        del body["parallel_tool_calls"]
    choice = body.get("tool_choice")
    if body.get("tools") and (choice == "required" or isinstance(choice, dict)):
        # A forced call without parallel_tool_calls is one call: engines' grammars
        # otherwise let a model repeat calls until max_tokens (llama.cpp: 4 calls in 60
        # tokens, the last cut; 57 in 1,024). Send parallel_tool_calls: true for several.
        body.setdefault("parallel_tool_calls", False)
    if isinstance(choice, dict) and not served.named_tool_choice:
        _narrow_to_named_tool(body, choice)
    opener = served.tool_call_opener
    if body.get("tool_choice") == "required" and body.get("tools") and opener:
        if body["messages"][-1].get("role") != "assistant":
            # The engine continues a final assistant message: the call is opened for it.
            body["messages"] = [*body["messages"], {"role": "assistant", "content": opener}]
            if body.get("parallel_tool_calls") is False and served.tool_call_closer:
                # After a prefill llama.cpp's one-call grammar does not hold (a 0.5B then
                # called 7 cities until max_tokens): one call ends where it closes. Its
                # parser still takes the call without the closing tag.
                _add_stop(body, served.tool_call_closer)


def _add_stop(body: dict[str, Any], stop: str) -> None:
    asked = body.get("stop")
    stops = [asked] if isinstance(asked, str) else list(asked or [])
    if stop not in stops:
        body["stop"] = [*stops, stop]


def check_tool_history(body: dict[str, Any]) -> None:
    """Tool calls sent back in the history must carry JSON arguments: engines fail on
    anything else with a 500 (llama.cpp: "Failed to parse tool call arguments as JSON"),
    which is the client's mistake (a call cut by max_tokens, sent back as it was)."""
    for i, message in enumerate(body.get("messages") or ()):
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        for j, call in enumerate(calls if isinstance(calls, list) else ()):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            param = f"messages.[{i}].tool_calls.[{j}].function.arguments"
            if not isinstance(arguments, str):
                raise BadRequest(f"'{param}' must be a string of JSON.", param=param)
            try:
                json.loads(arguments or "{}")
            except ValueError:
                raise BadRequest(
                    f"'{param}' is not valid JSON (a call cut short by max_tokens?): "
                    f"{arguments[:80]!r}",
                    param=param,
                ) from None


def drop_cut_tool_calls(answer: dict[str, Any]) -> bool:
    """A call cut by max_tokens (finish_reason "length") is not a call: drop those whose
    arguments are not whole JSON, so that no client runs one. Whether any was dropped."""
    dropped = False
    for choice in answer.get("choices") or ():
        if not isinstance(choice, dict) or choice.get("finish_reason") != "length":
            continue
        message = choice.get("message")
        if not isinstance(message, dict) or not isinstance(message.get("tool_calls"), list):
            continue
        calls: list[Any] = message["tool_calls"]
        whole = [c for c in calls if _whole_arguments(c)]
        if len(whole) < len(calls):
            dropped = True
            if whole:
                message["tool_calls"] = whole
            else:
                del message["tool_calls"]
    return dropped


def _whole_arguments(call: object) -> bool:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    try:
        json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError:
        return False
    return isinstance(arguments, str)


def _narrow_to_named_tool(body: dict[str, Any], choice: dict[str, Any]) -> None:
    """`tool_choice: {"function": {"name": N}}` as `tools: [N]` + `required`: the same promise
    (call N), for engines that only know auto/none/required (llama.cpp's server)."""
    name = (choice.get("function") or {}).get("name")
    named = [t for t in body.get("tools") or () if (t.get("function") or {}).get("name") == name]
    if not named:
        raise BadRequest(
            f"tool_choice names the function {name!r}, which is not in 'tools'.",
            param="tool_choice",
        )
    body["tools"] = named
    body["tool_choice"] = "required"


def check_engine_can(endpoint: Endpoint, body: dict[str, Any], served: ServedModel) -> None:
    """Refuse, with a 400 naming the parameter, what this engine cannot serve, rather than
    let it fail with its internals (or silently do less, like fewer choices than `n`)."""
    n = body.get("n")
    if isinstance(n, int) and served.max_choices is not None and n > served.max_choices:
        raise BadRequest(
            f"This engine generates at most {served.max_choices} choices per request; 'n' was {n}.",
            param="n",
        )
    if endpoint is Endpoint.EMBEDDINGS and served.serves_embeddings is False:
        raise BadRequest(
            f"The model '{served.id}' is a text-generation model and does not serve embeddings.",
            param="model",
            code="model_not_supported",
        )
    if served.accepts_images is False:
        where = _first_image(body.get("messages") if endpoint is Endpoint.CHAT else None)
        if where is None and endpoint is Endpoint.RESPONSES:
            where = _first_image(body.get("input"), field="input")
        if where is not None:
            raise BadRequest(
                f"The model '{served.id}' reads text only: it cannot take the image in '{where}'.",
                param=where,
                code="image_input_not_supported",
            )


_IMAGE_PARTS = ("image_url", "input_image", "image")


def _first_image(items: object, field: str = "messages") -> str | None:
    """Where the first image content part is, as a param path: messages.[0].content.[1]."""
    if not isinstance(items, list):
        return None
    for i, item in enumerate(items):
        content = item.get("content") if isinstance(item, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
                return f"{field}.[{i}].content.[{j}]"
    return None


def ask_for_usage(body: dict[str, Any]) -> bool:
    """Make a stream end with a usage chunk; return whether the client asked for one."""
    options = body.get("stream_options") or {}
    wanted = bool(options.get("include_usage"))
    body["stream_options"] = {**options, "include_usage": True}
    return wanted


def check_stream_options(body: dict[str, Any]) -> None:
    if body.get("stream_options") is not None and not body.get("stream"):
        raise BadRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is true.",
            param="stream_options",
        )


async def fit_context(
    body: dict[str, Any],
    endpoint: Endpoint,
    served: ServedModel,
    counter: TokenCounter,
    default_max_tokens: int,
) -> int | None:
    """Cap the completion so prompt + completion fits the window; return the prompt count
    if one was taken.

    The engine counts only when a free upper bound on the prompt does not leave room. A
    prompt that alone fills the window is refused with both numbers, as OpenAI does.
    """
    field = endpoint.max_tokens_field
    wanted = body.get(field)
    max_tokens = wanted if isinstance(wanted, int) else default_max_tokens
    body[field] = max_tokens
    context = served.context_length
    if context is None:
        return None
    bound = upper_bound(endpoint, body)
    if bound + max_tokens <= context:
        return None
    prompt = body.get("prompt")
    if endpoint is Endpoint.COMPLETIONS and _token_ids(prompt):
        prompt_tokens: int | None = bound  # token ids count themselves: the bound is exact
    else:
        prompt_tokens = await counter.count_prompt(endpoint, body)
    if prompt_tokens is None:
        return None
    if prompt_tokens >= context:
        param = "messages" if endpoint is Endpoint.CHAT else "prompt"
        raise BadRequest(
            f"This model's maximum context length is {context} tokens. However, your"
            f" messages resulted in {prompt_tokens} tokens. Please reduce the length of the"
            " messages.",
            param=param,
            code="context_length_exceeded",
        )
    body[field] = min(max_tokens, context - prompt_tokens)
    return prompt_tokens


def _token_ids(prompt: object) -> bool:
    """A prompt of token ids, or a batch of them."""
    return isinstance(prompt, list) and bool(prompt) and not isinstance(prompt[0], str)
