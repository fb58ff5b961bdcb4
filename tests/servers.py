"""Run real uvicorn servers on 127.0.0.1 in background threads, for as long as a test needs.

Port 0 lets the OS pick a free port; we read the bound port back, so tests never race for one.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; bounded, and says what it waited for if it fails."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.01)


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
    try:
        return httpx.get(f"{base_url}/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@dataclass
class ServeProcess:
    """A running `lowvram serve`: its process, its URL, and the log it writes."""

    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def lowvram_serve(
    workdir: Path, env: dict[str, str], args: Sequence[str] = (), ready_timeout: float = 600
) -> Iterator[ServeProcess]:
    """Run `lowvram serve` on a free port until ready; SIGTERM it (then kill) on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = workdir / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", *args],
            cwd=workdir,
            env=os.environ | env | {"GATEWAY_PORT": str(port)},
            stdout=log,
            stderr=log,
        )
        served = ServeProcess(process, f"http://127.0.0.1:{port}", log_path)
        try:
            wait_for(
                lambda: is_ready(served.url) or process.poll() is not None,
                ready_timeout,
                "lowvram serve to be ready",
            )
            assert process.poll() is None, served.output()[-4000:]
            yield served
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(120)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(30)
