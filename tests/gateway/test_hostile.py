"""What a broken engine (the scriptable test double) or a hostile client must not do to the
gateway: no 500, no hang, no engine garbage passed on, nothing leaked, the loop responsive."""

from __future__ import annotations

import json
import logging
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from lowvram.gateway import serving, tokens
from lowvram.gateway.keystore import KeyStore
from tests.conftest import ADMIN_KEY, GatewayFactory
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import assert_openai_error, wait_for

Fake = tuple[FakeUpstream, str]
HELLO = [{"role": "user", "content": "hello there"}]


def chat(gateway: str, auth: dict[str, str], **fields: Any) -> httpx.Response:
    body = {"messages": HELLO} | fields
    return httpx.post(gateway + "/v1/chat/completions", json=body, headers=auth, timeout=30)


def data_of(response: httpx.Response) -> list[str]:
    return [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]


# --- a broken engine -----------------------------------------------------------------------


def test_a_non_json_answer_is_a_502_not_a_200(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    assert_openai_error(chat(gateway, auth, fake={"garbage": "html"}), 502, "upstream_error")


def test_a_non_json_event_mid_stream_ends_the_stream_with_an_error_and_done(
    gateway: str, auth: dict[str, str]
) -> None:
    response = chat(gateway, auth, stream=True, fake={"tokens": 5, "garbage_after": 2})
    data = data_of(response)
    assert len(data) == 4 and data[-1] == "[DONE]"  # w0, w1, the error, [DONE]
    assert "not JSON" in json.loads(data[-2])["error"]["message"]


def test_an_endless_event_is_cut_and_the_loop_stays_responsive(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    gateway = make_gateway(max_event_bytes=256 * 1024)
    slowest = 0.0
    done = threading.Event()

    def probe_health() -> None:
        nonlocal slowest
        while not done.is_set():
            started = time.perf_counter()
            httpx.get(gateway + "/health", timeout=10)
            slowest = max(slowest, time.perf_counter() - started)

    prober = threading.Thread(target=probe_health)
    prober.start()
    try:
        response = chat(gateway, auth, stream=True, fake={"endless": 64 * 1024 * 1024})
    finally:
        done.set()
        prober.join()
    data = data_of(response)
    assert data[-1] == "[DONE]" and "over 262144 bytes" in json.loads(data[-2])["error"]["message"]
    assert slowest < 1.0  # /health kept answering while the engine sent its flood


def test_a_tokenizer_that_answers_garbage_does_not_break_fitting(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    fake[0].tokenize_garbage = True
    fake[0].context_length = 64
    gateway = make_gateway()
    # Long enough that the free bound does not fit: the gateway asks /tokenize, gets junk,
    # and lets the engine decide.
    response = chat(gateway, auth, messages=[{"role": "user", "content": "word " * 40}])
    assert response.status_code == 200, response.text


def test_the_tokenize_route_passes_no_garbage_on(
    gateway: str, auth: dict[str, str], fake: Fake
) -> None:
    fake[0].tokenize_garbage = True
    response = httpx.post(
        gateway + "/tokenize", json={"model": "default", "prompt": "hi"}, headers=auth
    )
    assert_openai_error(response, 502, "upstream_error")


def test_a_malformed_model_list_makes_the_upstream_not_ready_until_it_is_fixed(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_gateway()
    with caplog.at_level(logging.WARNING):
        fake[0].models_answer = {"data": [{}]}
        wait_for(lambda: httpx.get(gateway + "/ready").status_code == 503, 10, "not ready")
        assert any("no model with an id" in r.getMessage() for r in caplog.records)
        fake[0].models_answer = None
        wait_for(lambda: httpx.get(gateway + "/ready").status_code == 200, 10, "ready again")
    assert chat(gateway, auth).status_code == 200


def test_a_hung_tokenize_route_ends_and_frees_its_slot(
    gateway: str, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(serving, "TOKENIZE_TIMEOUT", 0.5)
    body = {"model": "default", "prompt": "hi", "fake": {"hang": True}}
    started = time.monotonic()
    response = httpx.post(gateway + "/tokenize", json=body, headers=auth, timeout=30)
    assert_openai_error(response, 504, "upstream_timeout")
    assert time.monotonic() - started < 10
    metrics = httpx.get(gateway + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert "lowvram_inflight_requests 0.0" in metrics.text


def test_a_hung_tokenizer_does_not_hold_a_request_that_needs_a_count(
    gateway: str, auth: dict[str, str], fake: Fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "COUNT_TIMEOUT", 0.5)
    fake[0].tokenize_hang = True
    started = time.monotonic()
    response = chat(gateway, auth, max_tokens=4090)  # the free bound does not fit: count
    assert response.status_code == 200, response.text
    assert time.monotonic() - started < 10


def test_responses_stream_failures_end_with_the_engines_message(
    gateway: str, auth: dict[str, str]
) -> None:
    body = {"input": "hi", "stream": True, "fake": {"tokens": 5, "error_after": 2}}
    response = httpx.post(gateway + "/v1/responses", json=body, headers=auth, timeout=30)
    assert response.status_code == 200
    failed = json.loads(data_of(response)[-1])["error"]
    assert "scripted failure" in failed["message"] and failed["code"] == "upstream_error"


# --- a hostile client --------------------------------------------------------------------


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": "x"}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": 3}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"function": ["get_weather"]}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": "f"}], "tool_choice": NAMED}, "tools"),
        ({"tools": [{"type": "function", "function": 7}], "tool_choice": NAMED}, "tools"),
        ({"tools": [{"type": "function"}], "tool_choice": NAMED}, "tools"),
    ],
)
def test_malformed_tools_are_400s_and_the_connection_lives(
    make_gateway: GatewayFactory,
    auth: dict[str, str],
    fake: Fake,
    fields: dict[str, Any],
    param: str,
) -> None:
    fake[0].flavor = "llamacpp"  # the path that narrows a named choice to its tool
    gateway = make_gateway()
    with httpx.Client(base_url=gateway, headers=auth) as client:
        body = {"messages": HELLO} | fields
        error = assert_openai_error(client.post("/v1/chat/completions", json=body), 400)
        assert error["param"].startswith(param) and "instance of" not in error["message"]
        assert client.post("/v1/chat/completions", json={"messages": HELLO}).status_code == 200


def test_a_lone_surrogate_nested_near_the_recursion_limit_is_a_400(
    gateway: str, auth: dict[str, str]
) -> None:
    """Parsing nests one level less deep than re-encoding (the check for lone surrogates):
    some depth just under the limit parses and then cannot be encoded. Try every one."""
    headers = auth | {"content-type": "application/json"}
    with httpx.Client(base_url=gateway, headers=headers) as client:
        for depth in range(900, 1000):
            for open_, close in ((b"[", b"]"), (b'{"a":', b"}")):
                raw = b'{"messages": [{"role": "user", "content": "hi"}], "x": '
                raw += open_ * depth + b'"\\ud800"' + close * depth + b"}"
                assert_openai_error(client.post("/v1/chat/completions", content=raw), 400)


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("/v1/completions", b'{"prompt": "a\\udfff b"}'),
        ("/v1/chat/completions", b'{"model": "\\ud800", "messages": []}'),
        ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ],
)
def test_bad_text_and_deep_nesting_are_400s_and_the_connection_lives(
    gateway: str, auth: dict[str, str], path: str, raw: bytes
) -> None:
    with httpx.Client(base_url=gateway, headers=auth | {"content-type": "application/json"}) as c:
        assert_openai_error(c.post(path, content=raw), 400)
        assert c.post("/v1/chat/completions", json={"messages": HELLO}).status_code == 200


