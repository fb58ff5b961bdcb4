"""The vLLM backend's own logic: its command, the log lines it reads, what it concludes."""

from __future__ import annotations

import pytest

from lowvram.engine.errors import SetupError
from lowvram.engine.hardware import GpuFacts, Hardware, HostFacts
from lowvram.engine.settings import EngineSettings
from lowvram.engine.units import GiB
from lowvram.engine.vllm.backend import VllmBackend
from lowvram.engine.vllm.model import load_model_facts
from tests.helpers import FIXTURES, TEST_MACHINE


def backend(vram: float = 5, free: int | None = None) -> VllmBackend:
    return VllmBackend(
        load_model_facts(str(FIXTURES / "qwen2.5-7b-instruct")),
        TEST_MACHINE,
        EngineSettings(_env_file=None, vram=int(vram * GiB)),  # type: ignore[call-arg]
        detect_free=lambda _: free,
        measure_vram=lambda _: int(4.5 * GiB),
    )


def test_the_command_binds_loopback_and_keeps_the_key_off_the_command_line() -> None:
    launch = backend().launch(port=40001, api_key="s3cret-key")
    argv = launch.argv
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert (
        argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "40001"
    )
    assert "s3cret-key" not in " ".join(argv)
    assert launch.env["VLLM_API_KEY"] == "s3cret-key"
    assert launch.env["VLLM_USE_V2_MODEL_RUNNER"] == "0"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.2 GiB", "out_of_memory"),
        ("ValueError: No available memory for the cache blocks. Try", "kv_cache_too_small"),
        (
            "(24.0 GiB KV cache is needed, which is larger than the available KV cache memory",
            "kv_cache_too_small",
        ),
        (
            "ValueError: Free memory on device cuda:0 (3.1/79.2 GiB) on startup is less than "
            "desired GPU memory utilization (0.1, 7.92 GiB).",
            "gpu_busy",
        ),
        ("RuntimeError: unrelated", None),
    ],
)
def test_known_failures_are_recognized(line: str, kind: str | None) -> None:
    assert backend().failure(["INFO starting", line, "Traceback ..."]) == kind


def test_verification_reads_vllm_lines() -> None:
    engine = backend()
    planned = engine.plan.offload_budget / GiB
    assert "embed" in engine.plan.vocab_modules
    moved_vocab(engine)
    for line in (
        f"INFO 11-21 [uva.py:59] Total CPU offloaded parameters: {planned:.2f}",
        "INFO 11-21 [gpu_model_runner.py:5348] Model loading took 3.01 GiB memory and 9.1 seconds",
        "INFO 11-21 [kv_cache_utils.py:2177] GPU KV cache size: 16,384 tokens",
    ):
        engine.observe(line)
    assert engine.verify() == []
    report = engine.report()
    assert (
        "weights 3.01 GiB" in report and "KV 16,384 tokens" in report and "VRAM 4.50 GiB" in report
    )


def test_missing_or_wrong_offload_is_a_problem() -> None:
    engine = backend()
    assert any("never logged" in problem for problem in engine.verify())
    engine.observe("Total CPU offloaded parameters: 0.5")
    assert any("offloaded 0.50 GiB" in problem for problem in engine.verify())


def moved_vocab(engine: VllmBackend, skip: str = "") -> None:
    """The plugin's lines for what the plan asks, as vLLM's log has them."""
    sizes = {
        "embed": engine.plan.embedding_offload_bytes,
        "lm_head": engine.plan.lm_head_offload_bytes,
    }
    for kind in engine.plan.vocab_modules:
        if kind != skip:
            engine.observe(
                f"INFO 11-21 [plugin.py:96] lowvram plugin: offloaded {kind}: "
                f"{sizes[kind] / GiB:.3f} GiB to host memory"
            )


def test_the_plugins_lines_are_checked_against_the_plan() -> None:
    engine = backend()
    engine.observe(f"Total CPU offloaded parameters: {engine.plan.offload_budget / GiB:.2f}")
    moved_vocab(engine, skip="embed")
    missing = engine.verify()
    assert len(missing) == 1 and "the embed" in missing[0] and "did not move it" in missing[0]
    engine.observe(
        "WARNING lowvram plugin: nothing offloaded: UVA is off here; the embed stays on the GPU"
    )
    assert "UVA is off here" in engine.verify()[0]  # what it said, not a guess
    engine.observe("INFO lowvram plugin: offloaded embed: 0.40 GiB to host memory")
    assert "moved 0.40 GiB of embed" in engine.verify()[0]


