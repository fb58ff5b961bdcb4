"""Plan accuracy and speed on a real GPU: for each budget, plan, start vLLM behind the gateway,
measure, stop.

    python -m bench.gpu_plans MODEL_DIR --vram 5 8 16 [--context 2048 --concurrency 8]
        [--quantization auto|none|fp8|bitsandbytes] [--optimize throughput|latency]
        [--long-prompt 30000] [--out results.jsonl] [--tokens 128]
        [--offload-vocab auto|embed|all|none]

Per budget it records: the plan's estimate and the VRAM nvidia-smi shows once ready (the
engine is alone on the card), vLLM's own figures (weights, KV tokens, offloaded GiB), whether
it started on the first try and the rungs used if not, start-up time, decode tokens/s for one
stream and for `--concurrency` streams (ignore_eos, fixed lengths), whether a prompt of
`--long-prompt` tokens is served (and its time to first token), the gateway's added time
to first token (the same requests straight to the engine and through the gateway,
interleaved), and the offload roofline: host-to-device bandwidth (measured first, in its own
process) over the bytes each decode step reads over PCIe (offloaded layers, and the lm_head
where lowvram's plugin put it in host memory), against the achieved steps/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lowvram.engine.errors import PlanError
from lowvram.engine.factory import build_backends
from lowvram.engine.handle import EngineState
from lowvram.engine.hardware import detect_gpus, gpu_memory_used
from lowvram.engine.settings import EngineSettings
from lowvram.engine.supervisor import Supervisor
from lowvram.engine.units import GiB
from lowvram.engine.vllm.backend import VllmBackend
from lowvram.gateway.app import create_app
from lowvram.gateway.settings import GatewaySettings
from tests.helpers import serve

KEY = "bench-gpu-key-0001"

BANDWIDTH_PROBE = """
import torch, time
x = torch.empty(2 * 1024**3, dtype=torch.uint8).pin_memory()
y = torch.empty_like(x, device="cuda")
for _ in range(2): y.copy_(x, non_blocking=True)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(5): y.copy_(x, non_blocking=True)
torch.cuda.synchronize(); print(5 * x.numel() / (time.perf_counter() - t))
"""


@dataclass
class Result:
    model: str
    budget_gib: float
    plan: dict[str, Any] = field(default_factory=dict)
    estimate_gib: float = 0.0
    measured_gib: float | None = None
    first_try: bool = False
    rungs: list[str] = field(default_factory=list)
    startup_s: float | None = None
    observed: dict[str, float] = field(default_factory=dict)
    one_stream_tok_s: float | None = None
    many_streams_tok_s: float | None = None
    long_prompt_ttft_s: float | None = None
    plan_ms: float | None = None
    gateway_ttft_added_ms: float | None = None
    direct_ttft_ms: float | None = None
    ttft_samples_ms: dict[str, list[float]] = field(default_factory=dict)
    offloaded_gib: float = 0.0
    roofline_steps_s: float | None = None
    roofline_ratio: float | None = None
    error: str | None = None


def h2d_bandwidth() -> float:
    out = subprocess.run(
        [sys.executable, "-c", BANDWIDTH_PROBE], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


async def stream_once(
    client: httpx.AsyncClient, url: str, key: str, model: str, tokens: int, prompt: str = ""
) -> tuple[float, float, int]:
    """(time to first token, decode seconds after it, completion tokens) of one stream."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt or "Tell me a long story."}],
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first = last = 0.0
    completion = 0
    async with client.stream(
        "POST", url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                completion = data["usage"]["completion_tokens"]
            elif data.get("choices") and data["choices"][0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
    return first - started, last - first, completion


async def measure(
    result: Result,
    gateway: str,
    engine: str,
    engine_key: str,
    model: str,
    tokens: int,
    streams: int,
    samples: int,
    long_prompt: int,
) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        await stream_once(client, gateway, KEY, "default", 4)  # warm-up
        ttft = {"direct": [], "gateway": []}  # type: dict[str, list[float]]
        for _ in range(samples):
            ttft["direct"].append((await stream_once(client, engine, engine_key, model, 1))[0])
            ttft["gateway"].append((await stream_once(client, gateway, KEY, "default", 1))[0])
        result.ttft_samples_ms = {k: [round(v * 1000, 3) for v in vs] for k, vs in ttft.items()}
        result.direct_ttft_ms = statistics.median(ttft["direct"]) * 1000
        result.gateway_ttft_added_ms = (
            statistics.median(ttft["gateway"]) - statistics.median(ttft["direct"])
        ) * 1000
        _, decode_s, completion = await stream_once(client, gateway, KEY, "default", tokens)
        result.one_stream_tok_s = (completion - 1) / decode_s
        began = time.perf_counter()
        runs = await asyncio.gather(
            *(stream_once(client, gateway, KEY, "default", tokens) for _ in range(streams))
        )
        result.many_streams_tok_s = sum(r[2] for r in runs) / (time.perf_counter() - began)
        if long_prompt:
            # Common words are one token each with the Qwen tokenizer.
            words = ("the", "of", "and", "to", "in", "is", "that", "for")
            text = " ".join(words[i % len(words)] for i in range(long_prompt))
            try:
                ttft, _, _ = await stream_once(client, gateway, KEY, "default", 8, text)
                result.long_prompt_ttft_s = ttft
            except AssertionError as exc:  # the gateway's or the engine's refusal
                result.error = f"long prompt: {exc}"[:500]


def run_one(model_dir: str, vram_gib: float, args: argparse.Namespace, bandwidth: float) -> Result:
    result = Result(model=Path(model_dir).name, budget_gib=vram_gib)
    engine_settings = EngineSettings(
        _env_file=None,  # type: ignore[call-arg]
        vram=int(vram_gib * GiB),
        context=args.context,
        concurrency=args.concurrency,
        quantization=args.quantization,
        optimize=args.optimize,
        offload_vocab=args.offload_vocab,
        model=model_dir,
        backend="vllm",
        ready_timeout=900,
        max_restarts=0,
        log_file=Path(args.work) / "engine.log",
    )
    try:
        planning = time.perf_counter()
        # What `lowvram serve` builds: the factory (which asks whether vLLM has the plugin).
        backends, _ = build_backends(engine_settings)
        backend = backends[0]
        assert isinstance(backend, VllmBackend)
        result.plan_ms = (time.perf_counter() - planning) * 1000
    except PlanError as exc:
        result.error = f"refused: {exc}"
        return result
    first_plan = backend.plan
    supervisor = Supervisor(backend, engine_settings)
    settings = GatewaySettings(
        _env_file=None,  # type: ignore[call-arg]
        api_keys=[KEY],
        db_path=Path(args.work) / "bench.sqlite3",
    )
    started = time.monotonic()
    with serve(create_app(settings, supervisor)) as gateway:
        while (
            supervisor.state not in (EngineState.READY, EngineState.FAILED)
            and time.monotonic() - started < 960
        ):
            time.sleep(0.5)
        result.startup_s = time.monotonic() - started
        plan = backend.plan
        result.plan = plan.model_dump(
            include={
                "quantization",
                "offloaded_layers",
                "max_model_len",
                "max_num_seqs",
                "max_num_batched_tokens",
                "enforce_eager",
                "rung",
                "vocab_offload",
            }
        ) | {
            "kv_cache_tokens": plan.kv_cache_tokens,
            "estimate": {k: round(v / GiB, 3) for k, v in plan.estimate.model_dump().items()},
        }
        result.estimate_gib = plan.estimate.total / GiB
        result.rungs = [a for a in supervisor.attempts if not a.startswith("start on port")]
        result.first_try = plan.rung == 0 and not result.rungs and plan == first_plan
        result.observed = dict(backend.observed)
        if supervisor.state is not EngineState.READY:
            result.error = supervisor.detail[-2000:]
            return result
        used = gpu_memory_used()
        result.measured_gib = used / GiB if used is not None else None
        result.offloaded_gib = plan.host_offload_bytes / GiB
        if plan.pcie_bytes_per_step:
            result.roofline_steps_s = bandwidth / plan.pcie_bytes_per_step
        asyncio.run(
            measure(
                result,
                gateway,
                supervisor.base_url,
                supervisor.api_key or "",
                plan.served_name,
                args.tokens,
                args.concurrency,
                args.ttft_samples,
                args.long_prompt,
            )
        )
        if result.roofline_steps_s and result.one_stream_tok_s:
            result.roofline_ratio = result.one_stream_tok_s / result.roofline_steps_s
    return result


def wait_gpu_released(timeout: float = 180.0) -> None:
    """Before the next budget: the last engine must be gone from the card."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = gpu_memory_used()
        if used is not None and used < GiB:
            return
        time.sleep(1)
    print(f"warning: {((gpu_memory_used() or 0) / GiB):.2f} GiB still in use", flush=True)


COLUMNS = [
    "model",
    "budget",
    "plan",
    "est. VRAM",
    "measured",
    "est/meas",
    "first try",
    "start",
    "1 stream",
    "N streams",
    "offload roofline",
    "gateway +TTFT",
]


def row(r: Result) -> list[str]:
    if r.measured_gib is None:
        return [r.model, f"{r.budget_gib:g} GiB", (r.error or "")[:160]] + [""] * 9
    p = r.plan
    roof = "no offload"
    if r.roofline_steps_s and r.roofline_ratio:
        roof = f"{r.roofline_steps_s:.1f} steps/s bound, {r.roofline_ratio:.0%} reached"
    return [
        r.model,
        f"{r.budget_gib:g} GiB",
        f"{p['quantization'] or 'bf16'}, {'eager' if p['enforce_eager'] else 'CUDA graphs'}, "
        f"{p['offloaded_layers']} layers offloaded"
        + (
            f" + vocabulary ({p['vocab_offload']})"
            if p.get("vocab_offload", "none") != "none"
            else ""
        )
        + f", {p['max_num_seqs']} seqs, "
        f"KV {p['kv_cache_tokens']:,} tokens, context {p['max_model_len']}",
        f"{r.estimate_gib:.2f} GiB",
        f"{r.measured_gib:.2f} GiB",
        f"{r.estimate_gib / r.measured_gib:.2f}",
        "yes" if r.first_try else "no: " + "; ".join(r.rungs),
        f"{r.startup_s:.0f} s",
        f"{r.one_stream_tok_s:.1f} tok/s",
        f"{r.many_streams_tok_s:.1f} tok/s ({p['max_num_seqs']})"
        + (
            f"; {r.long_prompt_ttft_s:.1f} s to first token of a long prompt"
            if r.long_prompt_ttft_s
            else ""
        ),
        roof,
        f"{r.gateway_ttft_added_ms:+.2f} ms (direct {r.direct_ttft_ms:.0f} ms)",
    ]


def print_table(results: list[Result], bandwidth: float) -> None:
    gpu = detect_gpus()[0].name if detect_gpus() else "?"
    print(f"\n{gpu}, host-to-device {bandwidth / 1e9:.1f} GB/s (pinned, measured)\n")
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for result in results:
        print("| " + " | ".join(row(result)) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--vram", type=float, nargs="+", required=True, help="budgets in GiB")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--optimize", default="throughput")
    parser.add_argument("--offload-vocab", default="auto", help="ENGINE_OFFLOAD_VOCAB")
    parser.add_argument("--long-prompt", type=int, default=0, help="also serve this many tokens")
    parser.add_argument(
        "--ttft-samples",
        type=int,
        default=10,
        help="interleaved 1-token requests per path for the gateway's added TTFT",
    )
    parser.add_argument("--out", default="gpu_plans.jsonl")
    parser.add_argument("--work", default="/tmp")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    bandwidth = h2d_bandwidth()
    results = []
    for vram in args.vram:
        wait_gpu_released()
        result = run_one(args.model_dir, vram, args, bandwidth)
        results.append(result)
        with open(args.out, "a") as out:
            out.write(json.dumps(asdict(result) | {"h2d_bytes_per_s": bandwidth}) + "\n")
        print(json.dumps(asdict(result)), flush=True)
    print_table(results, bandwidth)


if __name__ == "__main__":
    main()
