"""Device side: random-weight checkpoints for the GPU benchmarks, with the real Qwen2.5
tokenizer (../shared/gpu/mkmodel.py's, staged in /tmp/gpu/tokenizer).

    python -m bench.gpu_models OUT_DIR qwen3-8b          # bf16, Qwen3-8B's shapes
    python -m bench.gpu_models OUT_DIR llama-70b-awq     # AWQ 4-bit (GEMM, group 128),
                                                          # Llama-3.3-70B's shapes

The weights are random (the text is gibberish) but the shapes, bytes, kernels and code
paths are the real ones. Both keep the tokenizer's vocabulary (151,936 rows): Llama's own
128,256 would not cover the Qwen tokenizer's ids. The AWQ checkpoint is written tensor by
tensor in AutoAWQ's GEMM layout (qweight and qzeros packed 8 per int32, fp16 scales per
group of 128 inputs), so vLLM loads it with its AWQ (Marlin) kernels; ~37 GB.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER = Path("/tmp/gpu/tokenizer")
VOCAB = 151936
GROUP = 128

QWEN3_8B = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB,
    "torch_dtype": "bfloat16",
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}
LLAMA_70B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "vocab_size": VOCAB,
    "torch_dtype": "float16",
    "attention_bias": False,
    "hidden_act": "silu",
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "quantization_config": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP,
        "version": "gemm",
        "zero_point": True,
    },
}


def copy_tokenizer(out: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TOKENIZER / name, out / name)


def write_bf16(out: Path, config: dict[str, object]) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    (out / "config.json").write_text(json.dumps(config))
    cfg = AutoConfig.from_pretrained(out)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="4GB")


def awq_linear(prefix: str, inputs: int, outputs: int) -> dict[str, torch.Tensor]:
    """One AWQ GEMM linear: 4-bit weights and zero points packed 8 to an int32."""
    info = torch.iinfo(torch.int32)
    groups = inputs // GROUP
    return {
        f"{prefix}.qweight": torch.randint(
            info.min, info.max, (inputs, outputs // 8), dtype=torch.int32, device="cuda"
        ).cpu(),
        # Zero point 8 in every nibble: weights centred on zero.
        f"{prefix}.qzeros": torch.full(
            (groups, outputs // 8), 0x88888888 - 2**32, dtype=torch.int32
        ),
        f"{prefix}.scales": (torch.rand(groups, outputs, device="cuda") * 0.002).half().cpu(),
    }


def write_awq(out: Path, config: dict[str, object]) -> None:
    shape = {k: v for k, v in config.items() if isinstance(v, int)}
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    head_dim = hidden // heads
    layers = shape["num_hidden_layers"]
    shards: list[dict[str, torch.Tensor]] = [
        {
            "model.embed_tokens.weight": torch.randn(VOCAB, hidden, dtype=torch.half) * 0.02,
            "lm_head.weight": torch.randn(VOCAB, hidden, dtype=torch.half) * 0.02,
            "model.norm.weight": torch.ones(hidden, dtype=torch.half),
        }
    ]
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors = {
            f"{p}.input_layernorm.weight": torch.ones(hidden, dtype=torch.half),
            f"{p}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.half),
        }
        for name, n_in, n_out in (
            ("self_attn.q_proj", hidden, heads * head_dim),
            ("self_attn.k_proj", hidden, kv * head_dim),
            ("self_attn.v_proj", hidden, kv * head_dim),
            ("self_attn.o_proj", heads * head_dim, hidden),
            ("mlp.gate_proj", hidden, inter),
            ("mlp.up_proj", hidden, inter),
            ("mlp.down_proj", inter, hidden),
        ):
            tensors |= awq_linear(f"{p}.{name}", n_in, n_out)
        if i % 8 == 0:
            shards.append({})
        shards[-1] |= tensors
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps(config))


def main() -> None:
    out, preset = Path(sys.argv[1]), sys.argv[2]
    out.mkdir(parents=True, exist_ok=True)
    if preset == "qwen3-8b":
        write_bf16(out, QWEN3_8B)
    elif preset == "llama-70b-awq":
        write_awq(out, LLAMA_70B)
    else:
        raise SystemExit(f"unknown preset {preset}: qwen3-8b or llama-70b-awq")
    copy_tokenizer(out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {preset}, {size / 1e9:.1f} GB of weights", flush=True)


if __name__ == "__main__":
    main()
