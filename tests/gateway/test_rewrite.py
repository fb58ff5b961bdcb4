"""Request shaping: validation, pass-through, model resolution, shims and context fitting."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from lowvram.engine.handle import ServedModel
from lowvram.gateway.errors import BadRequest
from lowvram.gateway.exchange import Endpoint
from lowvram.gateway.keystore import KeyStore
from lowvram.gateway.rewrite import (
    apply_shims,
    check_engine_can,
    check_tool_history,
    drop_cut_tool_calls,
)
from tests.conftest import GatewayFactory
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import assert_openai_error

Fake = tuple[FakeUpstream, str]


def chat(gateway: str, auth: dict[str, str], **fields: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "hello there"}]} | fields
    return httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth)


def last_body(fake: Fake, path: str = "/v1/chat/completions") -> dict[str, Any]:
    return fake[0].last(path).body


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.[0].content"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "12"}, "max_tokens"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"stop": 7}, "stop"),
        ({"stop": ["a"] * 17}, "stop"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"stream": True, "stream_options": {"include_usage": "y"}},
            "stream_options.include_usage",
        ),
        ({"model": 3}, "model"),
    ],
)
def test_invalid_fields_get_400_naming_the_param(
    gateway: str, auth: dict[str, str], fake: Fake, fields: dict[str, Any], param: str
) -> None:
    before = len(fake[0].records)
    error = assert_openai_error(chat(gateway, auth, **fields), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert len(fake[0].records) == before  # nothing reached the engine


def test_missing_messages_and_prompt_are_named(gateway: str, auth: dict[str, str]) -> None:
    no_messages = httpx.post(gateway + "/v1/chat/completions", json={}, headers=auth)
    assert assert_openai_error(no_messages, 400)["param"] == "messages"
    no_prompt = httpx.post(gateway + "/v1/completions", json={"max_tokens": 3}, headers=auth)
    assert assert_openai_error(no_prompt, 400)["param"] == "prompt"


def test_bodies_that_are_not_json_objects_get_400(gateway: str, auth: dict[str, str]) -> None:
    for content in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        response = httpx.post(
            gateway + "/v1/chat/completions",
            content=content,
            headers=auth | {"content-type": "application/json"},
        )
        assert_openai_error(response, 400)


def test_unknown_fields_pass_through_untouched(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    extra = {"top_k": 20, "ignore_eos": True, "guided_json": {"type": "object"}, "min_p": 0.05}
    assert chat(gateway, auth, temperature=1, **extra).status_code == 200
    sent = last_body(fake)
    assert {k: sent[k] for k in extra} == extra
    assert sent["temperature"] == 1 and isinstance(sent["temperature"], int)


def test_model_missing_or_aliased_resolves_to_the_served_model(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    gateway = make_gateway(model_aliases={"gpt-4o-mini": "fake-model"})
    for requested in (None, "fake-model", "gpt-4o-mini"):
        fields = {} if requested is None else {"model": requested}
        assert chat(gateway, auth, **fields).status_code == 200
        assert last_body(fake)["model"] == "fake-model"
    models = httpx.get(gateway + "/v1/models", headers=auth).json()["data"]
    assert [m["id"] for m in models] == ["fake-model", "gpt-4o-mini"]
    card = httpx.get(gateway + "/v1/models/gpt-4o-mini", headers=auth)
    assert card.json()["id"] == "gpt-4o-mini"


def test_unknown_model_is_404_model_not_found(gateway: str, auth: dict[str, str]) -> None:
    error = assert_openai_error(chat(gateway, auth, model="gpt-5"), 404, "model_not_found")
    assert error["param"] == "model" and "gpt-5" in error["message"]
    assert_openai_error(httpx.get(gateway + "/v1/models/gpt-5", headers=auth), 404)


def test_a_key_limited_to_other_models_cannot_use_this_one(
    make_gateway: GatewayFactory, tmp_path: Any
) -> None:
    gateway = make_gateway()
    store = KeyStore(tmp_path / "gateway.sqlite3")
    other = {"api-key": store.create("other", models=["some-other-model"])}
    allowed = {"api-key": store.create("allowed", models=["fake-model"])}
    assert_openai_error(chat(gateway, other), 404, "model_not_found")
    assert httpx.get(gateway + "/v1/models", headers=other).json()["data"] == []
    assert chat(gateway, allowed).status_code == 200
    store.close()


def test_developer_role_becomes_system(gateway: str, auth: dict[str, str], fake: Fake) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert chat(gateway, auth, messages=messages).status_code == 200
    assert [m["role"] for m in last_body(fake)["messages"]] == ["system", "user"]


def test_max_completion_tokens_becomes_max_tokens(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    assert chat(gateway, auth, max_completion_tokens=7).status_code == 200
    sent = last_body(fake)
    assert sent["max_tokens"] == 7 and "max_completion_tokens" not in sent


def test_parallel_tool_calls_is_accepted_with_and_without_tools(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    assert chat(gateway, auth, parallel_tool_calls=False).status_code == 200
    assert "parallel_tool_calls" not in last_body(fake)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat(gateway, auth, parallel_tool_calls=False, tools=tools).status_code == 200
    assert last_body(fake)["parallel_tool_calls"] is False


def test_default_max_tokens_applies_when_the_client_sends_none(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    gateway = make_gateway(default_max_tokens=33)
    assert chat(gateway, auth).status_code == 200
    assert last_body(fake)["max_tokens"] == 33


def test_short_prompts_are_not_sent_to_the_tokenizer(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    before = sum(r.path == "/tokenize" for r in fake[0].records)
    assert chat(gateway, auth, max_tokens=100).status_code == 200
    assert sum(r.path == "/tokenize" for r in fake[0].records) == before
    assert last_body(fake)["max_tokens"] == 100


def test_max_tokens_is_clamped_to_what_the_context_leaves(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    # The fake counts words + 3 per message: "hello there" is 5 tokens of a 4096 window.
    assert chat(gateway, auth, max_tokens=100_000).status_code == 200
    assert last_body(fake)["max_tokens"] == 4096 - 5


def test_a_prompt_over_the_context_gets_400_with_both_numbers(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    words = " ".join(["word"] * 5000)
    response = chat(gateway, auth, messages=[{"role": "user", "content": words}])
    error = assert_openai_error(response, 400, "context_length_exceeded")
    assert "4096" in error["message"] and "5003" in error["message"]
    assert error["param"] == "messages"


def test_completions_prompts_are_fitted_too(gateway: str, auth: dict[str, str], fake: Fake) -> None:
    body = {"prompt": "one two three", "max_tokens": 10_000}
    assert httpx.post(gateway + "/v1/completions", json=body, headers=auth).status_code == 200
    assert last_body(fake, "/v1/completions")["max_tokens"] == 4096 - 3
    too_long = {"prompt": " ".join(["w"] * 5000)}
    response = httpx.post(gateway + "/v1/completions", json=too_long, headers=auth)
    assert assert_openai_error(response, 400, "context_length_exceeded")["param"] == "prompt"


def test_body_over_the_limit_gets_413(make_gateway: GatewayFactory, auth: dict[str, str]) -> None:
    gateway = make_gateway(max_body_bytes=4096)
    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    assert_openai_error(httpx.post(gateway + "/v1/chat/completions", json=big, headers=auth), 413)

    def chunked() -> Any:
        yield json.dumps(big).encode()

    streamed = httpx.post(gateway + "/v1/chat/completions", content=chunked(), headers=auth)
    assert_openai_error(streamed, 413)


# --- what an engine cannot do, and the shims that speak its dialect (no server) -----------

LLAMACPP = ServedModel(
    "m",
    4096,
    max_choices=4,
    accepts_images=False,
    serves_embeddings=False,
    named_tool_choice=False,
    seed_needs_fresh_prompt=True,
    tool_call_opener="<tool_call>\n",
    tool_call_closer="</tool_call>",
)
UNKNOWN = ServedModel("m", 4096)
TOOLS = [
    {"type": "function", "function": {"name": "a", "parameters": {}}},
    {"type": "function", "function": {"name": "b", "parameters": {}}},
]


def chat_body(**fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "hi"}]} | fields


@pytest.mark.parametrize(
    ("endpoint", "body", "param", "code"),
    [
        (Endpoint.CHAT, chat_body(n=5), "n", None),
        (Endpoint.EMBEDDINGS, {"input": "x"}, "model", "model_not_supported"),
        (
            Endpoint.CHAT,
            chat_body(
                messages=[
                    {
                        "role": "user",
                        "content": [{"type": "text", "text": "x"}, {"type": "image_url"}],
                    }
                ]
            ),
            "messages.[0].content.[1]",
            "image_input_not_supported",
        ),
        (
            Endpoint.RESPONSES,
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input.[0].content.[0]",
            "image_input_not_supported",
        ),
    ],
)
def test_what_the_engine_cannot_do_is_a_400_naming_the_param(
    endpoint: Endpoint, body: dict[str, Any], param: str, code: str | None
) -> None:
    with pytest.raises(BadRequest) as refused:
        check_engine_can(endpoint, body, LLAMACPP)
    assert refused.value.param == param and refused.value.code == code
    check_engine_can(endpoint, body, UNKNOWN)  # an engine we know nothing of decides itself


def test_n_up_to_the_engine_limit_passes() -> None:
    check_engine_can(Endpoint.CHAT, chat_body(n=4), LLAMACPP)


def test_a_named_tool_choice_becomes_required_with_only_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "b"}}
    body = chat_body(tools=TOOLS, tool_choice=choice)
    apply_shims(Endpoint.CHAT, body, LLAMACPP)
    assert body["tool_choice"] == "required" and body["tools"] == TOOLS[1:]
    assert body["messages"][-1] == {"role": "assistant", "content": "<tool_call>\n"}
    untouched = chat_body(tools=TOOLS, tool_choice=choice)
    apply_shims(Endpoint.CHAT, untouched, UNKNOWN)
    assert untouched["tool_choice"] == choice and untouched["tools"] == TOOLS


def test_a_named_tool_that_is_not_offered_is_a_400() -> None:
    body = chat_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "c"}})
    with pytest.raises(BadRequest) as refused:
        apply_shims(Endpoint.CHAT, body, LLAMACPP)
    assert refused.value.param == "tool_choice"


def test_a_required_call_is_opened_for_the_model_but_auto_is_not() -> None:
    required = chat_body(tools=TOOLS, tool_choice="required")
    apply_shims(Endpoint.CHAT, required, LLAMACPP)
    assert required["messages"][-1]["role"] == "assistant"
    auto = chat_body(tools=TOOLS, tool_choice="auto")
    apply_shims(Endpoint.CHAT, auto, LLAMACPP)
    assert len(auto["messages"]) == 1


def test_a_prefilled_single_call_stops_where_the_call_closes() -> None:
    # After the opener's prefill llama.cpp no longer holds the model to one call.
    one = chat_body(tools=TOOLS, tool_choice="required", stop="END")
    apply_shims(Endpoint.CHAT, one, LLAMACPP)
    assert one["stop"] == ["END", "</tool_call>"]
    several = chat_body(tools=TOOLS, tool_choice="required", parallel_tool_calls=True)
    apply_shims(Endpoint.CHAT, several, LLAMACPP)
    assert "stop" not in several
    unopened = chat_body(tools=TOOLS, tool_choice="required")
    apply_shims(Endpoint.CHAT, unopened, UNKNOWN)  # vLLM's grammar holds: no stop needed
    assert "stop" not in unopened


def test_a_seed_asks_llama_cpp_to_recompute_the_prompt() -> None:
    seeded = chat_body(seed=7)
    apply_shims(Endpoint.CHAT, seeded, LLAMACPP)
    assert seeded["cache_prompt"] is False
    chosen = chat_body(seed=7, cache_prompt=True)
    apply_shims(Endpoint.CHAT, chosen, LLAMACPP)
    assert chosen["cache_prompt"] is True  # the client's own choice stands
    elsewhere = chat_body(seed=7)
    apply_shims(Endpoint.CHAT, elsewhere, UNKNOWN)
    assert "cache_prompt" not in elsewhere


def test_a_llama_cpp_upstream_is_detected_and_its_tool_choice_narrowed(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    fake[0].flavor = "llamacpp"
    gateway = make_gateway()
    body = chat_body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "a"}})
    response = httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth)
    assert response.status_code == 200, response.text
    sent = fake[0].last().body
    assert sent["tool_choice"] == "required" and [t["function"]["name"] for t in sent["tools"]] == [
        "a"
    ]


@pytest.mark.parametrize("engine", [LLAMACPP, UNKNOWN])
def test_a_forced_call_without_parallel_tool_calls_is_one_call(engine: ServedModel) -> None:
    for choice in ("required", {"type": "function", "function": {"name": "a"}}):
        forced = chat_body(tools=TOOLS, tool_choice=choice)
        apply_shims(Endpoint.CHAT, forced, engine)
        assert forced["parallel_tool_calls"] is False
    several = chat_body(tools=TOOLS, tool_choice="required", parallel_tool_calls=True)
    apply_shims(Endpoint.CHAT, several, engine)
    assert several["parallel_tool_calls"] is True  # what the client asks wins
    auto = chat_body(tools=TOOLS, tool_choice="auto")
    apply_shims(Endpoint.CHAT, auto, engine)
    assert "parallel_tool_calls" not in auto  # the model's choice, the engine's default


def test_tool_arguments_sent_back_must_be_json() -> None:
    cut = {"id": "c1", "type": "function", "function": {"name": "a", "arguments": '{"city": "Par'}}
    body = chat_body(
        messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [cut]}]
    )
    with pytest.raises(BadRequest) as refused:
        check_tool_history(body)
    assert refused.value.param == "messages.[1].tool_calls.[0].function.arguments"
    assert "not valid JSON" in refused.value.message
    whole = {**cut, "function": {"name": "a", "arguments": '{"city": "Paris"}'}}
    check_tool_history(chat_body(messages=[{"role": "assistant", "tool_calls": [whole]}]))


def test_a_call_cut_by_max_tokens_is_not_presented_as_a_call() -> None:
    calls = [
        {"id": "1", "type": "function", "function": {"name": "a", "arguments": '{"x": 1}'}},
        {"id": "2", "type": "function", "function": {"name": "a", "arguments": "{"}},
    ]
    answer = {"choices": [{"finish_reason": "length", "message": {"tool_calls": calls}}]}
    assert drop_cut_tool_calls(answer)
    assert [c["id"] for c in answer["choices"][0]["message"]["tool_calls"]] == ["1"]
    alone = {"choices": [{"finish_reason": "length", "message": {"tool_calls": calls[1:]}}]}
    assert drop_cut_tool_calls(alone) and "tool_calls" not in alone["choices"][0]["message"]
    stopped = {"choices": [{"finish_reason": "tool_calls", "message": {"tool_calls": calls}}]}
    assert not drop_cut_tool_calls(stopped)  # only a cut answer is touched
