"""End to end: two models on one port (ENGINE_MODELS) through llama.cpp's router, with one
loaded at a time (ENGINE_MODELS_LOADED=1) so that every change of model is a swap. Both
are the real 0.5B model under two names: what is tested is the routing, the swaps, keys
limited to one model, and a model's server dying while the router stays up."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from lowvram.engine.llamacpp.fetch import resolve_gguf
from lowvram.engine.settings import EngineSettings
from tests.helpers import (
    ServeProcess,
    alive,
    child_processes,
    lowvram_keys,
    lowvram_serve,
    start_streams,
    wait_for,
)

pytestmark = pytest.mark.e2e

KEY = "e2e-client-key-0003"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN = "e2e-admin-key-0003"
SPAWN = "spawning server instance with name="
"""What llama.cpp's router logs each time it starts a model's server: one per swap."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("models")
    gguf = resolve_gguf(None, EngineSettings(_env_file=None).models_dir).path  # type: ignore[call-arg]
    env = {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_ADMIN_API_KEYS": ADMIN,
        "ENGINE_BACKEND": "llamacpp",
        "ENGINE_MODELS": f"chat={gguf},coder={gguf}",
        "ENGINE_MODELS_LOADED": "1",
        "ENGINE_CONTEXT": "2048",
        "ENGINE_CONCURRENCY": "2",
    }
    with lowvram_serve(tmp, env, ready_timeout=1800) as process:
        yield process
        engines = child_processes(process.process.pid, [b"llama-server"]) + model_servers(process)
    # The router stops the model servers it started; none outlives `lowvram serve`.
    wait_for(lambda: not any(alive(pid) for pid in engines), 30, "every llama-server gone")


def model_servers(served: ServeProcess) -> list[int]:
    """The per-model llama-server processes: children of the router, itself our child."""
    (router,) = child_processes(served.process.pid, [b"llama-server"])
    return child_processes(router, [b"llama-server"])


def state(served: ServeProcess, model: str) -> str:
    """The model's state, as /ready shows the router's own."""
    return str(httpx.get(served.url + "/ready", timeout=10).json()["models"][model])


def ask(url: str, model: str, headers: dict[str, str] = AUTH) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        "temperature": 0,
    }
    return httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=180)


def test_both_models_are_listed_and_the_banner_names_them(served: ServeProcess) -> None:
    with OpenAI(base_url=served.url + "/v1", api_key=KEY) as client:
        assert [m.id for m in client.models.list()] == ["chat", "coder"]
    tags = httpx.get(served.url + "/api/tags", headers=AUTH, timeout=10).json()
    assert [m["name"] for m in tags["models"]] == ["chat", "coder"]
    assert "models: chat, coder" in served.output()


def test_each_request_is_answered_by_the_model_it_names_swapping_between_them(
    served: ServeProcess,
) -> None:
    with OpenAI(base_url=served.url + "/v1", api_key=KEY, timeout=180) as client:
        for model in ("chat", "coder", "chat", "default"):
            reply = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4
            )
            assert reply.model == ("chat" if model == "default" else model)
            assert reply.usage is not None and reply.usage.completion_tokens > 0
    # One loaded at a time: the router stopped a model to start the other.
    assert "exited with status 0" in served.engine_output()
    assert len(model_servers(served)) == 1


def test_batches_alternating_between_models_swap_once_per_change_and_states_follow(
    served: ServeProcess,
) -> None:
    assert ask(served.url, "chat").status_code == 200  # chat loaded to begin with
    spawned = served.engine_output().count(SPAWN)
    with ThreadPoolExecutor(4) as pool:
        for model in ("coder", "chat", "coder"):
            answers = list(pool.map(lambda m: ask(served.url, m), [model] * 4))
            assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
            assert {a.json()["model"] for a in answers} == {model}
    assert served.engine_output().count(SPAWN) == spawned + 3

    listed = httpx.get(served.url + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert {m["id"]: m["state"] for m in listed} == {"chat": "unloaded", "coder": "loaded"}
    ready = httpx.get(served.url + "/ready", timeout=10).json()
    assert ready["models"] == {"chat": "unloaded", "coder": "loaded"}
    running = httpx.get(served.url + "/api/ps", headers=AUTH, timeout=10).json()
    assert [m["name"] for m in running["models"]] == ["coder"]
    admin = {"Authorization": f"Bearer {ADMIN}"}
    metrics = httpx.get(served.url + "/metrics", headers=admin, timeout=10).text
    assert 'lowvram_model_state{model="coder",state="loaded"} 1.0' in metrics
    assert 'lowvram_model_state{model="chat",state="unloaded"} 1.0' in metrics


def test_concurrent_requests_for_both_models_streamed_or_not_are_all_answered(
    served: ServeProcess,
) -> None:
    """With one loaded at a time, requests for both at once: every one is answered whole,
    none reset, though each model's turn needs a swap."""
    bodies = [
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 8,
            "stream": stream,
        }
        for model in ("chat", "coder")
        for stream in (True, False)
    ] * 2

    def send(body: dict[str, object]) -> tuple[int, str]:
        answer = httpx.post(
            served.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=180
        )
        return answer.status_code, answer.text

    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(send, bodies))
    for body, (status, text) in zip(bodies, answers, strict=True):
        assert status == 200, text
        if body["stream"]:
            events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and "error" not in json.loads(events[-2])
        else:
            assert json.loads(text)["model"] == body["model"]


