"""Two models on one port (ENGINE_MODELS): what a change of model costs.

    python -m bench.model_swap [--rounds 6]                       # CPU: llama.cpp's router
    python -m bench.model_swap --vllm /tmp/m8a /tmp/m8b --vram 24GiB [--streams 16]

CPU: serves the project's default GGUF under two names (a, b) through `lowvram serve`,
first with both loaded at once (ENGINE_MODELS_LOADED=2), then with one (=1: every change
of model stops one server and starts the other).

vLLM (GPU): serves two checkpoints (bench/gpu_models.py makes random-weight ones) as a and
b, an engine each with sleep mode, once at sleep level 1 and once at level 2; besides the
times to first token, it measures nvidia-smi's memory with one awake, and tokens/s for
`--streams` streams all on a against the same streams alternating between a and b in
batches of 8 (issue 17's goal: >= 80%).

Both print a table: median and worst over the rounds, per case. Each case is the time to
the first token of a short streamed request through the gateway: the same model again, and
the other model (a swap where only one is loaded or awake).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from lowvram.engine.llamacpp.fetch import resolve_gguf
from lowvram.engine.llamacpp.plan import usable_cores
from lowvram.paths import data_dir
from tests.helpers import lowvram_serve

KEY = "bench-model-swap-key"
PROMPT = "What is the capital of France? Answer in one word."


@contextlib.contextmanager
def serving(settings: dict[str, str], workdir: Path, tag: str) -> Iterator[str]:
    """`lowvram serve` with these settings until ready (its files in `workdir`/`tag`)."""
    own = workdir / tag
    own.mkdir(parents=True, exist_ok=True)
    with lowvram_serve(own, {"GATEWAY_API_KEYS": KEY} | settings, ready_timeout=1200) as served:
        yield served.url


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


def completion_tokens(url: str, model: str, tokens: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "ignore_eos": True,  # vLLM's and llama.cpp's own field: a fixed length
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    answer = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
    answer.raise_for_status()
    return int(answer.json()["usage"]["completion_tokens"])


def tokens_per_s(url: str, models: list[str], tokens: int) -> float:
    """All of `models` (one request each) at once; completion tokens over the wall time."""
    started = time.perf_counter()
    with ThreadPoolExecutor(len(models)) as pool:
        done = sum(pool.map(lambda m: completion_tokens(url, m, tokens), models))
    return done / (time.perf_counter() - started)


def swap_times(url: str, rounds: int) -> tuple[list[float], list[float]]:
    first_token(url, "a"), first_token(url, "b")  # each served once
    same, other = [], []
    for _ in range(rounds):
        first_token(url, "a")
        same.append(first_token(url, "a"))
        other.append(first_token(url, "b"))
    return same, other


def gpu_used_mib() -> str:
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()


def table(rows: list[tuple[str, list[float]]]) -> None:
    print("| case | TTFT median (ms) | TTFT worst (ms) |")
    print("|---|---|---|")
    for case, times in rows:
        print(f"| {case} | {statistics.median(times) * 1000:,.0f} | {max(times) * 1000:,.0f} |")


def on_cpu(rounds: int, workdir: Path) -> None:
    gguf = resolve_gguf(None, data_dir() / "models").path
    rows: list[tuple[str, list[float]]] = []
    for loaded in (2, 1):
        settings = {
            "ENGINE_BACKEND": "llamacpp",
            "ENGINE_MODELS": f"a={gguf},b={gguf}",
            "ENGINE_MODELS_LOADED": str(loaded),
            "ENGINE_CONTEXT": "2048",
            "ENGINE_CONCURRENCY": "1",
        }
        with serving(settings, workdir, f"loaded-{loaded}") as url:
            same, other = swap_times(url, rounds)
        rows.append((f"{loaded} loaded: the same model again", same))
        rows.append((f"{loaded} loaded: the other model", other))
    print(
        f"\nTwo names for {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) behind one "
        f"gateway, {usable_cores()} threads, {rounds} rounds; {os.cpu_count()} cores\n"
    )
    table(rows)


def on_gpu(args: argparse.Namespace, workdir: Path) -> None:
    a, b = args.vllm
    rows: list[tuple[str, list[float]]] = []
    speeds = []
    for level in (1, 2):
        settings = {
            "ENGINE_BACKEND": "vllm",
            "ENGINE_MODELS": f"a={a},b={b}",
            "ENGINE_VRAM": args.vram,
            "ENGINE_SLEEP_LEVEL": str(level),
            "ENGINE_CONCURRENCY": str(args.streams),
        }
        started = time.perf_counter()
        with serving(settings, workdir, f"level-{level}") as url:
            print(f"level {level}: ready in {time.perf_counter() - started:.1f} s", flush=True)
            same, other = swap_times(url, args.rounds)
            print(f"level {level}: nvidia-smi {gpu_used_mib()} MiB used, one awake", flush=True)
            alone = tokens_per_s(url, ["a"] * args.streams, args.tokens)
            half = args.streams // 2
            batches = (["a"] * 8 + ["b"] * 8) * max(1, half // 8)
            alternating = tokens_per_s(url, batches[: args.streams], args.tokens)
        rows.append((f"level {level}: the same model again", same))
        rows.append((f"level {level}: the other model (a swap)", other))
        speeds.append((level, alone, alternating))
    print(f"\nTwo vLLM engines ({a}, {b}) within {args.vram}, {args.rounds} rounds\n")
    table(rows)
    print(f"\n| level | {args.streams} streams on a (tok/s) | alternating a, b by 8 | ratio |")
    print("|---|---|---|---|")
    for level, alone, alternating in speeds:
        print(f"| {level} | {alone:.1f} | {alternating:.1f} | {alternating / alone:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--vllm", nargs=2, metavar="MODEL", help="two checkpoints: GPU runs")
    parser.add_argument("--vram", default="24GiB")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, help="keep the logs here (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.work or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.vllm:
            on_gpu(args, workdir)
        else:
            on_cpu(args.rounds, workdir)


if __name__ == "__main__":
    main()
