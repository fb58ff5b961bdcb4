"""Read a GGUF file's metadata (the key-value header), not its tensors.

    meta = read_metadata(path)
    meta["general.architecture"], meta["qwen2.block_count"]

Arrays are skipped (the tokenizer's vocabulary is most of the header): their keys map to
their length. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

from lowvram.engine.errors import GgufError

MAGIC = b"GGUF"

# type id -> (struct format, size) for fixed-size scalars
_SCALARS = {
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_STRING, _ARRAY = 8, 9


def _read(handle: BinaryIO, fmt: str, size: int) -> Any:
    data = handle.read(size)
    if len(data) != size:
        raise GgufError("truncated header")
    return struct.unpack(fmt, data)[0]


def _string(handle: BinaryIO) -> str:
    length = _read(handle, "<Q", 8)
    return str(handle.read(length).decode("utf-8", errors="replace"))


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(handle, *_SCALARS[kind])
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item_kind = _read(handle, "<I", 4)
        count = _read(handle, "<Q", 8)
        if item_kind in _SCALARS:
            handle.seek(count * _SCALARS[item_kind][1], 1)
        else:
            for _ in range(count):
                _value(handle, item_kind)
        return count
    raise GgufError(f"unknown value type {kind}")


def read_metadata(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return _read_header(handle)
    except OSError as exc:
        raise GgufError(f"cannot read {path}: {exc.strerror}") from exc
    except GgufError as exc:
        raise GgufError(f"{path}: {exc}") from exc


def _read_header(handle: BinaryIO) -> dict[str, Any]:
    if handle.read(4) != MAGIC:
        raise GgufError("not a GGUF file")
    version = _read(handle, "<I", 4)
    if version < 2:
        raise GgufError(f"GGUF version {version} is too old")
    _read(handle, "<Q", 8)  # tensor count
    count = _read(handle, "<Q", 8)
    metadata: dict[str, Any] = {"gguf.version": version}
    for _ in range(count):
        key = _string(handle)
        metadata[key] = _value(handle, _read(handle, "<I", 4))
    return metadata
