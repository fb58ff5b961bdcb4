"""The gateway in front of a supervised engine process (a test double of vLLM's server)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lowvram.engine.handle import EngineState
from lowvram.engine.supervisor import Supervisor, Timing
from lowvram.gateway.app import create_app
from tests.conftest import ADMIN_KEY, CLIENT_KEY, gateway_settings
from tests.helpers import fake_vllm, serve, wait_for

AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
TIMING = Timing(backoff_base=0.5, stop_grace=2, poll_interval=0.1)


@pytest.fixture
def managed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Supervisor]]:
    monkeypatch.setenv("FAKE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_START_DELAY", "1")
    engine = fake_vllm(tmp_path)
    supervisor = Supervisor(engine, engine.settings, TIMING)
    settings = gateway_settings(tmp_path / "gateway.sqlite3", max_inflight=1)
    with serve(create_app(settings, supervisor)) as url:
        yield url, supervisor


def chat(url: str, **fields: Any) -> httpx.Response:
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}]} | fields
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)


def test_ready_follows_the_engine(managed: tuple[str, Supervisor]) -> None:
    url, supervisor = managed
    starting = httpx.get(url + "/ready")
    assert starting.status_code == 503 and supervisor.state is EngineState.STARTING
    refused = chat(url)
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    wait_for(lambda: supervisor.state is EngineState.READY, 30, "the engine")
    assert httpx.get(url + "/ready").status_code == 200
    models = httpx.get(url + "/v1/models", headers=AUTH).json()["data"]
    assert models[0]["id"] == "qwen2.5-7b-instruct" and models[0]["max_model_len"] == 4096
    assert chat(url, fake={"tokens": 2}).json()["choices"][0]["message"]["content"] == "w0 w1"
    # The plan's sequences, and the gateway's bound (set to 1 here), are in the metrics.
    assert (
        _metric(url, "lowvram_engine_max_sequences") == supervisor.backend.served_model().max_batch
    )
    assert _metric(url, "lowvram_inflight_limit") == 1


def test_an_engine_crash_mid_stream_reaches_the_client_and_the_engine_comes_back(
    managed: tuple[str, Supervisor],
) -> None:
    url, supervisor = managed
    wait_for(lambda: supervisor.state is EngineState.READY, 30, "the engine")
    engine_url, first_pid = supervisor.base_url, supervisor.pid
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"tokens": 100, "delay": 0.1},
    }
    queued: list[httpx.Response] = []
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30
    ) as stream:
        lines = (line for line in stream.iter_lines() if line.startswith("data: "))
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["content"] == "w0"
        # A second request waits for the only slot (GATEWAY_MAX_INFLIGHT=1)...
        waiter = threading.Thread(target=lambda: queued.append(chat(url)))
        waiter.start()
        wait_for(lambda: _queued(url) == 1, 10, "the second request to queue")
        with pytest.raises(httpx.HTTPError):
            httpx.post(engine_url + "/_crash")
        rest = list(lines)
    error = json.loads(rest[-2][6:])["error"]
    assert rest[-1] == "data: [DONE]" and error["type"] == "server_error"
    waiter.join(10)
    # ...and is answered 503 when the engine goes down, not left to time out.
    assert (
        queued[0].status_code == 503 and queued[0].json()["error"]["code"] == "engine_unavailable"
    )
    wait_for(lambda: supervisor.state is EngineState.READY, 30, "the engine to come back")
    assert supervisor.pid != first_pid
    assert chat(url, fake={"tokens": 1}).status_code == 200


def _queued(url: str) -> int:
    return _metric(url, "lowvram_queued_requests")


def _metric(url: str, name: str) -> int:
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    line = next(line for line in metrics.splitlines() if line.startswith(name + " "))
    return int(float(line.split()[1]))
