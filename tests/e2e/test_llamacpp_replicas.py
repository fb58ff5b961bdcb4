"""End to end: `lowvram serve` managing two llama.cpp servers (ENGINE_REPLICAS=2) with the
real 0.5B model; one is SIGKILLed with streams under way. Its streams end with an error
event and `[DONE]`, the other's finish, every new request is answered, and the supervisor
brings the killed one back into the rotation."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import (
    ServeProcess,
    child_processes,
    lowvram_serve,
    outstanding_by_replica,
    replica_states,
    start_streams,
    wait_for,
)

pytestmark = pytest.mark.e2e

KEY = "e2e-client-key-0002"
ADMIN = "e2e-admin-key-0002"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("replicas")
    env = {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_ADMIN_API_KEYS": ADMIN,
        "ENGINE_BACKEND": "llamacpp",
        "ENGINE_REPLICAS": "2",
        "ENGINE_CONTEXT": "2048",
        "ENGINE_CONCURRENCY": "2",
    }
    with lowvram_serve(tmp, env, ready_timeout=1800) as process:
        wait_for(
            lambda: list(replica_states(process.url).values()) == ["ready", "ready"],
            300,
            "both replicas",
        )
        yield process


def llama_servers(parent: int) -> list[int]:
    """The llama-server processes `lowvram serve` started (its children)."""
    return child_processes(parent, [b"llama-server"])


def test_two_engines_each_with_its_own_log(served: ServeProcess) -> None:
    body = httpx.get(served.url + "/ready", timeout=5).json()
    assert [r["name"] for r in body["replicas"]] == ["cpu0", "cpu1"]
    assert len(llama_servers(served.process.pid)) == 2
    logs = [served.engine_log.with_name(f"engine-{i}.log") for i in (0, 1)]
    assert all("llama-server" in log.read_text(errors="replace") for log in logs)


def test_one_engine_killed_under_load_loses_no_request_silently(served: ServeProcess) -> None:
    url = served.url
    bodies = [
        {
            "model": "default",
            "messages": [{"role": "user", "content": f"Count from {i} to {i + 40}."}],
            "max_tokens": 48,
            "ignore_eos": True,  # llama.cpp's own field: a fixed length to be cut in the middle
            "stream": True,
        }
        for i in range(4)
    ]
    futures = start_streams(url, bodies, AUTH, timeout=120)
    assert min(outstanding_by_replica(url, ADMIN).values()) >= 1  # both engines are streaming
    victim = llama_servers(served.process.pid)[0]
    os.kill(victim, signal.SIGKILL)

    # Every new request is answered, by the engine still up.
    question = {"model": "default", "max_tokens": 4, "temperature": 0}
    for i in range(6):
        ask = question | {"messages": [{"role": "user", "content": f"Say {i}."}]}
        response = httpx.post(url + "/v1/chat/completions", json=ask, headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] is not None

    errored = completed = 0
    for future in futures:
        data = future.result(timeout=300)
        assert data[-1] == "[DONE]"
        last = json.loads(data[-2])
        if "error" in last:
            errored += 1
            assert last["error"]["code"] == "upstream_error"
        else:
            completed += 1
    assert errored >= 1 and completed >= 1

    # The supervisor restarts the killed engine; the pool takes it back.
    wait_for(
        lambda: list(replica_states(url).values()) == ["ready", "ready"],
        300,
        "the killed engine back",
    )
    assert victim not in llama_servers(served.process.pid)
    assert len(llama_servers(served.process.pid)) == 2
