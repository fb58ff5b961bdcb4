"""Two models on one port (ENGINE_MODELS, llama.cpp's router): what a change of model costs.

    python -m bench.model_swap [--rounds 6]

Serves the project's default GGUF under two names (a, b) through `lowvram serve`, first
with both loaded at once (ENGINE_MODELS_LOADED=2), then with one (=1: every change of
model stops one server and starts the other), and measures the time to the first token of
a short streamed request through the gateway: the same model again, and the other model.

Prints a table: median and worst over the rounds, per case.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from lowvram.engine.llamacpp.fetch import resolve_gguf
from lowvram.engine.llamacpp.plan import usable_cores
from lowvram.engine.supervisor import free_port
from lowvram.paths import data_dir

KEY = "bench-model-swap-key"
PROMPT = "What is the capital of France? Answer in one word."


@contextlib.contextmanager
def serving(gguf: Path, loaded: int, workdir: Path) -> Iterator[str]:
    port = free_port()
    env = os.environ | {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_PORT": str(port),
        "GATEWAY_DB_PATH": str(workdir / f"gateway-{loaded}.sqlite3"),
        "ENGINE_LOG_FILE": str(workdir / f"engine-{loaded}.log"),
        "ENGINE_BACKEND": "llamacpp",
        "ENGINE_MODELS": f"a={gguf},b={gguf}",
        "ENGINE_MODELS_LOADED": str(loaded),
        "ENGINE_CONTEXT": "2048",
        "ENGINE_CONCURRENCY": "1",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "lowvram", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"lowvram serve exited with {process.returncode}")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def first_token(url: str, model: str) -> float:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 1,
        "temperature": 0,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    started = time.perf_counter()
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=300
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:]).get("choices"):
                return time.perf_counter() - started
    raise RuntimeError("the stream ended without a token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    gguf = resolve_gguf(None, data_dir() / "models").path
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for loaded in (2, 1):
            with serving(gguf, loaded, Path(tmp)) as url:
                first_token(url, "a"), first_token(url, "b")  # each loaded once
                same, other = [], []
                for _ in range(args.rounds):
                    first_token(url, "a")
                    same.append(first_token(url, "a"))
                    other.append(first_token(url, "b"))
            rows.append((f"{loaded} loaded: the same model again", same))
            rows.append((f"{loaded} loaded: the other model", other))
    print(
        f"\nTwo names for {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) behind one "
        f"gateway, {usable_cores()} threads, {args.rounds} rounds; {os.cpu_count()} cores\n"
    )
    print("| case | TTFT median (ms) | TTFT worst (ms) |")
    print("|---|---|---|")
    for case, times in rows:
        print(f"| {case} | {statistics.median(times) * 1000:.0f} | {max(times) * 1000:.0f} |")


if __name__ == "__main__":
    main()