def test_an_empty_prompt_with_a_huge_max_tokens_is_not_a_500(
    gateway: str, auth: dict[str, str]
) -> None:
    body = {"prompt": [], "max_tokens": 10**6}
    response = httpx.post(gateway + "/v1/completions", json=body, headers=auth)
    assert response.status_code < 500, response.text


def test_a_key_stored_with_a_zero_limit_gets_429s_not_500s(gateway: str, tmp_path: Path) -> None:
    key = KeyStore(tmp_path / "gateway.sqlite3").create("zero")
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as conn:  # as an older version let it be
        conn.execute("UPDATE api_keys SET rpm = 0 WHERE name = 'zero'")
    response = chat(gateway, {"Authorization": f"Bearer {key}"})
    assert_openai_error(response, 429, "rate_limit_exceeded")


@pytest.mark.parametrize("flag", ["--rpm", "--tpm", "--concurrency"])
@pytest.mark.parametrize("value", ["0", "-5"])
def test_keys_create_refuses_limits_that_would_block_a_key(
    tmp_path: Path, flag: str, value: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lowvram", "keys", "create", "k", flag, value],
        capture_output=True,
        text=True,
        env={"GATEWAY_DB_PATH": str(tmp_path / "k.sqlite3"), "PATH": ""},
        timeout=60,
    )
    assert result.returncode == 2 and result.stderr.startswith(f"error: {flag} must be")


def test_the_database_and_its_journal_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "data" / "gateway.sqlite3"
    store = KeyStore(path)
    store.create("someone")
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    store.close()


def test_head_health_answers_like_get(gateway: str) -> None:
    response = httpx.head(gateway + "/health")
    assert response.status_code == 200 and response.content == b""
