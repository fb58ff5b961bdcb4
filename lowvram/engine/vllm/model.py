"""A Hugging Face checkpoint's shapes, as the vLLM planner needs them.

Everything here reads; nothing decides. A model is a local Hugging Face directory (only
`config.json` is required) or a Hub id, whose `config.json` and safetensors index are
fetched with huggingface_hub.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lowvram.engine.errors import ModelError
from lowvram.engine.hub import hub_reachable

_SAFETENSORS_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class ModelFacts:
    """Shapes of a decoder-only transformer, as `config.json` publishes them."""

    name: str
    architecture: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    max_position: int
    dtype: str = "bfloat16"
    quant_method: str | None = None
    """Pre-quantized checkpoints: awq, gptq, fp8, bitsandbytes, compressed-tensors."""
    quant_bits: int | None = None
    quant_group_size: int | None = None
    """Weights per quantization scale (AWQ, GPTQ: 128 usually); a tensor-parallel shard
    must hold whole groups."""
    qkv_bias: bool = False
    qk_norm: bool = False
    experts: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    checkpoint_bytes: int | None = None
    """Bytes of the weights on disk, from the safetensors index or headers, when known."""
    chat_template: str | None = None
    """The Jinja chat template, when the checkpoint has one where we looked."""

    # --- parameter counts --------------------------------------------------------------

    @property
    def attention_linear_params(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        return 2 * q + kv  # q and o, k and v

    @property
    def mlp_linear_params(self) -> int:
        if self.experts:
            routed = self.experts * 3 * self.hidden * self.expert_intermediate
            shared = 3 * self.hidden * self.shared_expert_intermediate
            return routed + shared
        return 3 * self.hidden * self.intermediate

    @property
    def linear_params_per_layer(self) -> int:
        """Parameters in the layer's Linear modules: what quantization shrinks."""
        return self.attention_linear_params + self.mlp_linear_params

    @property
    def small_params_per_layer(self) -> int:
        """Norms, biases and routers: kept in the model's dtype."""
        params = 2 * self.hidden
        if self.qkv_bias:
            params += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            params += 2 * self.head_dim
        if self.experts:
            params += self.hidden * self.experts
        return params

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        per_layer = self.linear_params_per_layer + self.small_params_per_layer
        return self.layers * per_layer + self.embedding_params + self.lm_head_params + self.hidden

    @property
    def largest_linear_params(self) -> int:
        """The biggest single weight matrix (a shard of a merged layer)."""
        mlp = self.hidden * (self.expert_intermediate if self.experts else self.intermediate)
        return max(mlp, self.hidden * self.heads * self.head_dim)

    def kv_bytes_per_token(self, kv_dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_dtype_bytes

    # --- splitting over GPUs ----------------------------------------------------------

    def tensor_parallel_problem(self, size: int) -> str | None:
        """Why vLLM cannot split this model `size` ways by tensors; None if it can.

        Attention splits by heads (key/value heads are replicated where there are fewer
        than GPUs), the MLP by columns of its intermediate size; a quantized shard must
        hold whole groups of weights.
        """
        if self.heads % size:
            return f"{self.heads} attention heads do not split {size} ways"
        if self.kv_heads % size and size % self.kv_heads:
            return f"{self.kv_heads} key/value heads do not split {size} ways"
        inter = self.expert_intermediate if self.experts else self.intermediate
        if inter % size:
            return f"the MLP's {inter} columns do not split {size} ways"
        group = self.quant_group_size
        if group and ((inter // size) % group or (self.heads * self.head_dim // size) % group):
            return f"a 1/{size} shard would cut the checkpoint's {group}-weight groups"
        return None

    def shard(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> ModelFacts:
        """What one GPU holds when vLLM splits the model: heads, MLP columns and vocabulary
        `tensor_parallel` ways (its column- and row-parallel layers), layers
        `pipeline_parallel` ways. Norms and the residual stream stay whole on every GPU."""
        tp = tensor_parallel
        if tp == 1 and pipeline_parallel == 1:
            return self
        return replace(
            self,
            heads=self.heads // tp,
            kv_heads=max(1, self.kv_heads // tp),
            intermediate=self.intermediate // tp,
            expert_intermediate=self.expert_intermediate // tp,
            shared_expert_intermediate=self.shared_expert_intermediate // tp,
            vocab=-(-self.vocab // tp),
            layers=-(-self.layers // pipeline_parallel),
        )


def parse_config(config: dict[str, Any], name: str) -> ModelFacts:
    """ModelFacts from a `config.json`; multimodal configs nest it under `text_config`."""
    text = config.get("text_config") or config
    try:
        hidden = int(text["hidden_size"])
        heads = int(text["num_attention_heads"])
        quant = config.get("quantization_config") or text.get("quantization_config") or {}
        experts = int(
            text.get("num_experts")
            or text.get("num_local_experts")
            or text.get("n_routed_experts")
            or 0
        )
        return ModelFacts(
            name=name,
            architecture=str(text.get("model_type") or (config.get("architectures") or ["?"])[0]),
            hidden=hidden,
            intermediate=int(text.get("intermediate_size") or 0),
            layers=int(text["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(text.get("num_key_value_heads") or heads),
            head_dim=int(text.get("head_dim") or hidden // heads),
            vocab=int(text["vocab_size"]),
            tied_embeddings=bool(
                text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))
            ),
            max_position=int(text.get("max_position_embeddings") or 4096),
            dtype=str(
                text.get("torch_dtype")
                or text.get("dtype")
                or config.get("torch_dtype")
                or "bfloat16"
            ),
            quant_method=quant.get("quant_method"),
            quant_bits=quant.get("bits") or (4 if quant.get("load_in_4bit") else None),
            quant_group_size=quant.get("group_size")
            if isinstance(quant.get("group_size"), int) and quant["group_size"] > 0
            else None,
            qkv_bias=bool(text.get("attention_bias", text.get("model_type") == "qwen2")),
            qk_norm=text.get("model_type") in ("qwen3", "qwen3_moe"),
            experts=experts,
            expert_intermediate=int(
                text.get("moe_intermediate_size") or text.get("intermediate_size") or 0
            )
            if experts
            else 0,
            shared_expert_intermediate=int(text.get("shared_expert_intermediate_size") or 0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelError(f"{name}: config.json lacks what the planner needs ({exc})") from exc


def safetensors_bytes(directory: Path) -> int | None:
    """Weight bytes from the index's `total_size`, else from each file's header."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        total = json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if isinstance(total, int):
            return total
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for key, tensor in header.items():
            if key == "__metadata__":
                continue
            count = 1
            for dim in tensor["shape"]:
                count *= dim
            total += count * _SAFETENSORS_DTYPE_BYTES.get(tensor["dtype"], 2)
    return total


def load_model_facts(model: str) -> ModelFacts:
    """Facts for a local directory (config.json is enough) or a Hugging Face Hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelError(f"{path} has no config.json")
        facts = parse_config(json.loads(config_file.read_text()), model)
        return replace(
            facts, checkpoint_bytes=safetensors_bytes(path), chat_template=chat_template(path)
        )
    if path.suffix == ".gguf" or path.exists():
        raise ModelError(f"{model} is not a Hugging Face model directory (GGUF goes to llama.cpp)")
    if model.startswith(("/", "./", "../", "~")):
        raise ModelError(f"no such directory: {path}")
    return _from_hub(model)


def chat_template(directory: Path) -> str | None:
    """`chat_template.jinja`, else `tokenizer_config.json`'s (a string, or named ones)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = directory / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text()).get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template if isinstance(template, str) else None


def _from_hub(repo_id: str) -> ModelFacts:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ModelError(
            f"{repo_id}: not a directory, and huggingface_hub is not installed"
        ) from exc

    offline = not hub_reachable()  # then the cache only: no ~20 s of retries

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
        except Exception:  # the hub client raises many kinds; all mean "not there"
            return None

    config = fetch("config.json")
    if config is None and offline:
        raise ModelError(
            f"{repo_id}: not a local directory, not cached, and the Hugging Face Hub cannot "
            "be reached from here (a directory with config.json is enough to plan)"
        )
    if config is None:
        raise ModelError(f"{repo_id}: could not fetch config.json from the Hub")
    facts = parse_config(json.loads(config.read_text()), repo_id)
    index = fetch("model.safetensors.index.json")  # single-file checkpoints have none
    template = fetch("chat_template.jinja") or fetch("tokenizer_config.json")
    return replace(
        facts,
        checkpoint_bytes=json.loads(index.read_text()).get("metadata", {}).get("total_size")
        if index
        else None,
        chat_template=chat_template(template.parent) if template else None,
    )
