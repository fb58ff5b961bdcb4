"""ENGINE_MODELS on vLLM through `lowvram serve`: an engine per model, one awake.

The engines are the TEST DOUBLE of vLLM's server (tests/doubles/fake_engine.py) with its
sleep endpoints, planned for a what-if GPU; it answers 503 while asleep, as vLLM does, so a
request sent to a sleeping engine would fail here. What is tested is the order of sleeps
and wakes, who waits, and what clients see; not vLLM's own sleep (docs/benchmarks.md).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lowvram.cli import main
from lowvram.engine.errors import ModelError, PlanError, SetupError
from lowvram.engine.factory import build_backends
from lowvram.engine.hardware import Hardware, HostFacts
from lowvram.engine.units import GiB
from lowvram.engine.vllm.backend import VllmBackend
from lowvram.engine.vllm.model import load_model_facts
from lowvram.engine.vllm.several import SLEEPING_RESIDUAL, budget_each, sleep_level
from lowvram.engine.vllm.sleep import SharedGpu
from tests.helpers import (
    FAKE_ENGINE,
    FIXTURES,
    TEST_MACHINE,
    ServeProcess,
    alive,
    child_processes,
    engine_settings,
    lowvram_serve,
    start_streams,
    wait_for,
)

KEY = "swap-pool-key-0001"
AUTH = {"Authorization": f"Bearer {KEY}"}
ADMIN = "swap-pool-admin-0001"


MODEL = str(FIXTURES / "qwen2.5-7b-instruct")


def test_each_model_is_planned_for_the_budget_less_the_sleeping_others(tmp_path: Path) -> None:
    models = {"chat": MODEL, "coder": MODEL, "third": MODEL}
    settings = engine_settings(tmp_path, backend="vllm", models=models, vram=16 * GiB)
    settings = settings.model_copy(update={"gpu_memory": 24 * GiB})
    backends, names = build_backends(settings)
    assert names == ["chat", "coder", "third"]
    for backend in backends:
        assert isinstance(backend, VllmBackend) and backend.shared is not None
        assert backend.plan.budget == 16 * GiB - 2 * SLEEPING_RESIDUAL
        assert backend.plan.estimate.total <= backend.plan.budget
    launch = backends[1].launch(8123, "key")
    assert launch.argv[launch.argv.index("--served-model-name", -8) + 1] == "coder"
    assert "--enable-sleep-mode" in launch.argv
    assert launch.env["VLLM_SERVER_DEV_MODE"] == "1"
    with pytest.raises(SetupError, match="one GPU"):
        build_backends(settings.model_copy(update={"replicas": 2}))


def test_a_model_that_cannot_be_found_is_left_out_and_the_others_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = {"chat": MODEL, "gone": str(tmp_path / "no-such-model"), "coder": MODEL}
    settings = engine_settings(tmp_path, backend="vllm", models=models, vram=16 * GiB)
    settings = settings.model_copy(update={"gpu_memory": 24 * GiB})
    backends, names = build_backends(settings)
    assert names == ["chat", "coder"]
    assert "model gone left out: no such directory" in caplog.text
    # Planned for the two that run: one other asleep, not two.
    assert all(
        isinstance(b, VllmBackend) and b.plan.budget == 16 * GiB - SLEEPING_RESIDUAL
        for b in backends
    )
    nothing = {"a": str(tmp_path / "x"), "b": str(tmp_path / "y")}
    with pytest.raises(ModelError, match="none of ENGINE_MODELS could be found"):
        build_backends(settings.model_copy(update={"models": nothing}))


def test_nvidia_smi_counting_the_sleeping_engines_too_is_not_over_the_budget(
    tmp_path: Path,
) -> None:
    settings = engine_settings(tmp_path, vram=12 * GiB)
    model = load_model_facts(MODEL)

    def engine(shared: int) -> VllmBackend:
        # The GPU shows the plan's whole budget in use, plus one sleeping engine's residual.
        used = 12 * GiB + SLEEPING_RESIDUAL // 2
        return VllmBackend(
            model,
            TEST_MACHINE,
            settings,
            shared=SharedGpu("a", shared),
            measure_vram=lambda _: used,
        )

    alone = [p for p in engine(0).verify() if "over the budget" in p]
    assert alone, "without the others' share this is over"
    assert not [p for p in engine(SLEEPING_RESIDUAL).verify() if "over the budget" in p]


def test_models_whose_sleeping_residuals_leave_no_room_are_refused_naming_them(
    tmp_path: Path,
) -> None:
    models = {f"m{i}": MODEL for i in range(4)}
    settings = engine_settings(tmp_path, backend="vllm", models=models, vram=3 * GiB)
    with pytest.raises(PlanError, match="4 models leave no room: 3 asleep keep"):
        budget_each(settings, TEST_MACHINE, 4)
    # 1.2 GiB each beside the other asleep: below a 7B's floor. Which model, and why.
    two = {"models": {"chat": MODEL, "coder": MODEL}, "vram": int(2.2 * GiB)}
    with pytest.raises(PlanError, match=r"^chat: .*floor"):
        build_backends(settings.model_copy(update=two | {"gpu_memory": 24 * GiB}))


def test_models_whose_offloaded_weights_overflow_the_host_together_are_refused(
    tmp_path: Path,
) -> None:
    # Alone each 7B fits a 3 GiB budget with 14 GiB in host memory; two do not fit 24 GiB.
    settings = engine_settings(tmp_path, backend="vllm", models={"a": MODEL, "b": MODEL})
    update = {"vram": 3 * GiB, "gpu_memory": 24 * GiB, "host_memory": 24 * GiB}
    with pytest.raises(PlanError, match=r"weights in host memory add up .*\(a 14\.\d+ GiB, b"):
        build_backends(settings.model_copy(update=update))


def test_lowvram_plan_shows_every_models_plan_and_the_sleep_level(
    capsys: pytest.CaptureFixture[str],
) -> None:
    asked = ["plan", f"chat={MODEL},coder={MODEL}", "--gpu-memory", "24GiB", "--vram", "16GiB"]
    assert main([*asked, "--host-memory", "64GiB"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("2 models, one awake: sleep level 1")
    assert text.count("plan for qwen2.5-7b-instruct within 15.01 GiB") == 2
    assert "and: --served-model-name coder --enable-sleep-mode VLLM_SERVER_DEV_MODE=1" in text
    assert main([*asked, "--host-memory", "64GiB", "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    assert list(planned["models"]) == ["chat", "coder"] and planned["sleep_level"] == 1
    assert planned["models"]["chat"]["env"]["VLLM_SERVER_DEV_MODE"] == "1"
    assert main([*asked[:-1], "2GiB"]) == 2  # below the floor with the other one asleep
    assert "chat: " in capsys.readouterr().err


def test_level_1_where_host_memory_holds_the_sleeping_weights_else_level_2(
    tmp_path: Path,
) -> None:
    settings = engine_settings(tmp_path, backend="vllm", models={"a": MODEL, "b": MODEL})
    settings = settings.model_copy(update={"gpu_memory": 24 * GiB, "vram": 20 * GiB})
    plans = [b.plan for b in build_backends(settings)[0] if isinstance(b, VllmBackend)]
    weights = plans[0].estimate.weights
    roomy = Hardware(TEST_MACHINE.gpus, HostFacts(64 * GiB, 64 * GiB))
    tight = Hardware(TEST_MACHINE.gpus, HostFacts(8 * GiB, 4 * GiB + weights // 2))
    assert sleep_level(plans, roomy) == 1
    assert sleep_level(plans, tight) == 2


def serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    model = MODEL
    return {
        "GATEWAY_API_KEYS": KEY,
        "GATEWAY_ADMIN_API_KEYS": ADMIN,
        "ENGINE_BACKEND": "vllm",
        "ENGINE_COMMAND": " ".join(FAKE_ENGINE),
        "ENGINE_MODELS": f"chat={model},coder={model}",
        "ENGINE_GPU_MEMORY": "24GiB",
        "ENGINE_HOST_MEMORY": "64GiB",
        "ENGINE_VRAM": "16GiB",
        "ENGINE_SWAP_MIN_AWAKE": "0",
        "FAKE_STATE_DIR": str(tmp_path),
    } | extra


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServeProcess]:
    extra = getattr(request, "param", {})
    with lowvram_serve(tmp_path, serve_env(tmp_path, **extra), ready_timeout=60) as process:
        engines = child_processes(process.process.pid, [b"tests.doubles.fake_engine"])
        assert len(engines) == (1 if "FAKE_FAIL_NAME" in extra else 2)
        yield process
    wait_for(lambda: not any(alive(pid) for pid in engines), 30, "both engines stopped")


def calls(served: ServeProcess) -> list[str]:
    """The sleep endpoints' calls, in order, as the engines recorded them."""
    log = served.log.parent / "sleep.log"
    return log.read_text().splitlines() if log.exists() else []


