"""vLLM's tool-call and reasoning parsers, chosen for the model family and its template."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lowvram.engine.units import GiB
from lowvram.engine.vllm.model import load_model_facts
from lowvram.engine.vllm.parsers import choose_parsers
from lowvram.engine.vllm.planner import plan_vllm
from tests.helpers import FIXTURES, TEST_MACHINE, asked

WITH_TOOLS = "{% if tools %}<tools>{{ tools }}</tools>{% endif %}{{ messages }}"
THINKING = WITH_TOOLS + "<think>\n"


@pytest.mark.parametrize(
    ("fixture", "tool", "reasoning"),
    [
        ("qwen2.5-7b-instruct", "hermes", None),
        ("qwen3-8b", "hermes", "qwen3"),
        ("llama-3.1-8b-instruct", "llama3_json", None),
        ("deepseek-r1-distill-llama-70b", None, "deepseek_r1"),
    ],
)
def test_parsers_follow_the_model_family(
    fixture: str, tool: str | None, reasoning: str | None
) -> None:
    parsers = choose_parsers(load_model_facts(str(FIXTURES / fixture)))
    assert (parsers.tool, parsers.reasoning) == (tool, reasoning)
    assert parsers.reasons


def test_the_chat_template_decides_what_the_family_cannot() -> None:
    qwen = load_model_facts(str(FIXTURES / "qwen2.5-7b-instruct"))
    no_tools = choose_parsers(replace(qwen, chat_template="{{ messages }}"))
    assert no_tools.tool is None and "does not render tools" in no_tools.reasons[0]
    thinking = choose_parsers(replace(qwen, chat_template=THINKING))
    assert (thinking.tool, thinking.reasoning) == ("hermes", "deepseek_r1")


def test_settings_override_the_choice() -> None:
    qwen3 = load_model_facts(str(FIXTURES / "qwen3-8b"))
    parsers = choose_parsers(qwen3, tool_setting="none", reasoning_setting="deepseek_r1")
    assert (parsers.tool, parsers.reasoning) == (None, "deepseek_r1")


def test_the_plan_turns_the_parsers_on_and_explains_them() -> None:
    model = load_model_facts(str(FIXTURES / "qwen3-8b"))
    gpu, host = TEST_MACHINE.gpus[0], TEST_MACHINE.host
    plan = plan_vllm(model, gpu, host, asked(vram=int(20 * GiB)))
    argv = plan.to_argv()
    assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
    assert "--enable-auto-tool-choice" in argv
    assert argv[argv.index("--reasoning-parser") + 1] == "qwen3"
    assert "tool calls: the hermes parser" in plan.explain()
    off = plan_vllm(model, gpu, host, asked(vram=int(20 * GiB), tool_parser="none"))
    assert "--enable-auto-tool-choice" not in off.to_argv()
