"""The planner on config.json fixtures of real models (their published dimensions)."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lowvram.engine.errors import PlanError
from lowvram.engine.hardware import GpuFacts, HostFacts, pcie_bytes_per_s
from lowvram.engine.units import GiB
from lowvram.engine.vllm.model import ModelFacts, load_model_facts
from lowvram.engine.vllm.plan import EnginePlan
from lowvram.engine.vllm.planner import ladder, plan_vllm
from tests.helpers import asked

FIXTURES = Path(__file__).parent / "fixtures"
CARD_24 = GpuFacts("24 GB card", 24 * GiB, 24 * GiB, (8, 9))
CARD_80 = GpuFacts("H100", 80 * GiB, 79 * GiB, (9, 0))
HOST_64 = HostFacts(64 * GiB, 64 * GiB)
MODELS = [
    "qwen2.5-7b-instruct",
    "qwen3-8b",
    "llama-3.1-8b-instruct",
    "qwen2.5-14b-instruct",
    "qwen2.5-32b-instruct",
    "deepseek-r1-distill-llama-70b",
    "qwen2.5-7b-instruct-awq",
    "llama-3.3-70b-instruct-awq",
]


def facts(name: str) -> ModelFacts:
    return load_model_facts(str(FIXTURES / name))


def plan(name: str, vram_gib: float, gpu: GpuFacts = CARD_24, **kw: object) -> EnginePlan:
    return plan_vllm(facts(name), gpu, HOST_64, asked(vram=int(vram_gib * GiB), **kw))


@pytest.mark.parametrize(
    ("name", "billions"),
    [
        ("qwen2.5-7b-instruct", 7.62),
        ("qwen3-8b", 8.19),
        ("llama-3.1-8b-instruct", 8.03),
        ("qwen2.5-14b-instruct", 14.77),
        ("deepseek-r1-distill-llama-70b", 70.55),
    ],
)
def test_parameter_counts_match_the_published_sizes(name: str, billions: float) -> None:
    assert facts(name).total_params / 1e9 == pytest.approx(billions, abs=0.05)


def test_7b_at_40_gib_is_not_quantized() -> None:
    p = plan("qwen2.5-7b-instruct", 40, CARD_80)
    assert p.quantization is None and p.offloaded_layers == 0
    assert "--quantization" not in p.to_argv()
    assert not p.enforce_eager  # room for CUDA graphs


def test_7b_at_5_gib_quantizes_and_offloads_whole_layers() -> None:
    p = plan("qwen2.5-7b-instruct", 5)
    assert p.quantization == "bitsandbytes"
    assert 0 < p.offloaded_layers < 28
    model = facts("qwen2.5-7b-instruct")
    layer_bytes = model.linear_params_per_layer // 2 + model.small_params_per_layer * 2
    assert p.cpu_offload_bytes == p.offloaded_layers * layer_bytes
    # The embedding goes with the layers (built before them: vLLM's budget covers both).
    assert p.vocab_offload in ("embed", "all")
    assert p.embedding_offload_bytes == model.embedding_params * 2
    argv = p.to_argv()
    budget = float(argv[argv.index("--cpu-offload-gb") + 1]) * GiB
    assert budget <= p.cpu_offload_bytes + p.embedding_offload_bytes < budget + 1024  # floored
    assert p.to_env()["VLLM_USE_V2_MODEL_RUNNER"] == "0"
    assert p.to_env()["LOWVRAM_OFFLOAD_VOCAB"].startswith("embed")


def test_70b_at_7_gib_on_a_24_gb_card_is_a_valid_plan_or_names_the_floor() -> None:
    try:
        p = plan("deepseek-r1-distill-llama-70b", 7)
    except PlanError as exc:
        assert "floor" in str(exc) and "GiB" in str(exc)
    else:
        assert p.estimate.total <= 7 * GiB
        assert p.offloaded_layers == 80
        assert p.kv_cache_bytes >= p.max_model_len * p.kv_bytes_per_token


def test_below_the_floor_is_refused_with_the_floor_named() -> None:
    with pytest.raises(PlanError, match=r"the floor is \d+\.\d\d GiB"):
        plan("deepseek-r1-distill-llama-70b", 4)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("vram", [6, 8, 12, 16, 22])
def test_every_plan_stays_within_its_budget(name: str, vram: int) -> None:
    try:
        p = plan(name, vram)
    except PlanError as exc:
        assert "floor" in str(exc)
        return
    assert p.estimate.total <= p.budget == vram * GiB
    assert p.kv_cache_bytes >= p.max_model_len * p.kv_bytes_per_token
    assert p.max_num_batched_tokens >= p.max_num_seqs


@pytest.mark.parametrize(
    "name", ["qwen2.5-7b-instruct", "qwen2.5-14b-instruct", "qwen2.5-32b-instruct"]
)
def test_more_vram_never_plans_worse(name: str) -> None:
    """More VRAM: never a lower rung of the ladder, and never more offload in the same one."""
    model = facts(name)
    order = [s.name for s in ladder(model, CARD_24)]
    plans = [plan(name, vram) for vram in (8, 10, 12, 16, 20, 23)]
    for smaller, larger in itertools.pairwise(plans):
        assert order.index(larger.quantization) <= order.index(smaller.quantization)
        if larger.quantization == smaller.quantization:
            assert larger.offloaded_layers <= smaller.offloaded_layers


def test_pre_quantized_checkpoints_keep_their_method() -> None:
    p = plan("qwen2.5-7b-instruct-awq", 8)
    assert p.quantization == "awq" and p.dtype == "auto"
    assert "--quantization" not in p.to_argv()  # vLLM reads the method from config.json
    assert any("the checkpoint's awq" in reason for reason in p.reasons)


def test_offload_needs_host_ram() -> None:
    with pytest.raises(PlanError, match="host RAM"):
        plan_vllm(
            facts("qwen2.5-32b-instruct"),
            CARD_24,
            HostFacts(16 * GiB, 8 * GiB),
            asked(vram=8 * GiB),
        )


def test_asked_context_and_concurrency_shape_the_kv_cache() -> None:
    p = plan("qwen2.5-7b-instruct", 10, context=8192, concurrency=2)
    assert (p.max_model_len, p.max_num_seqs) == (8192, 2)
    assert p.kv_cache_bytes == 2 * 8192 * p.kv_bytes_per_token


def test_context_is_capped_by_the_model() -> None:
    p = plan("qwen3-8b", 22, context=1_000_000)
    assert p.max_model_len == 40960


def test_a_higher_rung_is_more_cautious() -> None:
    model = facts("qwen2.5-14b-instruct")
    request = asked(vram=10 * GiB)
    first, second = (plan_vllm(model, CARD_24, HOST_64, request, rung=r) for r in (0, 1))
    assert second.rung == 1 and second.enforce_eager
    assert (second.offloaded_layers, -second.max_num_batched_tokens) > (
        first.offloaded_layers,
        -first.max_num_batched_tokens,
    )


def test_old_gpus_get_float16() -> None:
    turing = GpuFacts("T4", 16 * GiB, 16 * GiB, (7, 5))
    p = plan_vllm(facts("qwen2.5-7b-instruct"), turing, HOST_64, asked(vram=12 * GiB))
    assert p.dtype == "float16"


def test_a_budget_beyond_the_card_is_refused() -> None:
    with pytest.raises(PlanError, match="more than the GPU has"):
        plan("qwen2.5-7b-instruct", 30)


def test_explain_shows_the_table_and_the_reasons() -> None:
    text = plan("qwen2.5-7b-instruct", 5).explain()
    for needle in (
        "weights on the GPU",
        "KV cache",
        "activations",
        "total (estimate)",
        "offloaded to host",
        "why:",
        "--kv-cache-memory-bytes",
    ):
        assert needle in text


def lowvram(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lowvram", *args], capture_output=True, text=True, timeout=60
    )


def test_cli_plans_from_a_directory_with_only_config_json() -> None:
    result = lowvram(
        "plan",
        str(FIXTURES / "qwen2.5-14b-instruct"),
        "--vram",
        "8GiB",
        "--gpu-memory",
        "24GiB",
        "--host-memory",
        "64GiB",
    )
    assert result.returncode == 0, result.stderr
    assert "offloaded to host" in result.stdout and "bitsandbytes" in result.stdout


def test_cli_json_is_machine_readable() -> None:
    result = lowvram(
        "plan",
        str(FIXTURES / "qwen2.5-7b-instruct"),
        "--vram",
        "6GiB",
        "--gpu-memory",
        "24GiB",
        "--host-memory",
        "64GiB",
        "--json",
        "--context",
        "2048",
        "--concurrency",
        "2",
    )
    data = json.loads(result.stdout)
    assert data["max_model_len"] == 2048 and data["max_num_seqs"] == 2
    assert data["estimate"]["kv_cache"] == data["kv_cache_bytes"]
    assert "--max-model-len" in data["argv"] and data["env"]["VLLM_USE_FLASHINFER_SAMPLER"] == "0"


def test_cli_refusal_is_a_clear_error_not_a_traceback() -> None:
    result = lowvram(
        "plan",
        str(FIXTURES / "deepseek-r1-distill-llama-70b"),
        "--vram",
        "3GiB",
        "--gpu-memory",
        "24GiB",
        "--host-memory",
        "64GiB",
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "floor" in result.stderr
    assert "Traceback" not in result.stderr


# --- planning for speed: paged KV, the ladder, offload for throughput ------------------------

ADA_24 = GpuFacts("RTX 4090", 24 * GiB, 24 * GiB, (8, 9), 25e9)
AMPERE_24 = GpuFacts("RTX 3090", 24 * GiB, 24 * GiB, (8, 6), 25e9)


def test_concurrency_sets_max_num_seqs_and_the_kv_cache_is_paged() -> None:
    p = plan("qwen2.5-7b-instruct", 16, ADA_24)
    assert p.max_num_seqs == 8  # the default
    # At least one whole context, and no more than every sequence at full length.
    assert p.max_model_len <= p.kv_cache_tokens <= p.max_num_seqs * p.max_model_len


def test_8b_at_22_gib_with_32k_context_runs_fp8_with_cuda_graphs_where_the_gpu_has_fp8() -> None:
    p = plan("qwen3-8b", 22, ADA_24, context=32768)
    assert (p.quantization, p.quantization_arg, p.offloaded_layers) == ("fp8", "fp8", 0)
    assert not p.enforce_eager and p.max_model_len == 32768
    assert p.kv_cache_tokens >= 32768
    argv = p.to_argv()
    assert argv[argv.index("--quantization") + 1] == "fp8" and "--enforce-eager" not in argv
    older = plan("qwen3-8b", 22, AMPERE_24, context=32768)
    assert older.quantization == "bitsandbytes"  # no FP8 before compute capability 8.9


def test_fp8_beats_4_bit_at_12_gib_even_with_fewer_sequences_at_once() -> None:
    # The configuration measured on the H200: FP8 272 tok/s for one stream, 1,885 for 8;
    # bitsandbytes at the same budget 175 and 577 (docs/benchmarks.md).
    p = plan("qwen3-8b", 12, ADA_24, context=2048)
    assert p.quantization == "fp8" and p.offloaded_layers == 0 and not p.enforce_eager
    assert any("more tokens/s than 4-bit" in reason for reason in p.reasons)


def test_under_offload_sequences_are_kept_rather_than_layers() -> None:
    throughput = plan("qwen3-8b", 6, ADA_24)
    latency = plan("qwen3-8b", 6, ADA_24, optimize="latency")  # type: ignore[arg-type]
    assert throughput.offloaded_layers > 0
    typical = throughput.max_model_len // 4
    assert throughput.kv_cache_tokens >= throughput.max_num_seqs * typical  # all 8 run
    assert latency.offloaded_layers <= throughput.offloaded_layers
    assert latency.kv_cache_tokens <= throughput.kv_cache_tokens


def test_a_70b_awq_checkpoint_at_10_gib_offloads_for_16_sequences() -> None:
    p = plan("llama-3.3-70b-instruct-awq", 10, ADA_24, concurrency=16)
    assert p.quantization == "awq" and p.max_num_seqs == 16
    # Nearly every layer, and the vocabulary: the room they free serves the sequences.
    assert 64 <= p.offloaded_layers <= 80 and p.vocab_offload == "all"
    assert p.kv_cache_tokens >= 3 * p.max_model_len


def test_the_pcie_rate_in_the_reasons_is_the_link_s_or_said_to_be_assumed() -> None:
    measured = plan("qwen3-8b", 6, GpuFacts("H200", 140 * GiB, 140 * GiB, (9, 0), 54.8e9))
    assert any("55 GB/s (measured from the PCIe link)" in r for r in measured.reasons)
    assumed = plan("qwen3-8b", 6, GpuFacts("?", 24 * GiB, 24 * GiB, (8, 9)))
    assert any("25 GB/s (assumed: PCIe 4.0 x16)" in r for r in assumed.reasons)


@pytest.mark.parametrize(
    ("generation", "width", "gb_per_s"), [(5, 16, 54.8), (4, 16, 27.4), (3, 8, 6.9)]
)
def test_pcie_rate_from_the_link(generation: int, width: int, gb_per_s: float) -> None:
    assert pcie_bytes_per_s(generation, width) == pytest.approx(gb_per_s * 1e9, rel=0.01)
