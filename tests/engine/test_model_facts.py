"""Reading model facts: config.json, safetensors indexes and headers, and what is missing."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from lowvram.engine.errors import ModelError
from lowvram.engine.vllm.model import load_model_facts, safetensors_bytes

FIXTURES = Path(__file__).parent / "fixtures"


def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    header: dict[str, object] = {}
    offset = 0
    sizes = {"BF16": 2, "F32": 4, "U8": 1}
    for name, (dtype, shape) in tensors.items():
        count = 1
        for dim in shape:
            count *= dim
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [offset, offset + count * sizes[dtype]],
        }
        offset += count * sizes[dtype]
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_checkpoint_bytes_come_from_safetensors_headers(tmp_path: Path) -> None:
    write_safetensors(tmp_path / "a.safetensors", {"w": ("BF16", [4, 8]), "b": ("F32", [8])})
    write_safetensors(tmp_path / "b.safetensors", {"q": ("U8", [16, 2])})
    assert safetensors_bytes(tmp_path) == 4 * 8 * 2 + 8 * 4 + 16 * 2


def test_the_index_total_size_wins(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1234}})
    )
    assert safetensors_bytes(tmp_path) == 1234


def test_a_directory_with_only_config_json_is_enough(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((FIXTURES / "qwen3-8b" / "config.json").read_text())
    facts = load_model_facts(str(tmp_path))
    assert (facts.layers, facts.kv_heads, facts.head_dim, facts.qk_norm) == (36, 8, 128, True)
    assert facts.checkpoint_bytes is None


def test_pre_quantized_configs_name_their_method() -> None:
    facts = load_model_facts(str(FIXTURES / "qwen2.5-7b-instruct-awq"))
    assert (facts.quant_method, facts.quant_bits) == ("awq", 4)


def test_missing_config_and_gguf_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model_facts(str(tmp_path))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"llama\.cpp"):
        load_model_facts(str(gguf))


def test_a_hub_id_without_the_hub_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"not cached, and the Hugging Face Hub cannot be reached"):
        load_model_facts("Qwen/Qwen2.5-7B-Instruct-does-not-exist-here")
