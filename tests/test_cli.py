"""The `lowvram` command: flags are settings, mistakes are one line, data is in one place."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic_settings import BaseSettings

from lowvram.cli import PLAN_FLAGS, SERVE_FLAGS, build_engine, build_parser, settings_from
from lowvram.engine.hardware import detect_gpus
from lowvram.engine.replicas import Replicas
from lowvram.engine.settings import EngineSettings
from lowvram.gateway.settings import GatewaySettings


def lowvram(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lowvram", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=os.environ | (env or {}),
        cwd=cwd,
    )


@pytest.mark.parametrize(("command", "flags"), [("serve", SERVE_FLAGS), ("plan", PLAN_FLAGS)])
def test_every_flag_is_a_settings_field_with_its_docstring_as_help(
    command: str, flags: dict[str, tuple[type[BaseSettings], str]]
) -> None:
    subcommands = next(
        a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    options = subcommands.choices[command]._option_string_actions
    for flag, (cls, name) in flags.items():
        field = cls.model_fields[name]
        assert field.description, f"{cls.__name__}.{name} has no docstring"
        assert options[flag].help == field.description.replace("%", "%%")  # argparse's escape
    settings_flags = {f for f in options if f not in ("-h", "--help", "--json")}
    assert settings_flags == set(flags)  # no flag mapped by hand past this table


def test_flags_become_settings_and_win_over_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENGINE_VRAM", "4GiB")
    monkeypatch.setenv("GATEWAY_PORT", "9001")
    args = build_parser().parse_args(
        ["serve", "--vram", "6GiB", "--backend", "llamacpp", "--upstream", "http://x:1/v1"]
    )
    engine = settings_from(EngineSettings, args, SERVE_FLAGS)
    gateway = settings_from(GatewaySettings, args, SERVE_FLAGS)
    assert int(engine.vram or 0) == 6 * 1024**3 and engine.backend == "llamacpp"
    assert gateway.port == 9001 and gateway.upstream_url == ["http://x:1/v1"]


def assert_one_clean_line(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0, output
    lines = output.splitlines()
    assert 1 <= len(lines) <= 3, output
    assert lines[-1].startswith("error: ") and "Traceback" not in output, output
    assert "lowvram is ready" not in output
    for needle in needles:
        assert needle in output


@pytest.mark.skipif(bool(detect_gpus()), reason="this machine has a GPU")
def test_vllm_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    result = lowvram("serve", "--backend", "vllm", env={"LOWVRAM_HOME": str(tmp_path)})
    assert_one_clean_line(result, "NVIDIA GPU", "ENGINE_BACKEND=llamacpp")


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"GATEWAY_PORT": "abc"}, ("GATEWAY_PORT='abc'", "integer")),
        ({"GATEWAY_LOG_LEVEL": "verbose"}, ("GATEWAY_LOG_LEVEL='verbose'", "debug")),
        ({"ENGINE_VRAM": "lots"}, ("ENGINE_VRAM='lots'",)),
        ({"GATEWAY_DB_PATH": "/proc/no/such/dir/keys.sqlite3"}, ("key database", "GATEWAY_DB")),
        ({"GATEWAY_UPSTREAM_URL": "not-a-url"}, ("GATEWAY_UPSTREAM_URL", "'not-a-url'", "http(s)")),
        ({"GATEWAY_UPSTREAM_URL": "ftp://x"}, ("'ftp://x' must be an http(s) URL",)),
        ({"GATEWAY_UPSTREAM_URL": "http://a:1/v1,http://h:99999"}, ("port",)),
        ({"GATEWAY_UPSTREAM_URL": "http://a b/v1"}, ("with a host name",)),
        ({"GATEWAY_CONNECT_TIMEOUT": "inf"}, ("GATEWAY_CONNECT_TIMEOUT='inf'", "finite")),
        ({"GATEWAY_DRAIN_SECONDS": "inf"}, ("GATEWAY_DRAIN_SECONDS='inf'", "finite")),
        ({"ENGINE_READY_TIMEOUT": "nan"}, ("ENGINE_READY_TIMEOUT='nan'", "finite")),
        ({"GATEWAY_HOST": "no-such-host.invalid"}, ("GATEWAY_HOST", "no-such-host.invalid")),
    ],
)
def test_a_bad_setting_is_one_line(
    tmp_path: Path, env: dict[str, str], needles: tuple[str, ...]
) -> None:
    result = lowvram("serve", env={"LOWVRAM_HOME": str(tmp_path)} | env, cwd=tmp_path)
    assert_one_clean_line(result, *needles)


def test_keys_are_found_from_any_working_directory(tmp_path: Path) -> None:
    home = {"LOWVRAM_HOME": str(tmp_path / "home")}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    created = lowvram("keys", "create", "team-a", "--quiet", env=home, cwd=tmp_path / "a")
    assert created.returncode == 0, created.stderr
    listed = lowvram("keys", "list", env=home, cwd=tmp_path / "b")
    assert "team-a" in listed.stdout
    assert (tmp_path / "home" / "data" / "gateway.sqlite3").is_file()


def test_an_explicit_database_path_wins(tmp_path: Path) -> None:
    db = tmp_path / "elsewhere.sqlite3"
    env = {"LOWVRAM_HOME": str(tmp_path / "home"), "GATEWAY_DB_PATH": str(db)}
    assert lowvram("keys", "create", "team-b", env=env).returncode == 0
    assert db.is_file() and not (tmp_path / "home" / "data" / "gateway.sqlite3").exists()


def test_plan_without_a_gpu_says_how_to_plan_for_one(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "engine" / "fixtures" / "qwen2.5-7b-instruct"
    if detect_gpus():
        pytest.skip("this machine has a GPU")
    assert_one_clean_line(lowvram("plan", str(fixture), "--vram", "6GiB"), "--gpu-memory")


def test_a_taken_port_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        env = {"LOWVRAM_HOME": str(tmp_path), "GATEWAY_PORT": port}
        result = lowvram("serve", "--upstream", "http://127.0.0.1:1/v1", env=env, cwd=tmp_path)
    assert_one_clean_line(result, f"127.0.0.1:{port}", "GATEWAY_PORT", "in use")


@pytest.mark.parametrize(
    ("env", "secret"),
    [
        ({"GATEWAY_API_KEYS": "a-valid-client-key,short"}, "a-valid-client-key"),
        ({"GATEWAY_ADMIN_API_KEYS": "changeme-admin,another-valid-key"}, "another-valid-key"),
        ({"GATEWAY_UPSTREAM_URL": "http://user:hunter22@h:1/v1,ftp://x"}, "hunter22"),
    ],
)
def test_a_bad_setting_never_repeats_a_secret(
    tmp_path: Path, env: dict[str, str], secret: str
) -> None:
    result = lowvram("serve", env={"LOWVRAM_HOME": str(tmp_path)} | env, cwd=tmp_path)
    assert_one_clean_line(result)
    assert secret not in result.stdout + result.stderr


def test_a_bad_flag_is_one_line_naming_it() -> None:
    result = lowvram("serve", "--backend", "bogus")
    assert_one_clean_line(result, "--backend", "bogus", "llamacpp")
    assert result.returncode == 2


@pytest.mark.parametrize(
    "command",
    [
        *([], ["serve"], ["plan"], ["build"]),
        *(["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"]),
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = lowvram(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: lowvram") and "Traceback" not in result.stderr


def test_replica_names_never_show_a_urls_password() -> None:
    gateway = GatewaySettings(  # type: ignore[call-arg]
        _env_file=None,
        upstream_url=["http://user:hunter22@10.0.0.1:8001/v1", "http://[::1]:8002", "http://h"],
    )
    pool = build_engine(gateway, EngineSettings(_env_file=None))  # type: ignore[call-arg]
    assert isinstance(pool, Replicas)
    assert pool.names == ["10.0.0.1:8001", "[::1]:8002", "h"]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--backend", "llamacpp", "--model", "/tmp:nc/nope.gguf"], ("no such file: /tmp:nc",)),
        (["--backend", "llamacpp", "--model", "./nope.gguf"], ("no such file",)),
        (
            ["--backend", "llamacpp", "--model", "Qwen/No-Such-GGUF:nope.gguf"],
            ("cannot be reached",),
        ),
    ],
)
def test_a_model_that_is_not_there_is_one_line_at_once(
    tmp_path: Path, args: list[str], needles: tuple[str, ...]
) -> None:
    """Offline, a Hub id fails once and fast, not after the Hub client's retries."""
    started = time.monotonic()
    env = {
        "GATEWAY_DB_PATH": str(tmp_path / "gateway.sqlite3"),
        "ENGINE_MODELS_DIR": str(tmp_path / "models"),
        "HF_HUB_OFFLINE": "1",
    }
    result = lowvram("serve", *args, env=env, cwd=tmp_path)
    assert_one_clean_line(result, *needles)
    assert time.monotonic() - started < 20
    assert "Repo id must use" not in result.stderr


def test_plan_names_a_missing_directory(tmp_path: Path) -> None:
    result = lowvram("plan", str(tmp_path / "nope"), "--gpu-memory", "24GiB")
    assert_one_clean_line(result, "no such directory")
