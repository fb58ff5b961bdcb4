"""End to end: a reasoning chat template on llama.cpp's server, its thinking under both names.

llama.cpp's server finds a template's thinking markers on its own (it renders the template
with and without `enable_thinking`) and sends the thinking as `reasoning_content`; the
gateway adds `reasoning`, vLLM's name. The template (fixtures/thinking.jinja) opens
`<think>` in the generation prompt, as Qwen3's and DeepSeek-R1's do; the 0.5B model is not
a reasoning model, so what it writes there varies: asserted is where it arrives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.helpers import ServeProcess, lowvram_serve

pytestmark = [pytest.mark.e2e]

KEY = "e2e-reasoning-key-0001"
TEMPLATE = Path(__file__).parent / "fixtures" / "thinking.jinja"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    env = {
        "GATEWAY_API_KEYS": KEY,
        "ENGINE_BACKEND": "llamacpp",
        "ENGINE_CONTEXT": "2048",
        "ENGINE_CONCURRENCY": "1",
        "ENGINE_EXTRA_ARGS": f"--chat-template-file {TEMPLATE}",
    }
    with lowvram_serve(tmp_path_factory.mktemp("reasoning"), env, ready_timeout=1800) as process:
        yield process


def test_thinking_arrives_as_reasoning_and_reasoning_content(served: ServeProcess) -> None:
    with openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0) as client:
        question = [{"role": "user", "content": "What is 2+2?"}]
        answer = client.chat.completions.create(model="default", messages=question, max_tokens=24)
        message = answer.choices[0].message.model_dump()
        assert message["reasoning_content"], message  # llama.cpp's own field...
        assert message["reasoning"] == message["reasoning_content"]  # ...and vLLM's
        stream = client.chat.completions.create(
            model="default", messages=question, max_tokens=24, stream=True
        )
        deltas = [chunk.choices[0].delta.model_dump() for chunk in stream if chunk.choices]
    thinking = [d for d in deltas if d.get("reasoning_content")]
    assert thinking, deltas
    assert all(d["reasoning"] == d["reasoning_content"] for d in thinking)
