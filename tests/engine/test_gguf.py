"""The GGUF metadata reader on files written by the `gguf` package (llama.cpp's own writer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from lowvram.engine.errors import GgufError, ModelError
from lowvram.engine.llamacpp.gguf import read_metadata


def write_tiny(path: Path) -> None:
    writer = GGUFWriter(str(path), "qwen2")
    writer.add_block_count(24)
    writer.add_context_length(32768)
    writer.add_embedding_length(896)
    writer.add_head_count(14)
    writer.add_head_count_kv(2)
    writer.add_chat_template("{{ messages[0]['content'] }}")
    writer.add_token_list(["a", "b", "c"])  # an array of strings: skipped, its length kept
    writer.add_token_scores([0.0, 0.5, 1.0])  # an array of floats: skipped, its length kept
    writer.add_float32("qwen2.rope.freq_base", 1000000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reads_scalars_strings_and_array_lengths(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    write_tiny(path)
    meta = read_metadata(path)
    assert meta["general.architecture"] == "qwen2"
    assert meta["qwen2.block_count"] == 24 and meta["qwen2.context_length"] == 32768
    assert meta["qwen2.attention.head_count_kv"] == 2
    assert meta["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert meta["tokenizer.ggml.tokens"] == 3 and meta["tokenizer.ggml.scores"] == 3
    assert meta["qwen2.rope.freq_base"] == pytest.approx(1e6)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["gguf.version"] >= 3


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"NOPE" + bytes(20), "not a GGUF file"), (b"GGUF\x03\x00\x00\x00" + bytes(4), "truncated")],
)
def test_what_is_not_gguf_is_a_model_error_naming_the_file(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GgufError, match=message) as caught:
        read_metadata(path)
    assert str(path) in str(caught.value) and isinstance(caught.value, ModelError)


def test_a_missing_file_is_a_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GgufError, match="cannot read"):
        read_metadata(tmp_path / "missing.gguf")
