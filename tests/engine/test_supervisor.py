"""The supervisor managing real processes: a test double of an engine (tests/doubles)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from lowvram.engine.handle import EngineState
from lowvram.engine.supervisor import Supervisor, Timing, describe_exit
from lowvram.engine.units import GiB
from lowvram.engine.vllm.backend import VllmBackend
from tests.helpers import FAST, alive, fake_vllm

pytestmark = pytest.mark.anyio


@pytest.fixture
def cues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment cues for the fake engine; its start counter lives in tmp_path."""
    monkeypatch.setenv("FAKE_STATE_DIR", str(tmp_path))
    return os.environ  # type: ignore[return-value]


@pytest.fixture
async def supervised() -> AsyncIterator[list[Supervisor]]:
    """Supervisors made by a test are always stopped, whatever the test did."""
    made: list[Supervisor] = []
    yield made
    for supervisor in made:
        await supervisor.stop()


async def start(
    made: list[Supervisor], engine_backend: VllmBackend, timing: Timing = FAST
) -> Supervisor:
    supervisor = Supervisor(engine_backend, engine_backend.settings, timing)
    made.append(supervisor)
    await supervisor.start()
    return supervisor


async def test_slow_start_is_starting_then_ready(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_START_DELAY", "1.5")
    supervisor = await start(supervised, fake_vllm(tmp_path))
    assert supervisor.state is EngineState.STARTING and supervisor.model is None
    assert (
        await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=30)
        is EngineState.READY
    )
    assert supervisor.model is not None and supervisor.model.id == "qwen2.5-7b-instruct"
    assert supervisor.base_url.startswith("http://127.0.0.1:")
    async with httpx.AsyncClient() as client:
        unauthenticated = await client.get(supervisor.base_url + "/v1/models")
        assert unauthenticated.status_code == 401  # the random key guards the engine
        authorized = await client.get(
            supervisor.base_url + "/v1/models",
            headers={"Authorization": f"Bearer {supervisor.api_key}"},
        )
        assert authorized.status_code == 200


async def test_known_memory_failure_is_re_planned_one_rung_down(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_FAIL_STARTS", "oom:1")
    engine = fake_vllm(tmp_path, vram_gib=6)
    before = engine.plan
    supervisor = await start(supervised, engine)
    assert (
        await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=30)
        is EngineState.READY
    )
    assert engine.plan.rung == 1
    # More in host memory (layers or the vocabulary), or a smaller prefill chunk.
    assert engine.plan.host_offload_bytes > before.host_offload_bytes or (
        engine.plan.max_num_batched_tokens < before.max_num_batched_tokens
    )
    assert any(attempt.startswith("out_of_memory: rung 1") for attempt in supervisor.attempts)


async def test_unknown_failure_fails_at_once_saying_what_it_saw(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_FAIL_STARTS", "weird:9")
    supervisor = await start(supervised, fake_vllm(tmp_path))
    assert await supervisor.wait_for(EngineState.FAILED, timeout=30) is EngineState.FAILED
    assert "something nobody planned for" in supervisor.detail
    assert (Path(os.environ["FAKE_STATE_DIR"]) / "starts").read_text() == "1"


async def test_replans_are_bounded_and_the_failure_says_what_was_tried(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_FAIL_STARTS", "kv:99")
    engine = fake_vllm(tmp_path, vram_gib=6, max_replans=2)
    supervisor = await start(supervised, engine)
    assert await supervisor.wait_for(EngineState.FAILED, timeout=60) is EngineState.FAILED
    assert (Path(os.environ["FAKE_STATE_DIR"]) / "starts").read_text() == "3"
    assert "kv_cache_too_small: rung 1" in supervisor.detail
    assert "kv_cache_too_small: rung 2" in supervisor.detail


async def test_an_offload_that_did_not_take_effect_is_an_error(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_IGNORE_OFFLOAD", "1")
    engine = fake_vllm(tmp_path, vram_gib=5)
    assert engine.plan.offloaded_layers > 0
    supervisor = await start(supervised, engine)
    assert (
        await supervisor.wait_for(EngineState.FAILED, EngineState.READY, timeout=30)
        is EngineState.FAILED
    )
    assert "Total CPU offloaded parameters" in supervisor.detail
    assert supervisor.pid is None


async def test_offload_that_took_effect_is_reported(
    tmp_path: Path, cues: dict[str, str], supervised: list[Supervisor]
) -> None:
    engine = fake_vllm(tmp_path, vram_gib=5)
    supervisor = await start(supervised, engine)
    assert (
        await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=30)
        is EngineState.READY
    )
    assert engine.observed["offloaded_gib"] == pytest.approx(
        engine.plan.offload_budget / GiB, abs=0.01
    )
    assert engine.plan.vocab_modules and "embed_gib" in engine.observed
    assert "offloaded" in supervisor.detail and "KV" in supervisor.detail
    for kind in engine.plan.vocab_modules:  # what the plugin said it moved
        assert f"{kind} 1.01 GiB on the host" in supervisor.detail


async def test_a_vocabulary_offload_the_plugin_did_not_do_is_an_error(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_NO_PLUGIN", "1")  # vLLM runs without lowvram's plugin
    engine = fake_vllm(tmp_path, vram_gib=5)
    assert "embed" in engine.plan.vocab_modules
    supervisor = await start(supervised, engine)
    assert (
        await supervisor.wait_for(EngineState.FAILED, EngineState.READY, timeout=30)
        is EngineState.FAILED
    )
    assert (
        "plugin did not move it" in supervisor.detail
        and "ENGINE_OFFLOAD_VOCAB" in supervisor.detail
    )
    assert supervisor.pid is None


async def test_a_crash_while_serving_is_restarted_with_backoff(
    tmp_path: Path, cues: dict[str, str], supervised: list[Supervisor]
) -> None:
    supervisor = await start(supervised, fake_vllm(tmp_path))
    await supervisor.wait_for(EngineState.READY, timeout=30)
    first_pid = supervisor.pid
    seen: list[EngineState] = []
    supervisor.add_listener(seen.append)
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.HTTPError):
            await client.post(supervisor.base_url + "/_crash")
    await supervisor.wait_for(EngineState.RESTARTING, timeout=30)
    ready = await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=30)
    assert ready is EngineState.READY
    assert seen[:3] == [EngineState.RESTARTING, EngineState.STARTING, EngineState.READY]
    assert supervisor.pid != first_pid and supervisor.restarts == 1


async def test_crashes_beyond_the_bound_fail(
    tmp_path: Path, cues: dict[str, str], supervised: list[Supervisor]
) -> None:
    supervisor = await start(supervised, fake_vllm(tmp_path, max_restarts=1))
    for _ in range(2):
        await supervisor.wait_for(EngineState.READY, timeout=30)
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError):
                await client.post(supervisor.base_url + "/_crash")
        await supervisor.wait_for(EngineState.RESTARTING, EngineState.FAILED, timeout=30)
    assert await supervisor.wait_for(EngineState.FAILED, timeout=30) is EngineState.FAILED
    assert "crashed 2 times" in supervisor.detail


