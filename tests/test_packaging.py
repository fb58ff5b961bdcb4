"""What can be checked here of the packaging: no Docker engine runs on these machines, so the
Dockerfile is linted (hadolint) and the compose file resolved (docker compose config), and
the documented settings are compared with the settings class."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed (the dev extra installs it)")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([tool("hadolint"), str(ROOT / "docker" / "Dockerfile")],
                            capture_output=True, text=True)  # fmt: skip
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
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    service = json.loads(result.stdout)["services"]["lowvram"]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert {v["target"] for v in service["volumes"]} == {"/models", "/data"}
    assert service["ports"][0]["target"] == 8000


def test_env_example_documents_every_setting_and_nothing_else() -> None:
    documented = set(
        re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M)
    )
    fields = {name.upper() for name in Settings.model_fields}
    assert documented == fields


def test_every_setting_line_has_a_comment() -> None:
    lines = (ROOT / ".env.example").read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^#?\s*[A-Z][A-Z0-9_]+=", line):
            assert i > 0 and lines[i - 1].startswith("# "), f"no comment above {line}"


def test_the_readme_starts_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash)?\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [
        line.split("#")[0].strip() for line in first_block.group(1).splitlines() if line.strip()
    ]
    assert commands == ["make serve", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()
