"""A TEST DOUBLE of an engine process, for the supervisor's tests (never an engine test).

Run like vLLM's server: `python -m tests.doubles.fake_engine --model M --port P [vLLM flags...]`
from the repository root (or with it on PYTHONPATH), with the
key in VLLM_API_KEY. It serves the fake upstream's OpenAI API, and behaves on cue through
environment variables (FAKE_STATE_DIR holds a counter, so a cue can apply to a given start):

    FAKE_START_DELAY=2        seconds before it binds its port (a slow start)
    FAKE_FAIL_STARTS=oom:2    print a CUDA OOM and exit on starts 1 and 2
    FAKE_IGNORE_OFFLOAD=1     accept --cpu-offload-gb and do nothing (vLLM's V2 runner)
    FAKE_NO_PLUGIN=1          ignore LOWVRAM_OFFLOAD_VOCAB (lowvram's plugin not installed)
    FAKE_IGNORE_SIGTERM=1     ignore SIGTERM (the supervisor must SIGKILL)
    FAKE_CHILD=1              start a grandchild process that must die with the group
    FAKE_WAKE_FAIL=name       /wake_up fails (500) for the engine serving that name
    FAKE_FAIL_NAME=name       the engine serving that name fails every start

With --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 it serves vLLM's sleep endpoints
(/sleep, /wake_up, /collective_rpc, /is_sleeping), answers generation with 503 while
asleep, as vLLM does, and appends each call to FAKE_STATE_DIR/sleep.log ("name sleep 1
wait", "name wake weights", ...).

It prints the lines vLLM prints once loaded: 'Total CPU offloaded parameters', 'Model
loading took', 'GPU KV cache size', and lowvram's plugin's lines for what
LOWVRAM_OFFLOAD_VOCAB asks (the sizes of a Qwen2.5-7B's embedding and lm_head). POST
/_crash makes it exit at once (a crash); POST /_crash?signal=SIGILL kills it with that
signal instead.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lowvram.engine.vllm.plugin import MARK
from tests.doubles.fake_upstream import FakeUpstream

QWEN7B_VOCAB_GIB = 152064 * 3584 * 2 / 1024**3

FAILURE_LINES = {
    "oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
    "kv": "ValueError: No available memory for the cache blocks. Try increasing "
    "`gpu_memory_utilization` when initializing the engine.",
    "busy": "ValueError: Free memory on device cuda:0 (3.1/79.2 GiB) on startup is less than "
    "desired GPU memory utilization (0.1, 7.92 GiB).",
    "weird": "RuntimeError: something nobody planned for",
}


def start_number() -> int:
    state = Path(os.environ.get("FAKE_STATE_DIR", "."))
    counter = state / "starts"
    count = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(count))
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--served-model-name")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--cpu-offload-gb", type=float, default=0.0)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=2**30)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--enable-sleep-mode", action="store_true")
    args, _ = parser.parse_known_args()

    count = start_number()
    print(f"fake engine start {count}, pid {os.getpid()}", flush=True)
    if os.environ.get("FAKE_IGNORE_SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAKE_CHILD"):
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(os.environ["FAKE_STATE_DIR"], "child.pid").write_text(str(child.pid))
    for line in (  # vLLM's start, phase by phase (engine/startup.py), before any delay
        "INFO [api_utils.py:273] non-default args: {'port': 0}",
        "INFO [core.py:116] Initializing a V1 LLM engine (v0.26.0) with config: fake",
        "INFO [parallel_state.py:1615] world_size=1 rank=0 local_rank=0 backend=nccl",
        "INFO [gpu_model_runner.py:5250] Starting to load model fake...",
    ):
        print(line, flush=True)
    time.sleep(float(os.environ.get("FAKE_START_DELAY", "0")))
    if os.environ.get("FAKE_FAIL_NAME") in (args.served_model_name, args.model):
        print(FAILURE_LINES["weird"], flush=True)
        sys.exit(1)
    kind, _, starts = os.environ.get("FAKE_FAIL_STARTS", "").partition(":")
    if kind and count <= int(starts or 1):
        print(FAILURE_LINES[kind], flush=True)
        sys.exit(1)

    vocab = "" if os.environ.get("FAKE_NO_PLUGIN") else os.environ.get("LOWVRAM_OFFLOAD_VOCAB", "")
    for kind in filter(None, vocab.split(",")):
        print(f"INFO {MARK} {kind}: {QWEN7B_VOCAB_GIB:.3f} GiB to host memory", flush=True)
    if args.cpu_offload_gb and not os.environ.get("FAKE_IGNORE_OFFLOAD"):
        print(f"INFO Total CPU offloaded parameters: {round(args.cpu_offload_gb, 2)}", flush=True)
    print("INFO Model loading took 2.13 GiB memory and 12.5 seconds", flush=True)
    tokens = args.kv_cache_memory_bytes // 57344
    print(f"INFO GPU KV cache size: {tokens:,} tokens", flush=True)

    # Its served name is the fingerprint of its answers: which engine answered.
    served = args.served_model_name or args.model
    double = FakeUpstream(api_key=os.environ.get("VLLM_API_KEY"), name=served)
    app = double.app()

    async def health(_: Request) -> Response:
        return Response(status_code=200)

    async def crash(request: Request) -> Response:
        name = request.query_params.get("signal")
        if name:
            signal.signal(getattr(signal, name), signal.SIG_DFL)
            os.kill(os.getpid(), getattr(signal, name))
        os._exit(3)

    async def models(request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {double.api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        name = args.served_model_name or args.model
        return JSONResponse(
            {"data": [{"id": name, "object": "model", "max_model_len": args.max_model_len}]}
        )

    if args.enable_sleep_mode and os.environ.get("VLLM_SERVER_DEV_MODE") == "1":
        add_sleep_mode(app, args.served_model_name or args.model)
    app.router.routes.insert(0, Route("/health", health))
    app.router.routes.insert(0, Route("/_crash", crash, methods=["POST"]))
    app.router.routes.insert(0, Route("/v1/models", models))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def add_sleep_mode(app: Starlette, name: str) -> None:
    asleep: list[str] = []  # the level while asleep
    log = Path(os.environ.get("FAKE_STATE_DIR", "."), "sleep.log")

    def record(what: str) -> None:
        with log.open("a") as file:
            file.write(f"{name} {what}\n")

    async def sleep(request: Request) -> Response:
        level = request.query_params.get("level", "1")
        record(f"sleep {level} {request.query_params.get('mode', 'abort')}")
        asleep[:] = [level]
        return Response(status_code=200)

    async def wake_up(request: Request) -> Response:
        tags = request.query_params.getlist("tags")
        record("wake " + (",".join(tags) or "all"))
        if os.environ.get("FAKE_WAKE_FAIL") == name:
            return JSONResponse({"error": "wake failed"}, status_code=500)
        if not tags or "kv_cache" in tags:
            asleep.clear()
        return Response(status_code=200)

    async def rpc(request: Request) -> Response:
        record("rpc " + (await request.json())["method"])
        return JSONResponse({"results": [None]})

    async def is_sleeping(_: Request) -> Response:
        return JSONResponse({"is_sleeping": bool(asleep)})

    async def refuse_asleep(request: Request, call_next: Any) -> Response:
        if asleep and request.url.path in ("/v1/chat/completions", "/v1/completions"):
            return JSONResponse({"error": {"message": "model is sleeping"}}, status_code=503)
        response: Response = await call_next(request)
        return response

    app.add_middleware(BaseHTTPMiddleware, dispatch=refuse_asleep)
    for path, handler, method in (
        ("/sleep", sleep, "POST"),
        ("/wake_up", wake_up, "POST"),
        ("/collective_rpc", rpc, "POST"),
        ("/is_sleeping", is_sleeping, "GET"),
    ):
        app.router.routes.insert(0, Route(path, handler, methods=[method]))


if __name__ == "__main__":
    main()
