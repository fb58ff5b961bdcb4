"""Many streams at once through the gateway: errors, and whether memory and file
descriptors come back to where they were.

    python -m bench.load_streams [--streams 1000] [--tokens 50] [--delay 0.02]

Starts the fake upstream (a test double streaming at an engine's pace) and `lowvram serve
--upstream` in front of it with its default settings, opens N streams at once with one
aiohttp client, and checks each got 200, every token and `[DONE]`. The gateway's resident
memory and open file descriptors (from /proc) are read before, at the peak, and after.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from lowvram.engine.supervisor import free_port

KEY = "bench-client-key-0001"
UPSTREAM_KEY = "bench-upstream-key"
ROOT = Path(__file__).resolve().parent.parent


def rss_and_fds(pid: int) -> tuple[float, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            try:
                async with session.get(url + "/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


async def one_stream(
    session: aiohttp.ClientSession, url: str, tokens: int, delay: float
) -> str | None:
    """None if the stream was whole, else what went wrong."""
    body = {
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "fake": {"tokens": tokens, "delay": delay},
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    try:
        async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status != 200:
                return f"HTTP {r.status}"
            data = [line async for line in r.content if line.startswith(b"data: ")]
    except aiohttp.ClientError as exc:
        return type(exc).__name__
    if data[-1].strip() != b"data: [DONE]" or len(data) != tokens + 1:
        return f"{len(data)} events"
    return None


async def waves(
    url: str, pid: int, args: argparse.Namespace
) -> list[tuple[tuple[float, int], tuple[float, int], list[str | None], float]]:
    """Each wave: (peak RSS and fds, after them, the streams' outcomes, seconds).

    A client per wave, closed before the wave's "after": what stays open then is the
    gateway's own (its pool of connections to the engine), not the client's keep-alives.
    """
    out = []
    timeout = aiohttp.ClientTimeout(total=300)
    for _ in range(args.waves):
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            peak = rss_and_fds(pid)
            started = time.perf_counter()
            tasks = [
                asyncio.ensure_future(one_stream(session, url, args.tokens, args.delay))
                for _ in range(args.streams)
            ]
            while not all(t.done() for t in tasks):
                await asyncio.sleep(0.2)
                current = rss_and_fds(pid)
                peak = (max(peak[0], current[0]), max(peak[1], current[1]))
            elapsed = time.perf_counter() - started
        await asyncio.sleep(2)  # connections closed on both sides, timers fired
        out.append((peak, rss_and_fds(pid), [t.result() for t in tasks], elapsed))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=50)
    parser.add_argument("--delay", type=float, default=0.02)
    parser.add_argument("--waves", type=int, default=3)
    args = parser.parse_args()

    upstream_port, port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{upstream_port}"
    url = f"http://127.0.0.1:{port}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    double = [sys.executable, "-m", "tests.doubles.fake_upstream", str(upstream_port)]
    serve = [sys.executable, "-m", "lowvram", "serve", "--upstream", upstream, "--port", str(port)]
    with tempfile.TemporaryDirectory() as tmp:
        fake = subprocess.Popen([*double, UPSTREAM_KEY], **quiet)  # type: ignore[call-overload]
        env = os.environ | {
            "GATEWAY_API_KEYS": KEY,
            "GATEWAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
            "GATEWAY_DB_PATH": f"{tmp}/gateway.sqlite3",
        }
        gateway = subprocess.Popen(serve, env=env, **quiet)  # type: ignore[call-overload]
        try:
            asyncio.run(wait_ready(url))
            before = rss_and_fds(gateway.pid)
            measured = asyncio.run(waves(url, gateway.pid, args))
        finally:
            gateway.terminate()
            fake.terminate()
            gateway.wait(30)
            fake.wait(30)
    every = f"every {args.delay * 1000:.0f} ms"
    print(
        f"\n{args.waves} waves of {args.streams} concurrent streams ({args.tokens} tokens {every})"
        f" through the gateway with its default settings; {os.cpu_count()} cores\n"
    )
    print(f"before: RSS {before[0]:.1f} MiB, {before[1]} open fds\n")
    print(
        "| wave | streams whole | errors | seconds | peak RSS (MiB) | peak fds | after: RSS | fds |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, (peak, after, results, elapsed) in enumerate(measured, 1):
        errors = [r for r in results if r is not None]
        detail = f" {sorted(set(errors))[:3]}" if errors else ""
        print(
            f"| {i} | {len(results) - len(errors)}/{len(results)} | {len(errors)}{detail} | "
            f"{elapsed:.1f} | {peak[0]:.1f} | {peak[1]} | {after[0]:.1f} | {after[1]} |"
        )


if __name__ == "__main__":
    main()
