"""Fuzzing every route (hypothesis, bounded): whatever a client sends, never a 5xx, and every
error is OpenAI's error object (Ollama's `{"error": message}` on its /api routes). The
engine is the fake upstream (a test double)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import CLIENT_KEY

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/embeddings"),
    ("POST", "/tokenize"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/default"),
    ("GET", "/metrics"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("POST", "/api/chat"),
    ("POST", "/api/generate"),
    ("POST", "/api/show"),
    ("GET", "/api/tags"),
    ("GET", "/api/ps"),
    ("GET", "/api/version"),
]
FIELDS = [
    "model",
    "messages",
    "prompt",
    "input",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "seed",
    "logprobs",
    "instructions",
    "options",  # Ollama's
    "format",
    "raw",
    "suffix",
    "system",
    "images",
    "think",
    "name",
]

# Any JSON: text with lone surrogates included (json.dumps writes them as \\uD800 escapes).
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(alphabet=st.characters(codec=None))
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "x"])},
        optional={"content": values, "tool_calls": values, "name": values},
    ),
    max_size=3,
)
# Mostly request-shaped bodies (the fields the gateway acts on, with any values), some not.
bodies = st.one_of(
    st.fixed_dictionaries({}, optional={name: values for name in FIELDS} | {"messages": messages}),
    values,
)
raw_bodies = st.one_of(bodies.map(lambda b: json.dumps(b).encode()), st.binary(max_size=64))


def assert_no_5xx_and_openai_errors(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400 and response.request.url.path.startswith("/api/"):
        error = response.json()["error"]
        assert isinstance(error, str) and error  # Ollama's shape
    elif response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]


@pytest.fixture
def client(gateway: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway, timeout=30) as http:
        yield http


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(route=st.sampled_from(ROUTES), raw=raw_bodies, keyed=st.booleans())
def test_any_body_on_any_route(
    client: httpx.Client, route: tuple[str, str], raw: bytes, keyed: bool
) -> None:
    method, path = route
    headers = {"content-type": "application/json"}
    if keyed:
        headers["authorization"] = f"Bearer {CLIENT_KEY}"
    response = client.request(
        method, path, content=raw if method == "POST" else None, headers=headers
    )
    assert_no_5xx_and_openai_errors(response)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    path=st.text(alphabet="abcdefghijklmnopqrstuvwxyz/._-%0123456789", max_size=30),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
    # What h11 lets a client send: printable, without surrounding spaces.
    header=st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(
        str.strip
    ),
)
def test_any_path_method_and_key(client: httpx.Client, path: str, method: str, header: str) -> None:
    response = client.request(method, "/" + path, headers={"authorization": header})
    assert_no_5xx_and_openai_errors(response)


def test_the_strategies_do_reach_the_engine(client: httpx.Client) -> None:
    """The fuzzed shapes are close enough to real requests for some to be served."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "n": 1}
    ok = client.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {CLIENT_KEY}"}
    )
    assert ok.status_code == 200
