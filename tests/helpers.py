"""What many tests share: servers on loopback, bounded waits, the error shape, the engine double.

`serve` runs a real uvicorn server on 127.0.0.1 in a background thread for as long as a test
needs (port 0: the OS picks a free port, read back, so tests never race for one);
`lowvram_serve` runs the real `lowvram serve` command as a process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from lowvram.engine.hardware import GpuFacts, Hardware, HostFacts
from lowvram.engine.settings import EngineSettings
from lowvram.engine.supervisor import Timing, free_port
from lowvram.engine.units import GiB
from lowvram.engine.vllm.backend import VllmBackend
from lowvram.engine.vllm.model import load_model_facts

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "engine" / "fixtures"
FAKE_ENGINE = [sys.executable, "-m", "tests.doubles.fake_engine"]
"""The test double of vLLM's server (tests/doubles/fake_engine.py), run from the repo root."""
FAST = Timing(backoff_base=0.1, stop_grace=2, poll_interval=0.1)
"""Supervisor timing for tests: quick restarts and stops."""
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
"""The chat tool the client tests offer (Ollama's tools have the same shape)."""


def lowvram_keys(db: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`lowvram keys ...` against the database at `db`, as a process."""
    return subprocess.run(
        [sys.executable, "-m", "lowvram", "keys", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ | {"GATEWAY_DB_PATH": str(db)},
    )


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The response is an OpenAI error object with this status (and code): return it."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def engine_settings(tmp_path: Path, **values: Any) -> EngineSettings:
    """Settings for a managed engine in a test: nothing from the environment or `.env`."""
    defaults: dict[str, Any] = {
        "ready_timeout": 30,
        "models_dir": tmp_path / "models",
        "log_file": tmp_path / "engine.log",
        "command": " ".join(FAKE_ENGINE),
    }
    return EngineSettings(_env_file=None, **(defaults | values))  # type: ignore[call-arg]


TEST_MACHINE = Hardware(
    (GpuFacts("test GPU", 24 * GiB, 24 * GiB, (8, 9)),), HostFacts(64 * GiB, 64 * GiB)
)


def fake_vllm(tmp_path: Path, vram_gib: float = 16, **values: Any) -> VllmBackend:
    """vLLM's backend planning a 7B on a 24 GiB test GPU, started as the engine test double."""
    settings = engine_settings(tmp_path, vram=int(vram_gib * GiB), **values)
    model = load_model_facts(str(FIXTURES / "qwen2.5-7b-instruct"))
    return VllmBackend(model, TEST_MACHINE, settings, measure_vram=lambda _: None)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: it only waits for its parent to read its status.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(")")[1].split()[0] != "Z"


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> None:
    """Poll `condition` until it holds; bounded, and says what it waited for if it fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(interval)


@contextmanager
def serve(app: Any, **config: Any) -> Iterator[str]:
    """Serve an ASGI app on 127.0.0.1; yield its base URL; stop it on exit."""
    options: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "log_level": "warning",
        "timeout_graceful_shutdown": 5,
    }
    server = uvicorn.Server(uvicorn.Config(app, **(options | config)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 20, "the server to start")
    if not server.started:
        raise RuntimeError("server failed to start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


def wait_ready(base_url: str, timeout: float = 20) -> None:
    wait_for(lambda: is_ready(base_url), timeout, f"{base_url}/ready")


def is_ready(base_url: str) -> bool:
    return ready_state(base_url) == "ready"


def replica_states(base_url: str) -> dict[str, str]:
    """Each replica's state on /ready, by name ({} for a single engine or no answer)."""
    try:
        body = httpx.get(f"{base_url}/ready", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {r["name"]: r["state"] for r in body.get("replicas", [])}


def ready_state(base_url: str) -> str | None:
    """What /ready says: ready, starting, restarting, failed...; None if nothing answers."""
    try:
        return str(httpx.get(f"{base_url}/ready", timeout=2).json()["status"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


@dataclass
class ServeProcess:
    """A running `lowvram serve`: its process, its URL, and the log it writes."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path
    """What `lowvram serve` printed (stdout and stderr)."""
    engine_log: Path
    """The engine's own output (ENGINE_LOG_FILE)."""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def engine_output(self) -> str:
        return self.engine_log.read_text(errors="replace") if self.engine_log.exists() else ""


def _isolated(workdir: Path) -> dict[str, str]:
    """A served gateway's own key database and engine log; the model and build caches are
    the user's (a test must not fetch or build again what `make serve` already has)."""
    return {
        "GATEWAY_DB_PATH": str(workdir / "gateway.sqlite3"),
        "ENGINE_LOG_FILE": str(workdir / "engine.log"),
        # For the engine test double (tests.doubles.fake_engine), beside what is there.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


@contextmanager
def lowvram_serve(
    workdir: Path, env: dict[str, str], args: Sequence[str] = (), ready_timeout: float = 600
) -> Iterator[ServeProcess]:
    """Run `lowvram serve` on a free port until ready; SIGTERM it (then kill) on exit."""
    port = free_port()
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "lowvram", "serve", *args],
            cwd=workdir,
            env=os.environ | _isolated(workdir) | env | {"GATEWAY_PORT": str(port)},
            stdout=log,
            stderr=log,
        )
        engine_log = Path(env.get("ENGINE_LOG_FILE", workdir / "engine.log"))
        served = ServeProcess(process, f"http://127.0.0.1:{port}", log_path, engine_log)
        try:
            settled = ("ready", "failed")
            wait_for(
                lambda: ready_state(served.url) in settled or process.poll() is not None,
                ready_timeout,
                "lowvram serve to be ready",
            )
            assert ready_state(served.url) == "ready", served.output()[-4000:]
            yield served
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(30)


def asked(**values: Any) -> EngineSettings:
    """Engine settings holding only what a test asks for (a budget, a context...)."""
    return EngineSettings(_env_file=None, **values)  # type: ignore[call-arg]


# --- several engines: streams under way, processes, per-replica metrics -------------------


def start_streams(
    url: str, bodies: Sequence[dict[str, Any]], headers: dict[str, str], timeout: float
) -> list[Future[list[str]]]:
    """Send each body as a stream, each from its own thread, and return once every one has
    its first event (its engine has the request). Each future gives its `data:` lines."""
    first_events = threading.Semaphore(0)

    def stream(body: dict[str, Any]) -> list[str]:
        data: list[str] = []
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout
        ) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data.append(line[6:])
                    if len(data) == 1:
                        first_events.release()
        return data

    pool = ThreadPoolExecutor(len(bodies))
    futures = [pool.submit(stream, body) for body in bodies]
    pool.shutdown(wait=False)
    for _ in bodies:
        assert first_events.acquire(timeout=timeout), "a stream never started"
    return futures


def outstanding_by_replica(url: str, admin_key: str) -> dict[str, float]:
    """`lowvram_replica_outstanding_requests` from /metrics, by replica name."""
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {admin_key}"}).text
    prefix = "lowvram_replica_outstanding_requests{replica="
    return {
        line[len(prefix) + 1 : line.index('"}')]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(prefix)
    }


def child_processes(parent: int, names: Sequence[bytes]) -> list[int]:
    """Pids of `parent`'s children whose command line holds one of `names`, oldest first."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and any(name in command for name in names):
            found.append(int(stat.parent.name))
    return sorted(found)
