"""The llama.cpp build's layout and the AMX choice, on a stand-in build (no compiler run)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from lowvram.engine.llamacpp import build
from lowvram.engine.llamacpp.build import AMX_VARIANT, TARGET, Build, _install, _Progress


def fake_built(directory: Path) -> Path:
    """What ninja leaves in build/bin: the server, libraries with their soname links, the
    CPU variants (the AMX one among them)."""
    directory.mkdir()
    (directory / TARGET).write_text("server")
    (directory / "libllama.so.0.5.0").write_text("lib")
    (directory / "libllama.so.0").symlink_to("libllama.so.0.5.0")
    for variant in ("libggml-cpu-haswell.so", AMX_VARIANT):
        (directory / variant).write_text(variant)
    return directory


def test_the_portable_directory_has_no_amx_and_the_amx_one_has_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "_compile_probe", lambda dest: dest.write_text("probe") or True)
    out = tmp_path / "out"
    _install(fake_built(tmp_path / "built"), out, tmp_path)
    portable = {p.name for p in (out / "bin").iterdir()}
    assert AMX_VARIANT not in portable and "libggml-cpu-haswell.so" in portable
    assert {p.name for p in (out / "bin-amx").iterdir()} == portable | {AMX_VARIANT}
    assert os.readlink(out / "bin-amx" / "libllama.so.0") == "libllama.so.0.5.0"
    # The server is the same file (a hard link), found at its own path in bin-amx/.
    assert (out / "bin-amx" / TARGET).stat().st_ino == (out / "bin" / TARGET).stat().st_ino


def test_without_a_probe_there_is_no_amx_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build, "_compile_probe", lambda dest: False)
    out = tmp_path / "out"
    _install(fake_built(tmp_path / "built"), out, tmp_path)
    assert not (out / "bin-amx").exists() and (out / "bin" / TARGET).is_file()


@pytest.mark.parametrize(("probe", "chosen"), [("exit 0", "bin-amx"), ("kill -ILL $$", "bin")])
def test_the_amx_build_runs_only_where_the_probe_ran(
    tmp_path: Path, probe: str, chosen: str
) -> None:
    for directory in ("bin", "bin-amx"):
        (tmp_path / directory).mkdir()
        (tmp_path / directory / TARGET).write_text("server")
    script = tmp_path / "amx-probe"
    script.write_text(f"#!/bin/sh\n{probe}\n")
    script.chmod(0o755)
    assert Build(tmp_path).binary == tmp_path / chosen / TARGET


def test_progress_is_a_line_every_tenth() -> None:
    out = io.StringIO()
    progress = _Progress(out, started=0.0)
    for done in range(1, 101):
        progress.line(f"[{done}/100] Building CXX object x.o\n")
    progress.line("some compiler warning\n")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "100% (100/100)" in lines[-1]
