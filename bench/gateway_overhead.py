"""What the gateway adds: the fake upstream straight, and through the gateway, in one run.

    .venv/bin/python -m bench.gateway_overhead [--requests 400] [--streams 32] [--rounds 3]

Starts the fake upstream (tests/doubles, a test double that streams pre-built chunks on a
fixed schedule, as an engine emits tokens), one `lowvram serve --upstream` process per
transport, and a bare relay (uvicorn + aiohttp passing bytes through, nothing else) as the
floor any Python relay pays on this machine. Each runs as its own process; one aiohttp
client drives every path, interleaving them so that drift hits all alike.

Prints, per path:
- added time to first token, p50 and p99 (sequential requests, first data chunk);
- added inter-chunk gap, p99 (8 streams, a chunk every 10 ms);
- throughput over direct at 32 concurrent streams paced at 100 chunks/s each (an engine's
  pace, one event per read: the relay must keep up), median of the rounds; and unpaced
  (events back to back, many per read; CPU-bound: client, relay and fake share the cores),
  also as a fraction of the bare relay's;
- the relay's CPU time (user + system, from /proc) per relayed chunk, paced and unpaced.

The targets (issue 11) are relative to the bare relay measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from lowvram.engine.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-client-key-0001"
UPSTREAM_KEY = "bench-upstream-key"
PACED = {"tokens": 500, "delay": 0.01}


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        args, cwd=ROOT, env=os.environ | env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


async def wait_http(url: str, headers: dict[str, str] | None = None, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url, headers=headers) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(url)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Stream:
    ttft: float
    gaps: list[float]
    chunks: int


@dataclass
class Path_:
    name: str
    url: str
    headers: dict[str, str]
    pid: int | None


async def one_stream(session: aiohttp.ClientSession, path: Path_, fake: dict[str, float]) -> Stream:
    body = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": True,
        "max_tokens": 3000,
        "fake": fake,
    }
    started = time.perf_counter()
    last, ttft, gaps, chunks = started, 0.0, [], 0
    async with session.post(
        path.url + "/v1/chat/completions", json=body, headers=path.headers
    ) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            now = time.perf_counter()
            if chunks == 0:
                ttft = now - started
            else:
                gaps.append(now - last)
            last, chunks = now, chunks + 1
    return Stream(ttft, gaps, chunks)


async def concurrent(
    session: aiohttp.ClientSession, path: Path_, fake: dict[str, float], n: int
) -> tuple[float, float | None]:
    """(chunks per second, relay CPU seconds per chunk) for n streams at once."""
    cpu_before = cpu_seconds(path.pid) if path.pid else 0.0
    began = time.perf_counter()
    runs = await asyncio.gather(*(one_stream(session, path, fake) for _ in range(n)))
    elapsed = time.perf_counter() - began
    chunks = sum(r.chunks for r in runs)
    cpu = (cpu_seconds(path.pid) - cpu_before) / chunks if path.pid else None
    return chunks / elapsed, cpu


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    paths: list[Path_], n: int, streams: int, rounds: int
) -> dict[str, dict[str, Any]]:
    direct, relays = paths[0], paths[1:]
    ttft: dict[str, list[float]] = {p.name: [] for p in paths}
    gaps: dict[str, list[float]] = {}
    paced: dict[str, list[float]] = {p.name: [] for p in paths}
    cpu: dict[str, list[float]] = {p.name: [] for p in relays}
    unpaced: dict[str, float] = {}
    unpaced_cpu: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for path in paths:  # warm up connections and code paths
            for _ in range(20):
                await one_stream(session, path, {"tokens": 4})
        for _ in range(n):
            for path in paths:
                ttft[path.name].append((await one_stream(session, path, {"tokens": 4})).ttft)
        for path in paths:
            runs = await asyncio.gather(
                *(one_stream(session, path, {"tokens": 100, "delay": 0.01}) for _ in range(8))
            )
            gaps[path.name] = [g for r in runs for g in r.gaps]
        for _ in range(rounds):
            for path in paths:
                rate, per_chunk = await concurrent(session, path, PACED, streams)
                paced[path.name].append(rate)
                if per_chunk is not None:
                    cpu[path.name].append(per_chunk)
        for path in paths:
            rate, per_chunk = await concurrent(session, path, {"tokens": 2000}, streams)
            unpaced[path.name] = rate
            if per_chunk is not None:
                unpaced_cpu[path.name] = per_chunk
    ms, base, bare = 1000.0, direct.name, relays[-1].name
    results: dict[str, dict[str, Any]] = {}
    for path in relays:
        name = path.name
        results[name] = {
            "ttft_p50": (pct(ttft[name], 0.5) - pct(ttft[base], 0.5)) * ms,
            "ttft_p99": (pct(ttft[name], 0.99) - pct(ttft[base], 0.99)) * ms,
            "gap_p99": (pct(gaps[name], 0.99) - pct(gaps[base], 0.99)) * ms,
            "ratio": statistics.median(
                a / b for a, b in zip(paced[name], paced[base], strict=True)
            ),
            "unpaced_ratio": unpaced[name] / unpaced[base],
            "unpaced_vs_bare": unpaced[name] / unpaced[bare],
            "cpu": statistics.median(cpu[name]) * 1e6,
            "unpaced_cpu": unpaced_cpu[name] * 1e6,
        }
    floor = results[bare]
    for values in results.values():
        values["ttft_over_bare"] = values["ttft_p50"] - floor["ttft_p50"]
        values["cpu_x_bare"] = values["cpu"] / floor["cpu"]
        values["unpaced_cpu_x_bare"] = values["unpaced_cpu"] / floor["unpaced_cpu"]
    results["direct"] = {
        "ttft_p50": pct(ttft[base], 0.5) * ms,
        "paced": statistics.median(paced[base]),
        "unpaced": unpaced[base],
    }
    return results


ROWS = [
    ("added TTFT p50 (ms)", "", "ttft_p50", "{:.2f}", None),
    ("  over the bare relay's (ms)", "<= 1", "ttft_over_bare", "{:+.2f}", lambda v: v <= 1),
    ("added TTFT p99 (ms)", "", "ttft_p99", "{:.2f}", None),
    ("added inter-chunk p99 (ms)", "", "gap_p99", "{:.2f}", None),
    ("throughput vs direct, 32 paced streams", ">= 98%", "ratio", "{:.1%}", lambda v: v >= 0.98),
    ("throughput vs direct, 32 unpaced streams", "", "unpaced_ratio", "{:.1%}", None),
    ("  vs the bare relay's", ">= 0.6", "unpaced_vs_bare", "{:.2f}", lambda v: v >= 0.6),
    ("relay CPU per chunk, paced (us)", "", "cpu", "{:.1f}", None),
    ("  x the bare relay's", "<= 2", "cpu_x_bare", "{:.2f}", lambda v: v <= 2),
    ("relay CPU per chunk, unpaced (us)", "", "unpaced_cpu", "{:.1f}", None),
    ("  x the bare relay's", "<= 2", "unpaced_cpu_x_bare", "{:.2f}", lambda v: v <= 2),
]


def print_table(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    direct = results.pop("direct")
    print(
        f"\ngateway overhead: {args.requests} sequential requests per path, {args.streams} streams,"
        f" {args.rounds} paced rounds; {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    print(
        f"direct: TTFT p50 {direct['ttft_p50']:.2f} ms, {direct['paced']:.0f} chunks/s paced,"
        f" {direct['unpaced']:.0f} chunks/s unpaced\n"
    )
    print("| measure | target | " + " | ".join(results) + " |")
    print("|" + "---|" * (2 + len(results)))
    for title, target, key, fmt, ok in ROWS:
        cells = []
        for name, values in results.items():
            cell = fmt.format(values[key])
            if ok is not None and not name.startswith("bare"):
                cell += " ok" if ok(values[key]) else " MISSED"
            cells.append(cell)
        print(f"| {title} | {target} | " + " | ".join(cells) + " |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--requests", type=int, default=400, help="sequential TTFT samples per path"
    )
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--transports", default="aiohttp,httpx")
    args = parser.parse_args()

    python = sys.executable
    upstream_port = free_port()
    direct_url = f"http://127.0.0.1:{upstream_port}"
    upstream_auth = {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    processes = [
        start([python, "-m", "tests.doubles.fake_upstream", str(upstream_port), UPSTREAM_KEY], {})
    ]
    paths = [Path_("direct", direct_url, upstream_auth, None)]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            await wait_http(direct_url + "/v1/models", upstream_auth)
            for transport in args.transports.split(","):
                port = free_port()
                gateway = start(
                    [
                        python,
                        "-m",
                        "lowvram",
                        "serve",
                        "--upstream",
                        direct_url,
                        "--port",
                        str(port),
                    ],
                    {
                        "GATEWAY_API_KEYS": KEY,
                        "GATEWAY_UPSTREAM_API_KEY": UPSTREAM_KEY,
                        "GATEWAY_UPSTREAM_TRANSPORT": transport,
                        "GATEWAY_DB_PATH": f"{tmp}/{transport}.sqlite3",
                    },
                )
                processes.append(gateway)
                url = f"http://127.0.0.1:{port}"
                await wait_http(url + "/ready")
                paths.append(
                    Path_(
                        f"gateway ({transport})",
                        url,
                        {"Authorization": f"Bearer {KEY}"},
                        gateway.pid,
                    )
                )
            port = free_port()
            bare = start([python, "-m", "bench.bare_relay", str(port), direct_url], {})
            processes.append(bare)
            await wait_http(f"http://127.0.0.1:{port}/ready")
            paths.append(
                Path_("bare relay (floor)", f"http://127.0.0.1:{port}", upstream_auth, bare.pid)
            )
            results = await measure(paths, args.requests, args.streams, args.rounds)
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)
    print_table(results, args)


if __name__ == "__main__":
    asyncio.run(main())