def ask(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)


def test_start_up_puts_each_engine_to_sleep_once_ready_then_wakes_the_default(
    served: ServeProcess,
) -> None:
    assert calls(served) == ["chat sleep 1 wait", "coder sleep 1 wait", "chat wake all"]
    listed = httpx.get(served.url + "/v1/models", headers=AUTH, timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["chat", "coder"]
    assert "models: chat, coder" in served.output()


def test_each_model_is_woken_for_its_requests_and_the_other_put_to_sleep(
    served: ServeProcess,
) -> None:
    started = len(calls(served))
    for model in ("chat", "coder", "coder", "chat", "default"):
        answer = ask(served.url, model)
        assert answer.status_code == 200, answer.text
        answered_by = answer.json()["system_fingerprint"]  # the double's served name
        assert answered_by == ("chat" if model == "default" else model)
    assert calls(served)[started:] == [
        "chat sleep 1 wait",
        "coder wake all",
        "coder sleep 1 wait",
        "chat wake all",
    ]
    ready = httpx.get(served.url + "/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["models"] == {"chat": "awake", "coder": "asleep"}
    running = httpx.get(served.url + "/api/ps", headers=AUTH, timeout=10).json()["models"]
    assert [m["name"] for m in running] == ["chat"]  # Ollama's "in memory": the awake one
    admin = {"Authorization": f"Bearer {ADMIN}"}
    metrics = httpx.get(served.url + "/metrics", headers=admin, timeout=10).text
    assert 'lowvram_model_swaps_total{model="coder"} 1.0' in metrics
    assert 'lowvram_model_swaps_total{model="chat"} 2.0' in metrics  # at start-up too
    assert 'lowvram_model_state{model="coder",state="asleep"} 1.0' in metrics
    assert "lowvram_swap_wait_seconds_count 5.0" in metrics  # each request's wait, if any


def test_a_stream_finishes_before_its_engine_sleeps_for_the_other_model(
    served: ServeProcess,
) -> None:
    long = {
        "model": "chat",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "fake": {"tokens": 30, "delay": 0.02},
    }
    (stream,) = start_streams(served.url, [long], AUTH, timeout=30)
    other = ask(served.url, "coder")  # waits: chat sleeps once its stream is over
    assert other.status_code == 200, other.text
    data = stream.result(timeout=30)
    assert data[-1] == "[DONE]"
    assert "error" not in json.loads(data[-2])
    assert "chat sleep 1 wait" in calls(served)[-2:]  # drained, not aborted


@pytest.mark.parametrize("served", [{"FAKE_WAKE_FAIL": "coder"}], indirect=True)
def test_a_model_that_cannot_be_woken_is_a_503_and_the_other_serves_again(
    served: ServeProcess,
) -> None:
    refused = ask(served.url, "coder")
    assert refused.status_code == 503 and refused.headers["Retry-After"]
    error = refused.json()["error"]
    assert "'coder' could not be woken" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    again = ask(served.url, "chat")
    assert again.status_code == 200, again.text
    assert calls(served)[-3:] == ["chat sleep 1 wait", "coder wake all", "chat wake all"]


@pytest.mark.parametrize("served", [{"FAKE_FAIL_NAME": "coder"}], indirect=True)
def test_a_model_whose_engine_cannot_start_is_reported_on_its_own_and_the_other_serves(
    served: ServeProcess,
) -> None:
    ready = httpx.get(served.url + "/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["models"] == {"chat": "awake", "coder": "failed"}
    assert ask(served.url, "chat").status_code == 200
    refused = ask(served.url, "coder")
    assert refused.status_code == 503, refused.text  # configured, down: not a 404
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"].startswith("The model 'coder' is not serving: the engine failed")
