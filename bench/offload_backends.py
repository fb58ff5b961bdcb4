"""vLLM 0.26's two weight-offload backends side by side, on one plan's shape (GPU only).

    python -m bench.offload_backends MODEL_DIR --vram 4 [--tokens 64 --streams 8]

UVA (`--cpu-offload-gb`, what lowvram plans) leaves offloaded weights in pinned host memory
and lets the kernels read them over PCIe; prefetch (`--offload-backend prefetch`) copies
the next layer into GPU buffers on a copy stream while the current one computes. Both run
the same lowvram plan (its layers all offloaded, the vocabulary on the GPU, which prefetch
cannot move), straight against vLLM's own server, one after the other: nvidia-smi once
ready, decode tokens/s for one stream and for `--streams`. Prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench.gpu_plans import stream_once, wait_gpu_released
from lowvram.engine.hardware import detect_hardware, gpu_memory_used
from lowvram.engine.settings import EngineSettings
from lowvram.engine.supervisor import free_port
from lowvram.engine.units import GiB
from lowvram.engine.vllm.model import load_model_facts
from lowvram.engine.vllm.plan import EnginePlan
from lowvram.engine.vllm.planner import plan_vllm

KEY = "bench-offload-key"


def base_plan(model_dir: str, vram: float, streams: int) -> EnginePlan:
    settings = EngineSettings(  # type: ignore[call-arg]
        _env_file=None,
        vram=int(vram * GiB),
        concurrency=streams,
        offload_vocab="none",
        quantization="bitsandbytes",  # FP8 quantized at load cannot be offloaded (meta weights)
    )
    hardware = detect_hardware(settings)
    assert hardware.gpu is not None
    return plan_vllm(load_model_facts(model_dir), hardware.gpu, hardware.host, settings)


def argv_for(plan: EnginePlan, backend: str) -> list[str]:
    argv = plan.to_argv()
    if backend == "prefetch":
        at = argv.index("--cpu-offload-gb")
        del argv[at : at + 2]
        # Every layer of a group of one: all of them, each copied in one layer ahead.
        argv += ["--offload-backend", "prefetch", "--offload-group-size", "1"]
        argv += ["--offload-num-in-group", "1", "--offload-prefetch-step", "1"]
    return argv


async def speeds(url: str, model: str, tokens: int, streams: int) -> tuple[float, float]:
    async with httpx.AsyncClient(timeout=900) as client:
        await stream_once(client, url, KEY, model, 4)
        _, decode_s, completion = await stream_once(client, url, KEY, model, tokens)
        one = (completion - 1) / decode_s
        began = time.perf_counter()
        runs = await asyncio.gather(
            *(stream_once(client, url, KEY, model, tokens) for _ in range(streams))
        )
        return one, sum(r[2] for r in runs) / (time.perf_counter() - began)


def run(plan: EnginePlan, backend: str, args: argparse.Namespace) -> list[str]:
    wait_gpu_released()
    port = free_port()
    log = Path(args.work) / f"vllm-{backend}.log"
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv_for(plan, backend)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    env = os.environ | plan.to_env() | {"VLLM_API_KEY": KEY}
    started = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while time.monotonic() - started < 300 and process.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            tail = log.read_text(errors="replace")[-1500:]
            return [backend, "did not start", tail.replace("\n", " / ")]
        ready = time.monotonic() - started
        used = (gpu_memory_used() or 0) / GiB
        one, many = asyncio.run(speeds(url, plan.served_name, args.tokens, args.streams))
        return [backend, f"{used:.2f} GiB", f"{ready:.0f} s", f"{one:.2f}", f"{many:.1f}"]
    finally:
        os.killpg(process.pid, 15)
        process.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir")
    parser.add_argument("--vram", type=float, required=True)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--work", default="/tmp")
    args = parser.parse_args()
    plan = base_plan(args.model_dir, args.vram, args.streams)
    print(
        f"{Path(args.model_dir).name} at {args.vram:g} GiB: {plan.quantization or 'dtype'}, "
        f"{plan.offloaded_layers} layers offloaded ({plan.cpu_offload_bytes / GiB:.2f} GiB), "
        f"{plan.max_num_seqs} seqs, estimate {plan.estimate.total / GiB:.2f} GiB",
        flush=True,
    )
    rows = [run(plan, backend, args) for backend in ("uva", "prefetch")]
    print(
        "| backend | VRAM (nvidia-smi) | ready | 1 stream tok/s | "
        f"{args.streams} streams tok/s |\n|---|---|---|---|---|"
    )
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
