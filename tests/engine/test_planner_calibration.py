"""The planner against what vLLM 0.26.0 used on a GPU (docs/benchmarks.md, an H200).

These are measurements, not choices: if a change to the memory model moves an estimate
more than 10% from what nvidia-smi showed, or plans these budgets differently, this fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lowvram.engine.hardware import GpuFacts, HostFacts
from lowvram.engine.units import GiB
from lowvram.engine.vllm.model import parse_config
from lowvram.engine.vllm.planner import plan_vllm
from tests.helpers import asked

# ../shared/gpu/mkmodel.py: the Qwen2.5-0.5B config (vocab 151936) with these shapes.
BASE = json.loads(
    (Path(__file__).parent / "fixtures" / "qwen2.5-7b-instruct" / "config.json").read_text()
)
SHAPES = {
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    ),
    "14b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}
H200 = GpuFacts("NVIDIA H200", int(139.8 * GiB), int(139.3 * GiB), (9, 0))
HOST = HostFacts(125 * GiB, 123 * GiB)

# shape, budget GiB, (context, sequences asked), measured GiB, planned (offloaded, sequences)
MEASURED = [
    ("0.5b", 3, (2048, 4), 2.52, (0, 4)),
    ("7b", 5, (2048, 8), 4.67, (27, 4)),
    ("7b", 8, (2048, 8), 7.53, (5, 8)),
    ("7b", 16, (2048, 8), 8.43, (0, 8)),
    ("14b", 8, (2048, 8), 7.78, (41, 4)),
]


@pytest.mark.parametrize(("shape", "budget", "wanted", "measured", "planned"), MEASURED)
def test_estimates_stay_within_10_percent_of_what_the_gpu_measured(
    shape: str, budget: int, wanted: tuple[int, int], measured: float, planned: tuple[int, int]
) -> None:
    model = parse_config(BASE | {"vocab_size": 151936} | SHAPES[shape], shape)
    context, seqs = wanted
    plan = plan_vllm(model, H200, HOST, asked(vram=budget * GiB, context=context, concurrency=seqs))
    assert (plan.offloaded_layers, plan.max_num_seqs) == planned
    estimate = plan.estimate.total / GiB
    assert abs(estimate - measured) / measured <= 0.10
    assert measured <= budget