def test_weights_far_above_the_plan_mean_the_offload_did_not_happen() -> None:
    engine = backend()
    engine.observe(f"Total CPU offloaded parameters: {engine.plan.offload_budget / GiB:.2f}")
    moved_vocab(engine)
    assert engine.verify() == []
    engine.observe("Model loading took 7.90 GiB memory and 9.1 seconds")
    assert "less was offloaded than planned" in engine.verify()[0]


def test_a_kv_cache_smaller_than_one_sequence_is_a_problem() -> None:
    engine = backend(vram=16)
    engine.observe("GPU KV cache size: 1,024 tokens")
    assert "less than one" in engine.verify()[0]


def test_step_down_raises_the_rung_until_the_planner_gives_up() -> None:
    engine = backend(vram=5.5)
    changes = []
    while (change := engine.step_down("out_of_memory")) is not None and len(changes) < 10:
        changes.append(change)
    assert changes and changes[0].startswith("rung 1:")
    assert engine.plan.rung == len(changes)


def test_a_busy_gpu_is_re_planned_for_what_is_free() -> None:
    engine = backend(vram=8, free=int(6 * GiB))
    assert engine.step_down("gpu_busy") is not None
    assert engine.plan.budget == int(6 * GiB * 0.95)


# --- several GPUs ---------------------------------------------------------------------------

TWO_H200 = Hardware(
    tuple(GpuFacts("H200", 140 * GiB, 139 * GiB, (9, 0), 55e9, i) for i in range(2)),
    HostFacts(256 * GiB, 250 * GiB),
)


def on_two(model: str, vram: float, replica: int = 0, used: float = 9.0) -> VllmBackend:
    return VllmBackend(
        load_model_facts(str(FIXTURES / model)),
        TWO_H200,
        EngineSettings(_env_file=None, vram=int(vram * GiB), gpus=2),  # type: ignore[call-arg]
        replica=replica,
        measure_vram=lambda index: int((used + index) * GiB),
    )


def test_a_split_engine_gets_both_gpus_and_its_tensor_parallel_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engine = on_two("llama-3.3-70b-instruct-awq", 10)
    launch = engine.launch(port=40001, api_key="k")
    assert launch.argv[launch.argv.index("--tensor-parallel-size") + 1] == "2"
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert launch.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # the planner's numbering
    assert "tensor parallel over 2 GPUs" in launch.description
    before = engine.plan
    assert engine.step_down("out_of_memory") is not None
    assert engine.plan.tensor_parallel == 2 and engine.plan.rung == before.rung + 1
    # The next start says what it now runs, not what the first one did.
    assert f"(rung {before.rung + 1})" in engine.launch(port=40002, api_key="k").description


def test_each_replica_gets_its_own_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    first, second = (on_two("qwen3-8b", 22, replica=i) for i in (0, 1))
    assert first.deployment.replicas == 2 and first.plan.tensor_parallel == 1
    assert first.launch(40001, "k").env["CUDA_VISIBLE_DEVICES"] == "0"
    assert second.launch(40002, "k").env["CUDA_VISIBLE_DEVICES"] == "1"


def test_every_gpu_is_checked_against_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    engine = on_two("llama-3.3-70b-instruct-awq", 10, used=9.5)  # GPU 0: 9.5, GPU 1: 10.5 GiB
    engine.observed = {
        "offloaded_gib": engine.plan.offload_budget / GiB,
        "embed_gib": engine.plan.embedding_offload_bytes / GiB,
        "lm_head_gib": engine.plan.lm_head_offload_bytes / GiB,
    }
    problems = engine.verify()
    assert len(problems) == 1 and "GPU 1 uses 10.50 GiB" in problems[0]
    assert "GPU 0" not in problems[0]
    assert "GPU 0 9.50 GiB, GPU 1 10.50 GiB" in engine.report()


def test_replicas_refuse_gpus_named_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a,GPU-11c0")
    with pytest.raises(SetupError, match="indices"):
        on_two("qwen3-8b", 22)
