"""Which tool-call and reasoning parsers vLLM needs for a model.

Without `--enable-auto-tool-choice --tool-call-parser P`, vLLM refuses `tool_choice="auto"`;
without `--reasoning-parser R`, a reasoning model's thinking lands in `content`. The parser
follows the model family (config.json's `model_type`, and the name for distills) and what
its chat template can do (a template that never mentions tools cannot render them):

    Qwen2.5, Qwen3 (and their MoE)   hermes          Qwen3: reasoning qwen3
    Llama 3.x                        llama3_json
    Mistral                          mistral
    DeepSeek-R1 distills             -               reasoning deepseek_r1

Where the template shows how calls are written, it decides over the family: a Llama-shaped
fine-tune with a Hermes-style template (`<tool_call>`) needs hermes (vLLM's llama3_json
parser fails every request when the tokenizer has no `<|python_tag|>`).

`ENGINE_TOOL_PARSER` and `ENGINE_REASONING_PARSER` override the choice ("none" turns one off).
"""

from __future__ import annotations

from dataclasses import dataclass

from lowvram.engine.vllm.model import ModelFacts

TEMPLATE_MARKERS = {
    "<tool_call>": "hermes",
    "<|python_tag|>": "llama3_json",
    "[TOOL_CALLS]": "mistral",
}

TOOL_PARSERS = {
    "qwen2": "hermes",
    "qwen2_moe": "hermes",
    "qwen3": "hermes",
    "qwen3_moe": "hermes",
    "llama": "llama3_json",
    "mistral": "mistral",
    "granite": "granite",
}


@dataclass(frozen=True)
class Parsers:
    tool: str | None
    reasoning: str | None
    reasons: tuple[str, ...]


def choose_parsers(
    model: ModelFacts, tool_setting: str | None = None, reasoning_setting: str | None = None
) -> Parsers:
    template = model.chat_template
    name = model.name.lower()
    reasons = []
    tool = TOOL_PARSERS.get(model.architecture)
    marked = [parser for mark, parser in TEMPLATE_MARKERS.items() if template and mark in template]
    if marked:
        tool = marked[0]
    if tool_setting is not None:
        tool = None if tool_setting == "none" else tool_setting
        reasons.append(f"tool calls: {tool or 'off'} (ENGINE_TOOL_PARSER)")
    elif "deepseek-r1" in name or (template is not None and "tools" not in template):
        tool = None
        reasons.append("tool calls: off (the chat template does not render tools)")
    elif tool is None:
        reasons.append(
            f"tool calls: off (no parser known for {model.architecture}; set ENGINE_TOOL_PARSER)"
        )
    elif marked:
        reasons.append(f"tool calls: the {tool} parser, for the chat template's call format")
    else:
        reasons.append(f"tool calls: the {tool} parser, for {model.architecture} models")
    thinks = template is not None and "<think>" in template
    reasoning = None
    if "deepseek-r1" in name:
        reasoning = "deepseek_r1"
    elif model.architecture in ("qwen3", "qwen3_moe") and (template is None or thinks):
        reasoning = "qwen3"
    elif thinks:
        reasoning = "deepseek_r1"
    if reasoning_setting is not None:
        reasoning = None if reasoning_setting == "none" else reasoning_setting
        reasons.append(f"reasoning: {reasoning or 'off'} (ENGINE_REASONING_PARSER)")
    elif reasoning is not None:
        reasons.append(f"reasoning: the {reasoning} parser puts the thinking in reasoning_content")
    return Parsers(tool, reasoning, tuple(reasons))
