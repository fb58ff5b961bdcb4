"""The CPU engine: llama.cpp's own server against llama-cpp-python's, same model, one run.

    python -m bench.cpu_engines --llama-cpp-python /path/to/venv/bin/python [--rounds 5]

Starts both servers on the same GGUF (the project's default model) with the same context
and threads, one at a time on this machine's cores, and asks each the same prompts,
interleaving the rounds so that drift hits both alike. llama-cpp-python must be installed
in the interpreter given (with its `[server]` extra); it is no longer a dependency here.

Prints, per engine: time to first token (the median over the rounds, a short and a
~500-token prompt, streamed) and decode tokens/s after the first token (one stream, up to
128 tokens of a prompt that runs long, greedy, so both engines write the same text).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lowvram.engine.llamacpp.build import ensure_server
from lowvram.engine.llamacpp.fetch import resolve_gguf
from lowvram.engine.llamacpp.plan import usable_cores
from lowvram.engine.supervisor import free_port
from lowvram.paths import data_dir

SHORT = "What is the capital of France? Answer in one word."
LONG = "Summarise this in one sentence: " + " ".join(
    f"Sentence {i} says that the river flows north past the old mill." for i in range(40)
)
RUN_LONG = "Write a long story about a lighthouse keeper, in at least 300 words."


@dataclass
class Engine:
    name: str
    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ttft_short: list[float] = field(default_factory=list)
    ttft_long: list[float] = field(default_factory=list)
    decode: list[float] = field(default_factory=list)


@contextlib.contextmanager
def running(engine: Engine, port: int) -> Iterator[str]:
    process = subprocess.Popen(
        [*engine.command, "--host", "127.0.0.1", "--port", str(port)],
        env=os.environ | engine.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    break
            if process.poll() is not None:
                raise RuntimeError(f"{engine.name} exited with {process.returncode}")
            time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(30)


def stream(url: str, prompt: str, max_tokens: int) -> tuple[float, int, float]:
    """(time to first token, tokens received, decode tokens/s after the first)."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not chunk.get("choices") or not chunk["choices"][0]["delta"].get("content"):
                continue
            now = time.perf_counter()
            if tokens == 0:
                first = now
            last, tokens = now, tokens + 1
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return first - started, tokens, decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-cpp-python", required=True, help="python with llama_cpp")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--context", type=int, default=4096)
    args = parser.parse_args()

    model = resolve_gguf(None, data_dir() / "models")
    threads = str(usable_cores())
    server = ensure_server().binary
    engines = [
        Engine(
            "llama.cpp server",
            [
                *(str(server), "--model", str(model.path), "--ctx-size", str(args.context)),
                *("--parallel", "1", "--threads", threads, "--threads-batch", threads),
                *("--jinja", "--no-webui"),
            ],
        ),
        Engine(
            "llama-cpp-python server",
            [
                *(args.llama_cpp_python, "-m", "llama_cpp.server", "--model", str(model.path)),
                *("--n_ctx", str(args.context), "--n_threads", threads),
                *("--n_threads_batch", threads),
            ],
        ),
    ]
    for _ in range(args.rounds):
        for engine in engines:
            with running(engine, free_port()) as url:
                stream(url, SHORT, 4)  # warm up
                engine.ttft_short.append(stream(url, SHORT, 1)[0])
                engine.ttft_long.append(stream(url, LONG, 1)[0])
                engine.decode.append(stream(url, RUN_LONG, 128)[2])
    print(
        f"\nCPU engines on {model.path.name} ({model.path.stat().st_size / 1e6:.0f} MB), "
        f"{threads} threads, context {args.context}, {args.rounds} interleaved rounds; "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}\n"
    )
    print("| engine | TTFT, short prompt (ms) | TTFT, ~500-token prompt (ms) | decode tok/s |")
    print("|---|---|---|---|")
    for engine in engines:
        print(
            f"| {engine.name} | {statistics.median(engine.ttft_short) * 1000:.0f} | "
            f"{statistics.median(engine.ttft_long) * 1000:.0f} | "
            f"{statistics.median(engine.decode):.1f} |"
        )
    print(f"\nllama.cpp server binary: {Path(server)}")


if __name__ == "__main__":
    main()
