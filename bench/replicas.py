"""Replicas behind one gateway: aggregate tokens/s of N streams with every replica up, then
with one killed, side by side in one run of `lowvram serve`.

    python -m bench.replicas --model DIR --gpus 2 --vram 20GiB --concurrency 16 --streams 16
    python -m bench.replicas --backend llamacpp --replicas 2 --streams 4 --max-tokens 64

It starts `lowvram serve` managing the replicas (vLLM: one per GPU, as the planner chooses
for a model that fits one; llama.cpp: ENGINE_REPLICAS servers), sends N streams of a fixed
length (`ignore_eos`) through the gateway, then SIGKILLs one engine's process group and,
once `/ready` shows it out, sends the same streams to the pool's survivor (its supervisor is
restarting it meanwhile: vLLM takes a minute or more to load). Prints a markdown table;
`--out FILE` writes it there too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lowvram.engine.supervisor import free_port
from tests.helpers import child_processes, replica_states, wait_for

KEY = "bench-replicas-key-0001"
ADMIN = "bench-replicas-admin-0001"
ENGINES = (b"vllm.entrypoints", b"llama-server")


def all_ready(url: str) -> bool:
    """Ready, and every replica too (a single engine has no list)."""
    try:
        body = httpx.get(url + "/ready", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return False
    return body.get("status") == "ready" and all(
        r["state"] == "ready" for r in body.get("replicas", [])
    )


def engines_of(parent: int) -> list[int]:
    """The engine processes `lowvram serve` started (its children), oldest first."""
    return child_processes(parent, ENGINES)


async def one_stream(
    client: httpx.AsyncClient, url: str, i: int, max_tokens: int
) -> tuple[int, float, float]:
    """Completion tokens, seconds to the first token, seconds in all."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": f"Stream {i}: write a long story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0.7,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first is None and event.get("choices"):
                first = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return tokens, first or 0.0, time.perf_counter() - start


async def measure(url: str, streams: int, max_tokens: int) -> dict[str, float]:
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(headers=headers, timeout=600, limits=limits) as client:
        await asyncio.gather(*(one_stream(client, url, -i, 8) for i in range(streams)))  # warm
        start = time.perf_counter()
        results = await asyncio.gather(
            *(one_stream(client, url, i, max_tokens) for i in range(streams))
        )
        wall = time.perf_counter() - start
    tokens = sum(r[0] for r in results)
    return {
        "tokens": tokens,
        "wall": wall,
        "tok_s": tokens / wall,
        "ttft_p50": statistics.median(r[1] for r in results),
        "per_stream": statistics.median(r[0] / max(1e-9, r[2] - r[1]) for r in results),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--backend", default="vllm", choices=["vllm", "llamacpp"])
    parser.add_argument("--gpus", type=int)
    parser.add_argument("--replicas", type=int)
    parser.add_argument("--vram")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--ready-timeout", type=float, default=480)
    parser.add_argument("--no-kill", action="store_true", help="measure all replicas only")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-replicas-"))
    port = free_port()
    env = os.environ | {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_ADMIN_API_KEYS": ADMIN,
        "GATEWAY_PORT": str(port),
        "GATEWAY_DB_PATH": str(work / "gateway.sqlite3"),
        "ENGINE_LOG_FILE": str(work / "engine.log"),
        "ENGINE_BACKEND": args.backend,
        "ENGINE_CONTEXT": str(args.context),
    }
    for name, value in (
        ("ENGINE_MODEL", args.model),
        ("ENGINE_GPUS", args.gpus),
        ("ENGINE_REPLICAS", args.replicas),
        ("ENGINE_VRAM", args.vram),
        ("ENGINE_CONCURRENCY", args.concurrency),
    ):
        if value is not None:
            env[name] = str(value)
    url = f"http://127.0.0.1:{port}"
    log = (work / "serve.log").open("wb")
    started = time.monotonic()
    serve = subprocess.Popen(
        [sys.executable, "-m", "lowvram", "serve"], env=env, stdout=log, stderr=log
    )
    rows: list[tuple[str, dict[str, float]]] = []
    try:
        wait_for(
            lambda: serve.poll() is not None or all_ready(url),
            args.ready_timeout,
            "every replica ready",
            interval=0.5,
        )
        if serve.poll() is not None:
            raise RuntimeError("lowvram serve exited:\n" + (work / "serve.log").read_text()[-3000:])
        ready_after = time.monotonic() - started
        replicas = len(replica_states(url)) or 1
        rows.append(
            (f"{replicas} replicas", asyncio.run(measure(url, args.streams, args.max_tokens)))
        )
        if not args.no_kill:
            victim = engines_of(serve.pid)[-1]
            os.killpg(victim, signal.SIGKILL)
            wait_for(
                lambda: list(replica_states(url).values()).count("ready") == replicas - 1,
                60,
                "the kill noticed",
                interval=0.5,
            )
            measured = asyncio.run(measure(url, args.streams, args.max_tokens))
            rows.append((f"{replicas - 1} (one killed)", measured))
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(120)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()

    ready_lines = [
        json.loads(line)["msg"]
        for line in (work / "serve.log").read_text().splitlines()
        if line.startswith("{") and "ready:" in line and '"replica"' in line
    ]
    base = rows[-1][1]["tok_s"]
    table = [
        f"{args.streams} streams x {args.max_tokens} tokens through the gateway; "
        f"all replicas ready after {ready_after:.0f} s",
        "",
        "| replicas serving | tokens/s in all | vs the last row | TTFT p50 | tok/s per stream |",
        "|---|---|---|---|---|",
    ]
    for label, row in rows:
        table.append(
            f"| {label} | {row['tok_s']:.1f} | {row['tok_s'] / base:.2f}x | "
            f"{row['ttft_p50'] * 1000:.0f} ms | {row['per_stream']:.1f} |"
        )
    table += ["", *(f"- {line}" for line in ready_lines)]
    text = "\n".join(table)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
