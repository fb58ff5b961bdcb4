"""The planner over 1, 2 and 4 GPUs on config.json fixtures: which splits, which floors."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from lowvram.engine.errors import PlanError
from lowvram.engine.hardware import GpuFacts, Hardware, HostFacts, detect_hardware, visible
from lowvram.engine.units import GiB
from lowvram.engine.vllm.deployment import Deployment, plan_deployment
from lowvram.engine.vllm.planner import HOST_RESERVE, plan_vllm
from tests.engine.test_planner import FIXTURES, facts
from tests.helpers import asked

HOST = HostFacts(256 * GiB, 250 * GiB)


def machine(n: int, gib: int = 24, host: HostFacts = HOST) -> Hardware:
    card = GpuFacts(f"{gib} GB card", gib * GiB, gib * GiB, (8, 9), 25e9)
    return Hardware(tuple(replace(card, index=i) for i in range(n)), host)


def deploy(name: str, n: int, vram: float, **kw: object) -> Deployment:
    return plan_deployment(facts(name), machine(n), asked(vram=int(vram * GiB), gpus=n, **kw))


def test_one_gpu_is_the_single_gpu_plan() -> None:
    one = deploy("qwen2.5-14b-instruct", 1, 10)
    alone = plan_vllm(facts("qwen2.5-14b-instruct"), machine(1).gpus[0], HOST, asked(vram=10 * GiB))
    assert one.groups == ((0,),) and one.plan == alone
    assert one.explain() == alone.explain()  # nothing about GPUs to add


def test_a_model_that_fits_one_gpu_runs_as_replicas() -> None:
    two = deploy("qwen3-8b", 2, 22)
    assert two.groups == ((0,), (1,)) and two.plan.tensor_parallel == 1
    four = deploy("qwen3-8b", 4, 22)
    assert four.groups == ((0,), (1,), (2,), (3,))
    assert four.tokens_per_s == pytest.approx(2 * two.tokens_per_s)
    assert any("replicas: each GPU serves the whole model" in r for r in two.reasons)


def test_a_model_that_offloads_is_split_and_offloads_less() -> None:
    one = deploy("llama-3.3-70b-instruct-awq", 1, 10, concurrency=16)
    two = deploy("llama-3.3-70b-instruct-awq", 2, 10, concurrency=16)
    assert two.groups == ((0, 1),) and two.plan.tensor_parallel == 2
    # Each GPU holds half of each layer: fewer bytes cross each link per step...
    assert two.plan.cpu_offload_bytes < 0.6 * one.plan.cpu_offload_bytes
    # ...so one split engine beats two replicas that each offload everything.
    replicas = next(r for r in two.reasons if r.startswith("2 replicas of one GPU"))
    assert "layers offloaded per GPU" in replicas  # a replica offloads most of its layers
    assert two.tokens_per_s > 1.2 * 2 * one.tokens_per_s
    assert "--tensor-parallel-size" in two.plan.to_argv()


def test_a_70b_fits_four_24gb_cards_split_four_ways_in_fp8() -> None:
    four = deploy("deepseek-r1-distill-llama-70b", 4, 23)
    assert four.groups == ((0, 1, 2, 3),) and four.plan.tensor_parallel == 4
    assert four.plan.offloaded_layers == 0 and four.plan.quantization == "fp8"
    # Key/value heads split too: a quarter of the KV cache per token on each GPU.
    whole = facts("deepseek-r1-distill-llama-70b").kv_bytes_per_token()
    assert four.plan.kv_bytes_per_token == whole // 4


def test_heads_that_do_not_split_are_pipelined() -> None:
    # Qwen2.5-7B: 28 attention heads do not split 8 ways; its 28 layers do.
    eight = deploy("qwen2.5-7b-instruct", 8, 6, replicas=1)
    assert eight.plan.tensor_parallel == 1 and eight.plan.pipeline_parallel == 8
    argv = eight.plan.to_argv()
    assert argv[argv.index("--pipeline-parallel-size") + 1] == "8"
    assert any("28 attention heads do not split 8 ways" in r for r in eight.plan.reasons)


def test_quantized_groups_must_not_be_cut() -> None:
    awq = replace(facts("qwen2.5-7b-instruct-awq"), heads=32, kv_heads=8)
    assert awq.tensor_parallel_problem(2) is None
    problem = awq.tensor_parallel_problem(8)  # 18944 / 8 = 2368 columns: 18.5 groups of 128
    assert problem is not None and "128-weight groups" in problem


def test_key_value_heads_are_copied_where_there_are_fewer_than_gpus() -> None:
    model = facts("qwen2.5-7b-instruct")  # 4 key/value heads
    assert model.tensor_parallel_problem(4) is None
    shard = model.shard(tensor_parallel=4)
    assert shard.kv_heads == 1 and shard.heads == 7
    assert replace(model, heads=56).tensor_parallel_problem(8) is None
    assert replace(model, heads=56).shard(8).kv_heads == 1  # 4 heads, 8 GPUs: copies


def test_offloaded_layers_of_every_gpu_share_the_host_ram() -> None:
    host = HostFacts(64 * GiB, 40 * GiB)
    model = facts("llama-3.3-70b-instruct-awq")
    two = plan_deployment(model, machine(2, host=host), asked(vram=10 * GiB, gpus=2))
    assert 2 * two.plan.cpu_offload_bytes + HOST_RESERVE <= host.available_bytes


def test_replicas_and_gpu_counts_that_cannot_be() -> None:
    with pytest.raises(PlanError, match="does not divide 2 GPUs"):
        deploy("qwen3-8b", 2, 22, replicas=3)
    with pytest.raises(PlanError, match="4 GPU\\(s\\) asked, 2 visible"):
        plan_deployment(facts("qwen3-8b"), machine(2), asked(gpus=4))
    # The floor is per GPU: a 70B in 2 GiB per GPU does not fit however it is split.
    with pytest.raises(PlanError, match="per GPU over 2 GPUs: the floor is"):
        deploy("deepseek-r1-distill-llama-70b", 2, 2)


def test_by_default_every_visible_gpu_unless_a_budget_is_given() -> None:
    model = facts("qwen3-8b")
    assert plan_deployment(model, machine(2), asked()).replicas == 2
    assert plan_deployment(model, machine(2), asked(vram=20 * GiB)).groups == ((0,),)
    assert plan_deployment(model, machine(2), asked(vram=20 * GiB, replicas=2)).replicas == 2


def test_lowvram_plan_with_gpus_prints_the_split_and_its_json() -> None:
    model = str(FIXTURES / "llama-3.3-70b-instruct-awq")
    what_if = ["--gpu-memory", "24GiB", "--gpus", "2", "--vram", "10GiB"]
    what_if += ["--host-memory", "256GiB"]
    run = [sys.executable, "-m", "lowvram", "plan", model, *what_if]
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert text.startswith("deployment: one engine over 2 GPUs (GPUs 0,1)")
    assert "tensor parallel over 2 GPUs" in text
    data = json.loads(
        subprocess.run([*run, "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert data["gpu_groups"] == [[0, 1]] and data["tensor_parallel"] == 2
    assert "--tensor-parallel-size" in data["argv"]


# --- which GPUs ----------------------------------------------------------------------------


def test_cuda_visible_devices_narrows_the_gpus_in_its_order() -> None:
    gpus = list(machine(4).gpus)
    assert [g.index for g in visible(gpus, None)] == [0, 1, 2, 3]
    assert [g.index for g in visible(gpus, "2,0")] == [2, 0]
    assert [g.index for g in visible(gpus, "1,7,2")] == [1]  # CUDA stops at a bad index
    assert [g.index for g in visible(gpus, "")] == []
    assert len(visible(gpus, "GPU-8f2a")) == 4  # UUIDs are CUDA's to resolve


def test_what_if_gpus_come_as_many_as_asked() -> None:
    hardware = detect_hardware(asked(gpu_memory=24 * GiB, gpus=4, host_memory=64 * GiB))
    assert [g.index for g in hardware.gpus] == [0, 1, 2, 3]
    assert {g.total_bytes for g in hardware.gpus} == {24 * GiB}
