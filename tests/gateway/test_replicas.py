"""Several upstreams behind one gateway: one is killed under load, and nothing is lost.

The upstreams are the scriptable TEST DOUBLE, each its own process so that it can die the
way an engine does (SIGKILL: connections reset, nothing said). Two llama.cpp servers as
replicas are in tests/e2e/test_llamacpp.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from lowvram.engine.external import ExternalEngine
from lowvram.engine.replicas import FAILURES_IN_A_ROW, Replicas
from lowvram.engine.supervisor import free_port
from lowvram.gateway.app import create_app
from tests.conftest import ADMIN_KEY, UPSTREAM_KEY, gateway_settings
from tests.helpers import (
    ROOT,
    outstanding_by_replica,
    replica_states,
    serve,
    start_streams,
    wait_for,
    wait_ready,
)

NAMES = ("a", "b")
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def answers(url: str) -> bool:
    try:
        return httpx.get(url + "/v1/models", timeout=1).status_code in (200, 401)
    except httpx.HTTPError:
        return False


@contextmanager
def double_process(
    port: int, name: str, always: dict[str, Any] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.doubles.fake_upstream", str(port), UPSTREAM_KEY, name],
        cwd=ROOT,
        env=os.environ | {"FAKE_ALWAYS": json.dumps(always or {})},
    )
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}"), 20, f"test double {name}")
        yield process
    finally:
        process.kill()
        process.wait(10)


@contextmanager
def pool_of_doubles(
    tmp_path: Path, always: dict[str, dict[str, Any]] | None = None, **settings_: Any
) -> Iterator[tuple[str, dict[str, int], dict[str, Any]]]:
    """A gateway in front of two doubles ("a" scripted with `always["a"]`...); yields its
    URL, their ports, their processes."""
    ports = {name: free_port() for name in NAMES}
    with ExitStack() as stack:
        processes: dict[str, Any] = {
            name: stack.enter_context(double_process(port, name, (always or {}).get(name)))
            for name, port in ports.items()
        }
        settings = gateway_settings(tmp_path / "gateway.sqlite3", **settings_)
        members = [
            ExternalEngine(f"http://127.0.0.1:{port}", UPSTREAM_KEY, poll_interval=0.2)
            for port in ports.values()
        ]
        url = stack.enter_context(serve(create_app(settings, Replicas(members, list(NAMES)))))
        wait_ready(url)
        wait_for(lambda: set(replica_states(url).values()) == {"ready"}, 10, "both ready")
        yield url, ports, processes


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[tuple[str, dict[str, int], dict[str, Any]]]:
    with pool_of_doubles(tmp_path) as started:
        yield started


def chat(url: str, auth: dict[str, str], text: str, **fields: Any) -> httpx.Response:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]} | fields
    return httpx.post(url + "/v1/chat/completions", json=body, headers=auth, timeout=30)


def test_requests_are_shared_and_the_pool_is_on_ready_and_metrics(
    pool: tuple[str, dict[str, int], dict[str, Any]], auth: dict[str, str]
) -> None:
    url, _, _ = pool
    served = [chat(url, auth, f"question {i}").json()["system_fingerprint"] for i in range(12)]
    assert set(served) == set(NAMES)
    assert replica_states(url) == {"a": "ready", "b": "ready"}
    metrics = httpx.get(url + "/metrics", headers=ADMIN, timeout=5).text
    assert 'lowvram_replica_ready{replica="a"} 1.0' in metrics
    assert 'lowvram_replica_outstanding_requests{replica="b"} 0.0' in metrics


def test_a_conversation_keeps_its_replica(
    pool: tuple[str, dict[str, int], dict[str, Any]], auth: dict[str, str]
) -> None:
    url, _, _ = pool
    for topic in ("tides", "bread", "owls"):
        served = {chat(url, auth, f"tell me about {topic}").json()["system_fingerprint"]}
        served |= {chat(url, auth, f"tell me about {topic}").json()["system_fingerprint"]}
        assert len(served) == 1  # sequential turns: no load, so always the same one


def test_a_replica_killed_under_load_loses_nothing_silently(
    pool: tuple[str, dict[str, int], dict[str, Any]], auth: dict[str, str]
) -> None:
    url, ports, processes = pool
    bodies = [
        {
            "model": "fake-model",
            "messages": [{"role": "user", "content": f"stream {i}"}],
            "stream": True,
            "fake": {"tokens": 60, "delay": 0.05},
        }
        for i in range(8)
    ]
    futures = start_streams(url, bodies, auth, timeout=30)
    busy = outstanding_by_replica(url, ADMIN_KEY)
    assert set(busy) == set(NAMES) and min(busy.values()) > 0  # streams on both
    processes["a"].send_signal(signal.SIGKILL)
    processes["a"].wait(10)
    # New requests right away: the first may find "a" still marked ready (its health check
    # has not run); refused, it goes to "b". Every one is answered.
    after = [chat(url, auth, f"after the kill {i}") for i in range(20)]
    assert [r.status_code for r in after] == [200] * 20
    assert {r.json()["system_fingerprint"] for r in after} == {"b"}

    ended = [f.result(timeout=30) for f in futures]
    completed = errored = 0
    for data in ended:
        assert data[-1] == "[DONE]"  # every stream ends properly, whichever replica it was on
        events = [json.loads(d) for d in data[:-1]]
        if "error" in events[-1]:
            errored += 1
            assert events[-1]["error"]["code"] == "upstream_error"
        else:
            completed += 1
            text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
            assert text.split() == [f"w{i}" for i in range(60)]
    assert errored >= 1 and completed >= 1  # a's streams said so; b's finished

    wait_for(lambda: replica_states(url).get("a") == "restarting", 10, "a taken out")
    ready = httpx.get(url + "/ready", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"

    # Back on the same port: back in the rotation.
    with double_process(ports["a"], "a"):
        wait_for(lambda: replica_states(url).get("a") == "ready", 10, "a back")
        served = {chat(url, auth, f"again {i}").json()["system_fingerprint"] for i in range(8)}
        assert served == {"a", "b"}


def test_with_every_replica_down_clients_get_a_503_not_a_hang(
    pool: tuple[str, dict[str, int], dict[str, Any]], auth: dict[str, str]
) -> None:
    url, _, processes = pool
    for process in processes.values():
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    response = chat(url, auth, "anyone?")
    assert response.status_code == 503 and int(response.headers["retry-after"]) > 0
    assert response.json()["error"]["type"] in ("server_error", "service_unavailable")
    wait_for(lambda: httpx.get(url + "/ready", timeout=5).status_code == 503, 10, "not ready")
    body = httpx.get(url + "/ready", timeout=5).json()
    assert "no replica is ready" in body["reason"]
    later = chat(url, auth, "anyone now?")  # known to be away: still worth a retry later
    assert later.status_code == 503 and int(later.headers["retry-after"]) > 0


def test_a_request_that_kills_its_engine_is_never_sent_to_another(
    pool: tuple[str, dict[str, int], dict[str, Any]], auth: dict[str, str]
) -> None:
    url, _, processes = pool
    response = chat(url, auth, "poison", fake={"die": True})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "upstream_error"
    alive = [name for name, process in processes.items() if process.poll() is None]
    assert len(alive) == 1  # one engine died of it; the other never saw it
    after = [chat(url, auth, f"after {i}") for i in range(4)]
    assert [r.status_code for r in after] == [200] * 4
    assert {r.json()["system_fingerprint"] for r in after} == set(alive)


def test_a_replica_answering_garbage_is_taken_out_on_its_outcomes(
    tmp_path: Path, auth: dict[str, str]
) -> None:
    with pool_of_doubles(tmp_path, {"a": {"garbage": "html"}}) as (url, _, _):
        statuses = [chat(url, auth, f"question {i}").status_code for i in range(30)]
        assert statuses.count(502) == FAILURES_IN_A_ROW  # then "a" is out
        assert statuses.count(200) == 30 - FAILURES_IN_A_ROW
        ready = httpx.get(url + "/ready", timeout=5)
        assert ready.status_code == 200  # its health check says ready, the pool knows better
        replicas = {r["name"]: r for r in ready.json()["replicas"]}
        assert replicas["a"]["state"] == "out" and "in a row failed" in replicas["a"]["reason"]
        assert replicas["b"]["state"] == "ready"


def test_a_replica_far_too_slow_to_start_its_streams_is_taken_out(
    tmp_path: Path, auth: dict[str, str]
) -> None:
    with pool_of_doubles(tmp_path, {"a": {"ttft": 1.0}}, replica_slow_seconds=0.5) as pooled:
        url = pooled[0]
        slow = 0
        for i in range(12):
            started = time.monotonic()
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                json={"model": "fake-model", "messages": [{"role": "user", "content": f"q{i}"}]}
                | {"stream": True},
                headers=auth,
                timeout=30,
            ) as response:
                assert response.status_code == 200
                assert list(response.iter_lines())[-2] == "data: [DONE]"
            slow += time.monotonic() - started >= 1.0
        assert slow == FAILURES_IN_A_ROW  # answered, but too late three times: then out
        assert replica_states(url)["a"] == "out"


def test_what_waits_on_a_replica_that_fails_ends_at_once(
    tmp_path: Path, auth: dict[str, str]
) -> None:
    with pool_of_doubles(tmp_path, {"a": {"ttft": 120}}) as (url, ports, _):
        results: dict[int, tuple[float, list[str]]] = {}

        def stream(i: int) -> None:
            started = time.monotonic()
            body = {"model": "fake-model", "messages": [{"role": "user", "content": f"s{i}"}]}
            with httpx.stream(
                "POST",
                url + "/v1/chat/completions",
                json=body | {"stream": True},
                headers=auth,
                timeout=60,
            ) as response:
                lines = [line for line in response.iter_lines() if line.startswith("data: ")]
            results[i] = (time.monotonic() - started, lines)

        threads = []
        for i in range(10):  # until one lands on "a" (the others end quickly on "b")
            threads.append(threading.Thread(target=stream, args=(i,)))
            threads[-1].start()
            wait_for(
                lambda i=i: i in results or outstanding_by_replica(url, ADMIN_KEY).get("a"),
                20,
                f"stream {i} to end or wait on a",
            )
            if i not in results:
                break
        assert outstanding_by_replica(url, ADMIN_KEY).get("a") == 1
        httpx.post(f"http://127.0.0.1:{ports['a']}/fake/sick", timeout=5)  # its health fails
        for thread in threads:
            thread.join(30)
        waited, lines = results[len(threads) - 1]
        assert waited < 20  # not a's 120 s, nor the read timeout
        assert lines[-1] == "data: [DONE]"
        error = json.loads(lines[-2][6:])["error"]
        assert error["code"] == "engine_unavailable" and "retry" in error["message"]
