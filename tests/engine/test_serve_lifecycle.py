"""`lowvram serve` as a process: one command starts both, SIGTERM drains, no engine is orphaned.

The engine is the test double of vLLM's server (ENGINE_COMMAND), planned for a what-if GPU.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import FAKE_ENGINE, FIXTURES, alive, lowvram_serve, wait_for

KEY = "lifecycle-key-0001"


def serve_env(tmp_path: Path, drain_seconds: int) -> dict[str, str]:
    return {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_DRAIN_SECONDS": str(drain_seconds),
        "ENGINE_BACKEND": "vllm",
        "ENGINE_COMMAND": " ".join(FAKE_ENGINE),
        "ENGINE_MODEL": str(FIXTURES / "qwen2.5-7b-instruct"),
        "ENGINE_GPU_MEMORY": "24GiB",
        "ENGINE_HOST_MEMORY": "64GiB",
        "ENGINE_VRAM": "16GiB",
        "FAKE_STATE_DIR": str(tmp_path),
    }


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    with lowvram_serve(tmp_path, serve_env(tmp_path, 20), ready_timeout=60) as process:
        yield process.process, process.url, tmp_path


def test_the_banner_comes_once_the_engine_is_ready_and_its_output_is_in_a_file(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    _, url, tmp_path = served
    wait_for(lambda: "Stop with Ctrl-C" in (tmp_path / "serve.log").read_text(), 10, "banner")
    output = (tmp_path / "serve.log").read_text()
    banner = output.index("lowvram is ready: " + url + "/v1")
    assert output.index("vLLM ready:") < banner  # the engine's summary, then the banner
    assert output.count("lowvram is ready") == 1
    assert "No API key yet" not in output  # GATEWAY_API_KEYS is set
    # The engine's own lines are in its log file, not in the gateway's output.
    assert "fake engine start" in (tmp_path / "engine.log").read_text()
    assert "fake engine start" not in output


def stream_started(url: str, body: dict[str, Any]) -> tuple[threading.Thread, list[str]]:
    """A client streaming `body` from its own thread, once its first events are in; the
    list fills with the `data:` lines as they come."""
    received: list[str] = []

    def consume() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=30
        ) as response:
            received.extend(line for line in response.iter_lines() if line.startswith("data: "))

    client = threading.Thread(target=consume)
    client.start()
    wait_for(lambda: len(received) >= 2, 10, "the stream to start")
    return client, received


def engine_pid(tmp_path: Path) -> int:
    log = (tmp_path / "engine.log").read_text()
    line = next(line for line in log.splitlines() if "fake engine start" in line)
    return int(line.rsplit("pid ", 1)[1])


def test_sigterm_drains_in_flight_streams_then_stops_the_engine(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, url, tmp_path = served
    engine = engine_pid(tmp_path)
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"tokens": 20, "delay": 0.1},
    }
    client, received = stream_started(url, body)
    process.send_signal(signal.SIGTERM)
    client.join(30)
    assert received[-1] == "data: [DONE]" and len(received) == 21  # 20 tokens, nothing cut
    # uvicorn re-raises the signal it handled once it has shut down cleanly.
    assert process.wait(30) in (0, -signal.SIGTERM)
    wait_for(lambda: not alive(engine), 10, "the engine to be gone")


def test_a_killed_gateway_takes_its_engine_with_it(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    process, _, tmp_path = served
    engine = engine_pid(tmp_path)
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    wait_for(lambda: not alive(engine), 10, "the engine to follow its parent")


def test_a_stream_still_running_when_the_drain_time_ends_gets_an_error_and_done(
    tmp_path: Path,
) -> None:
    with lowvram_serve(tmp_path, serve_env(tmp_path, 1), ready_timeout=60) as served:
        body: dict[str, Any] = {
            "model": "default",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "fake": {"tokens": 200, "delay": 0.05},
        }
        client, received = stream_started(served.url, body)
        served.process.send_signal(signal.SIGTERM)
        client.join(30)
        assert received[-1] == "data: [DONE]" and len(received) < 200
        error = json.loads(received[-2][6:])["error"]
        assert error["code"] == "gateway_shutting_down"
        served.process.wait(30)
    with sqlite3.connect(tmp_path / "gateway.sqlite3") as conn:
        (status,) = conn.execute("SELECT status FROM usage WHERE endpoint = 'chat'").fetchone()
    assert status == 503


def test_ctrl_c_stops_cleanly_and_a_second_one_cuts_streams_quietly(
    served: tuple[subprocess.Popen[bytes], str, Path],
) -> None:
    """SIGINT is Ctrl-C: one line, exit 0, no traceback; a second one during the drain cuts
    what still streams without "Exception in ASGI application"."""
    process, url, tmp_path = served
    engine = engine_pid(tmp_path)
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"tokens": 400, "delay": 0.05},
    }
    client, received = stream_started(url, body)
    process.send_signal(signal.SIGINT)
    wait_for(lambda: "Shutting down" in (tmp_path / "serve.log").read_text(), 10, "the drain")
    process.send_signal(signal.SIGINT)
    assert process.wait(30) == 0
    client.join(30)
    output = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in output and "Exception in ASGI application" not in output
    assert output.rstrip().endswith("lowvram stopped.")
    assert received and received[-1] == "data: [DONE]"  # the cut stream ended properly
    wait_for(lambda: not alive(engine), 10, "the engine to be gone")
