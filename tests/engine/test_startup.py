"""An engine's start phases from its own lines: vLLM 0.26.0's, as an H200 printed them."""

from __future__ import annotations

from lowvram.engine.startup import LLAMACPP_PHASES, VLLM_PHASES, Timeline
from lowvram.engine.vllm.plan import MULTI_GPU_ENV
from tests.engine.test_deployment import deploy

# What it printed, less each line's "(EngineCore pid=2485) INFO 12-02 00:04:41 " head.
VLLM_LINES = [
    "[api_utils.py:273] non-default args: {'host': '127.0.0.1'}",
    "[core.py:116] Initializing a V1 LLM engine (v0.26.0) with config: model='/tmp/m70'",
    "[parallel_state.py:1615] world_size=1 rank=0 local_rank=0 backend=nccl",
    "[gpu_model_runner.py:5250] Starting to load model /tmp/m70...",
    "[plugin.py:113] lowvram plugin: offloaded embed: 2.318 GiB to host memory",
    "[default_loader.py:430] Loading weights took 6.99 seconds",
    "[gpu_model_runner.py:5347] Model loading took 0.03 GiB memory and 86.804533 seconds",
    "[kv_cache_utils.py:2177] GPU KV cache size: 608 tokens",
    "[core.py:347] init engine (profile, create kv cache, warmup model) took 3.34 s",
    "[api_server.py:677] Starting vLLM server on http://127.0.0.1:56979",
]
VLLM_LINES = ["(EngineCore pid=2485) INFO 12-02 00:04:41 " + line for line in VLLM_LINES]


def test_vllm_lines_make_its_phases_in_order() -> None:
    timeline = Timeline(VLLM_PHASES)
    for line in VLLM_LINES:
        timeline.see(line)
        timeline.see(line)  # a phase is counted once
    assert [name for _, name in timeline.seen] == [
        "process spawned",
        "API server up",
        "engine process started",
        "distributed group (NCCL) set up",
        "loading weights",
        "weights read",
        "weights loaded",
        "KV cache allocated",
        "warmed up",
        "serving",
    ]


def test_a_start_stuck_loading_says_so() -> None:
    timeline = Timeline(VLLM_PHASES)
    for line in VLLM_LINES[:4]:
        timeline.see(line)
    assert timeline.phase == "loading weights"
    assert timeline.stopped_in().startswith("it stopped in 'loading weights'")
    llama = Timeline(LLAMACPP_PHASES)
    llama.see("0.00.116.741 I srv    load_model: loading model '/m.gguf'")
    assert llama.phase == "loading the model"


def test_an_engine_over_several_gpus_keeps_nvlink_multicast_off() -> None:
    split = deploy("llama-3.3-70b-instruct-awq", 2, 10, concurrency=16).plan
    assert split.tensor_parallel == 2
    assert split.to_env().items() >= MULTI_GPU_ENV.items()
    assert split.to_env()["NCCL_NVLS_ENABLE"] == "0"
    assert split.to_env()["VLLM_ALLREDUCE_USE_SYMM_MEM"] == "0"
    one = deploy("qwen3-8b", 1, 22).plan
    assert "NCCL_NVLS_ENABLE" not in one.to_env()