async def test_stop_kills_an_engine_that_ignores_sigterm_and_its_children(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_IGNORE_SIGTERM", "1")
    monkeypatch.setenv("FAKE_CHILD", "1")
    supervisor = await start(supervised, fake_vllm(tmp_path))
    await supervisor.wait_for(EngineState.READY, timeout=30)
    engine_pid = supervisor.pid
    child_pid = int((Path(os.environ["FAKE_STATE_DIR"]) / "child.pid").read_text())
    await supervisor.stop()
    assert supervisor.state is EngineState.STOPPED
    for pid in (engine_pid, child_pid):
        assert pid is not None and not alive(pid)


async def test_an_illegal_instruction_fails_at_once_and_says_why(
    tmp_path: Path, cues: dict[str, str], supervised: list[Supervisor]
) -> None:
    supervisor = await start(supervised, fake_vllm(tmp_path))
    await supervisor.wait_for(EngineState.READY, timeout=30)
    async with httpx.AsyncClient() as client:
        with pytest.raises(httpx.HTTPError):
            await client.post(supervisor.base_url + "/_crash", params={"signal": "SIGILL"})
    assert await supervisor.wait_for(EngineState.FAILED, timeout=30) is EngineState.FAILED
    assert supervisor.reason == (
        "the engine was killed by SIGILL (illegal instruction: built for a CPU feature this "
        "machine does not allow)"
    )
    assert "restarting cannot help" in supervisor.detail
    assert (Path(os.environ["FAKE_STATE_DIR"]) / "starts").read_text() == "1"


async def test_a_crash_right_after_every_start_fails_with_its_cause(
    tmp_path: Path, cues: dict[str, str], supervised: list[Supervisor]
) -> None:
    supervisor = await start(supervised, fake_vllm(tmp_path, max_restarts=1))
    for _ in range(2):
        await supervisor.wait_for(EngineState.READY, timeout=30)
        async with httpx.AsyncClient() as client:
            with pytest.raises(httpx.HTTPError):
                await client.post(supervisor.base_url + "/_crash", params={"signal": "SIGSEGV"})
        await supervisor.wait_for(EngineState.RESTARTING, EngineState.FAILED, timeout=30)
    assert await supervisor.wait_for(EngineState.FAILED, timeout=30) is EngineState.FAILED
    assert supervisor.reason.startswith("the engine was killed by SIGSEGV (segmentation fault")
    assert supervisor.reason.endswith("right after every start")


@pytest.mark.parametrize(
    ("code", "said"),
    [
        (1, "exited with code 1"),
        (-4, "was killed by SIGILL (illegal instruction"),
        (132, "exited with code 132: was killed by SIGILL"),
        (-15, "was killed by SIGTERM"),
    ],
)
def test_exits_are_described(code: int, said: str) -> None:
    assert describe_exit(code).startswith(said)


async def test_a_start_that_times_out_names_the_phase_it_stopped_in(
    tmp_path: Path,
    cues: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    supervised: list[Supervisor],
) -> None:
    monkeypatch.setenv("FAKE_START_DELAY", "30")  # stuck after "Starting to load model"
    supervisor = await start(supervised, fake_vllm(tmp_path, ready_timeout=2, max_restarts=0))
    assert (
        await supervisor.wait_for(EngineState.FAILED, EngineState.READY, timeout=30)
        is EngineState.FAILED
    )
    assert "not ready within ENGINE_READY_TIMEOUT=2 s" in supervisor.detail
    assert "stopped in 'loading weights'" in supervisor.detail
    assert "engine process started" in supervisor.detail  # the timeline up to there
    assert supervisor.pid is None


async def test_a_ready_engine_logs_its_start_timeline(
    tmp_path: Path, cues: dict[str, str], supervised: list[Supervisor]
) -> None:
    supervisor = await start(supervised, fake_vllm(tmp_path))
    assert (
        await supervisor.wait_for(EngineState.READY, EngineState.FAILED, timeout=30)
        is EngineState.READY
    )
    phases = [name for _, name in supervisor.timeline.seen]
    assert phases[:5] == [
        "process spawned",
        "API server up",
        "engine process started",
        "distributed group (NCCL) set up",
        "loading weights",
    ]
    assert "weights loaded" in phases and "KV cache allocated" in phases
