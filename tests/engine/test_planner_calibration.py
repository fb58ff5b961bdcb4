"""The planner's memory model against what vLLM 0.26.0 used on a GPU (docs/benchmarks.md).

These are measurements, not choices: each row is a configuration that ran, with what
nvidia-smi showed once it was ready. If a change to the memory model moves an estimate more
than 10% from that, this fails. Plans change with the planner; the rows do not.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lowvram.engine.hardware import GpuFacts
from lowvram.engine.units import GiB
from lowvram.engine.vllm.memory import Shape, VocabOffload, kv_room, ladder
from lowvram.engine.vllm.memory import estimate as memory_estimate
from lowvram.engine.vllm.model import parse_config

# ../shared/gpu/mkmodel.py and bench/gpu_models.py: random-weight checkpoints with these shapes.
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
QWEN3_8B = dict(
    model_type="qwen3",
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=False,
)
LLAMA_70B_AWQ = dict(
    model_type="llama",
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    tie_word_embeddings=False,
    attention_bias=False,
    torch_dtype="float16",
    quantization_config={"quant_method": "awq", "bits": 4, "group_size": 128},
)
SHAPES |= {"qwen3-8b": QWEN3_8B, "llama-70b-awq": LLAMA_70B_AWQ}
H200 = GpuFacts("NVIDIA H200", int(139.8 * GiB), int(139.3 * GiB), (9, 0), 55e9)

# shape, format, offloaded layers, sequences, context, batched tokens, eager, KV tokens,
# budget GiB, measured GiB (nvidia-smi once ready); the vocabulary on the GPU
MEASURED: list[tuple[Any, ...]] = [
    ("0.5b", None, 0, 4, 2048, 2048, True, 8192, 3, 2.52),
    ("7b", "bitsandbytes", 27, 4, 2048, 512, True, 8192, 5, 4.67),
    ("7b", "bitsandbytes", 5, 8, 2048, 256, True, 16384, 8, 7.53),
    ("7b", "bitsandbytes", 0, 8, 2048, 2048, True, 16384, 16, 8.43),
    ("14b", "bitsandbytes", 41, 4, 2048, 512, True, 8192, 8, 7.78),
    # The speed planner's plans, 2026-11-22 (FP8, CUDA graphs, paged KV, offload for 8-16).
    ("qwen3-8b", "fp8", 0, 8, 32768, 2048, False, 73328, 22, 20.71),
    ("qwen3-8b", "fp8", 0, 8, 2048, 2048, False, 4160, 12, 11.80),
    ("qwen3-8b", "bitsandbytes", 0, 8, 2048, 2048, False, 16384, 12, 10.04),
    ("qwen3-8b", "bitsandbytes", 33, 8, 4096, 256, True, 8208, 6, 5.82),
    ("llama-70b-awq", "awq", 80, 16, 4096, 1024, True, 10256, 10, 9.72),
]
# The same, and where lowvram's plugin put the vocabulary (2026-12-01, H200).
MEASURED_VOCAB: list[tuple[Any, ...]] = [
    ("qwen3-8b", "bitsandbytes", 29, 8, 4096, 256, True, 8192, 4, 3.77, "all"),
    ("qwen3-8b", "bitsandbytes", 8, 8, 4096, 256, True, 8224, 6, 5.75, "all"),
    ("qwen3-8b", "bitsandbytes", 33, 8, 4096, 256, True, 8208, 6, 5.82, "none"),
    ("llama-70b-awq", "awq", 80, 8, 512, 256, True, 608, 2, 1.80, "all"),
    ("llama-70b-awq", "awq", 73, 16, 4096, 256, True, 16464, 10, 9.71, "all"),
]


@pytest.mark.parametrize(
    (
        "shape",
        "fmt",
        "offloaded",
        "seqs",
        "context",
        "tokens",
        "eager",
        "kv",
        "budget",
        "measured",
        "vocab",
    ),
    [(*row, "none") for row in MEASURED] + MEASURED_VOCAB,
)
def test_estimates_stay_within_10_percent_of_what_the_gpu_measured(
    shape: str,
    fmt: str | None,
    offloaded: int,
    seqs: int,
    context: int,
    tokens: int,
    eager: bool,
    kv: int,
    budget: int,
    measured: float,
    vocab: VocabOffload,
) -> None:
    model = parse_config(BASE | {"vocab_size": 151936} | SHAPES[shape], shape)
    scheme = next(s for s in ladder(model, H200) if s.name == fmt)
    # The whole budget: these configurations ran in it (the planner keeps a safety margin
    # on top, which is its choice, not the GPU's).
    shape = Shape(scheme, context, seqs, tokens, eager, offloaded, vocab=vocab)
    assert kv * model.kv_bytes_per_token() <= kv_room(model, shape, budget * GiB), (
        "the measured configuration must fit its budget"
    )
    estimate = memory_estimate(model, shape, kv).total / GiB
    assert abs(estimate - measured) / measured <= 0.10
    assert measured <= budget
