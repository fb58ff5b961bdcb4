"""What can be checked here of the packaging: no Docker engine runs on these machines, so the
Dockerfile is linted (hadolint) and the compose file resolved (docker compose config), and
the documented settings are compared with the settings class."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lowvram.engine.settings import EngineSettings
from lowvram.gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (the dev extra installs it)")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dockerfile_runs_as_non_root_and_checks_readiness() -> None:
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n.*/ready", dockerfile, re.M)
    assert re.search(r'pip install .*"\.\[vllm\]"', dockerfile)


def test_the_compose_file_resolves_with_a_gpu_volumes_and_env() -> None:
    compose = ROOT / "docker" / "compose.yaml"
    result = subprocess.run(
        [tool("docker-compose"), "-f", str(compose), "config", "--format", "json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    service = json.loads(result.stdout)["services"]["lowvram"]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert {v["target"] for v in service["volumes"]} == {"/models", "/data"}
    assert service["ports"][0]["target"] == 8000


def documented_settings() -> dict[str, str]:
    """Each `# NAME=value` line of .env.example with the comment lines just above it."""
    documented: dict[str, str] = {}
    comment: list[str] = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        if match := re.match(r"^#\s*([A-Z][A-Z0-9_]+)=", line):
            documented[match.group(1)] = " ".join(comment)
            comment = []
        elif line.startswith("# ") and not line.startswith("# ---"):
            comment.append(line[2:].strip())
        else:
            comment = []
    return documented


def test_env_example_documents_every_setting_with_its_docstring() -> None:
    fields = {
        (str(cls.model_config["env_prefix"]) + name).upper(): " ".join(
            (info.description or "").split()
        )
        for cls in (GatewaySettings, EngineSettings)
        for name, info in cls.model_fields.items()
    }
    documented = documented_settings()
    assert set(documented) == set(fields)
    for name, doc in fields.items():
        assert doc and documented[name].endswith(doc), name


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash)?\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [
        line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()
    ]
    assert commands == ["make serve", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_the_wheel_installs_only_the_lowvram_package(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("lowvram-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"lowvram"}
    assert "lowvram = lowvram.cli:main" in scripts
    assert not any("/tests/" in name or name.startswith("tests/") for name in names)
