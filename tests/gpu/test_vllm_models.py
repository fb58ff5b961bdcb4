"""On a GPU: ENGINE_MODELS with vLLM, two engines on one GPU through its sleep mode.

Skipped where there is no NVIDIA GPU or no vLLM. Both models are the random-weight
checkpoint named by LOWVRAM_GPU_TEST_MODEL (as in test_vllm_gateway.py), served under two
names: what is checked is who is awake, that every request is answered by its own engine,
and what sleeping engines keep on the GPU; not the words.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lowvram.engine.hardware import detect_gpus
from lowvram.engine.vllm.several import SLEEPING_RESIDUAL
from tests.helpers import ServeProcess, lowvram_serve

MODEL = os.environ.get("LOWVRAM_GPU_TEST_MODEL", "/tmp/m05")
KEY = "gpu-models-key-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}
BUDGET_GIB = 6

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not detect_gpus(), reason="no NVIDIA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
    pytest.mark.skipif(not Path(MODEL, "config.json").is_file(), reason=f"no model at {MODEL}"),
]


@pytest.fixture(scope="module", params=["1", "2"], ids=["level-1", "level-2"])
def served(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("models")
    env = {
        "GATEWAY_API_KEYS": KEY,
        "ENGINE_BACKEND": "vllm",
        "ENGINE_MODELS": f"a={MODEL},b={MODEL}",
        "ENGINE_VRAM": f"{BUDGET_GIB}GiB",
        "ENGINE_CONTEXT": "2048",
        "ENGINE_CONCURRENCY": "4",
        "ENGINE_SLEEP_LEVEL": request.param,
        "ENGINE_SWAP_MIN_AWAKE": "0",
        "ENGINE_EXTRA_ARGS": "--enforce-eager",
    }
    with lowvram_serve(tmp, env, ready_timeout=900) as process:
        yield process


def ask(url: str, model: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8,
        "ignore_eos": True,
    }
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=300)


def gpu_used_bytes() -> int:
    query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
    mib = subprocess.run(query, capture_output=True, text=True, check=True).stdout.split()[0]
    return int(mib) * 1024**2


def states(url: str) -> dict[str, str]:
    return dict(httpx.get(url + "/ready", timeout=10).json()["models"])


def test_start_up_leaves_the_default_awake_and_the_other_asleep(served: ServeProcess) -> None:
    assert states(served.url) == {"a": "awake", "b": "asleep"}
    # The awake engine's budget plus what the sleeping one keeps, by nvidia-smi.
    assert gpu_used_bytes() <= BUDGET_GIB * 1024**3 + SLEEPING_RESIDUAL


def test_alternating_requests_are_each_answered_by_their_model(served: ServeProcess) -> None:
    for model in ("b", "a", "b", "a"):
        answer = ask(served.url, model)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == model and answer.json()["usage"]["completion_tokens"]
        assert states(served.url)[model] == "awake"


def test_concurrent_requests_for_both_are_all_answered(served: ServeProcess) -> None:
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: ask(served.url, m), ["a", "b"] * 4))
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert [a.json()["model"] for a in answers] == ["a", "b"] * 4