def test_a_stream_finishes_while_a_request_for_the_other_model_waits(
    served: ServeProcess,
) -> None:
    long = {
        "model": "coder",
        "messages": [{"role": "user", "content": "Count from 1 to 200."}],
        "max_tokens": 64,
        "ignore_eos": True,  # llama.cpp's own field: a fixed length
        "stream": True,
    }
    (stream,) = start_streams(served.url, [long], AUTH, timeout=180)
    other = ask(served.url, "chat")  # needs coder's server stopped: after its stream
    assert other.status_code == 200, other.text
    data = stream.result(timeout=180)
    assert data[-1] == "[DONE]"
    last = json.loads(data[-2])
    assert "error" not in last and last["choices"][0]["finish_reason"] == "length"


def test_a_key_limited_to_one_model_sees_and_uses_only_that_one(served: ServeProcess) -> None:
    db = served.log.parent / "gateway.sqlite3"
    created = lowvram_keys(db, "create", "coder-only", "--models", "coder")
    assert created.returncode == 0, created.stderr
    limited = {"Authorization": f"Bearer {created.stdout.strip()}"}
    listed = httpx.get(served.url + "/v1/models", headers=limited, timeout=10).json()
    assert [m["id"] for m in listed["data"]] == ["coder"]
    assert ask(served.url, "coder", limited).status_code == 200
    for other in ("chat", "default"):  # default is chat, the first
        refused = ask(served.url, other, limited)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"


def test_a_model_server_killed_is_started_again_by_its_next_request(
    served: ServeProcess,
) -> None:
    assert ask(served.url, "chat").status_code == 200
    (victim,) = model_servers(served)
    os.kill(victim, signal.SIGKILL)
    # Until the router has seen its server exit, it still proxies to it (a 502 then).
    wait_for(lambda: state(served, "chat") != "loaded", 30, "the router sees chat stopped")
    assert victim not in model_servers(served)
    answered = ask(served.url, "chat")
    assert answered.status_code == 200, answered.text
    assert ask(served.url, "coder").status_code == 200
    assert httpx.get(served.url + "/ready", timeout=5).json()["status"] == "ready"


def test_a_model_that_fails_to_load_is_reported_on_its_own_and_the_other_serves(
    tmp_path: Path,
) -> None:
    gguf = resolve_gguf(None, EngineSettings(_env_file=None).models_dir).path  # type: ignore[call-arg]
    broken = tmp_path / "broken.gguf"  # its header is whole (it plans), its tensors are not
    with gguf.open("rb") as source:
        broken.write_bytes(source.read(100_000_000))
    env = {
        "GATEWAY_API_KEYS": KEY,
        "ENGINE_BACKEND": "llamacpp",
        "ENGINE_MODELS": f"chat={gguf},broken={broken}",
        "ENGINE_CONTEXT": "2048",
    }
    with lowvram_serve(tmp_path, env, ready_timeout=600) as served:
        failed = ask(served.url, "broken")
        assert failed.status_code == 503, failed.text  # that model is down, not the engine
        assert "broken failed to load" in failed.json()["error"]["message"]
        assert state(served, "broken") == "failed"
        assert ask(served.url, "chat").status_code == 200
        assert state(served, "chat") == "loaded"
        engines = child_processes(served.process.pid, [b"llama-server"]) + model_servers(served)
    wait_for(lambda: not any(alive(pid) for pid in engines), 30, "every llama-server gone")
