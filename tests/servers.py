"""Run real uvicorn servers on 127.0.0.1 in background threads, for as long as a test needs.

Port 0 lets the OS pick a free port; we read the bound port back, so tests never race for one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    def ready() -> bool:
        try:
            return httpx.get(f"{base_url}/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout, f"{base_url}/ready")
