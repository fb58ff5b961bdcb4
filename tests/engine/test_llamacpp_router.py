"""ENGINE_MODELS on llama.cpp: the setting, the router's plan (presets, how many stay
loaded, models left out) and the factory's refusals. The router itself runs end to end in
tests/e2e/test_llamacpp_models.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from lowvram.engine.errors import PlanError, SetupError
from lowvram.engine.factory import build_backends
from lowvram.engine.hardware import HostFacts
from lowvram.engine.llamacpp.plan import HOST_RESERVE
from lowvram.engine.llamacpp.router import LlamaCppRouterBackend, plan_router
from tests.engine.test_gguf import write_tiny
from tests.helpers import asked

GIB = 1024**3
ROOMY = HostFacts(total_bytes=64 * GIB, available_bytes=48 * GIB)


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gguf"
    write_tiny(path)
    return path


def test_models_are_read_as_name_equals_model_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINE_MODELS", " chat=/m/a.gguf , coder=Qwen/Repo-GGUF:f.gguf,")
    models = asked().models
    assert list(models.items()) == [("chat", "/m/a.gguf"), ("coder", "Qwen/Repo-GGUF:f.gguf")]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("chat", "name=model"),
        ("chat=", "name=model"),
        ("a=x,a=y", "given twice"),
        ("my model=x", "no spaces"),
    ],
)
def test_a_bad_models_setting_says_how_to_write_it(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    monkeypatch.setenv("ENGINE_MODELS", value)
    with pytest.raises(ValidationError, match=message):
        asked()


def test_model_and_models_together_are_refused() -> None:
    with pytest.raises(ValidationError, match="ENGINE_MODEL or ENGINE_MODELS, not both"):
        asked(model="/m/a.gguf", models={"chat": "/m/b.gguf"})


def test_each_model_is_a_preset_section_with_its_own_plan(gguf: Path) -> None:
    settings = asked(models={"chat": str(gguf), "coder": str(gguf)}, context=2048, threads=2)
    plan = plan_router(settings, ROOMY)
    assert [name for name, _ in plan.models] == ["chat", "coder"]
    presets = plan.presets()
    assert "[chat]" in presets and "[coder]" in presets
    assert presets.count(f"model = {gguf}") == 2
    assert "kv-unified-per-slot = 2048" in presets and "threads = 2" in presets
    argv = plan.to_argv(Path("/tmp/p.ini"))
    assert argv[argv.index("--models-preset") + 1] == "/tmp/p.ini"
    assert argv[argv.index("--models-max") + 1] == "2"  # both fit in 48 GiB
    assert "chat:" in plan.explain() and "coder:" in plan.explain()


def test_as_many_stay_loaded_as_ram_holds_unless_asked(gguf: Path) -> None:
    settings = asked(models={"a": str(gguf), "b": str(gguf), "c": str(gguf)}, context=4096)
    one = plan_router(settings, ROOMY).models[0][1]
    per_model = gguf.stat().st_size + one.kv_bytes  # its weights and its KV cache
    assert plan_router(settings, ROOMY).loaded_at_once == 3
    two = HostFacts(64 * GIB, HOST_RESERVE + 2 * per_model + per_model // 2)
    assert plan_router(settings, two).loaded_at_once == 2
    one_fits = HostFacts(64 * GIB, HOST_RESERVE + per_model)
    assert plan_router(settings, one_fits).loaded_at_once == 1
    assert plan_router(settings.model_copy(update={"models_loaded": 1}), ROOMY).loaded_at_once == 1
    more = settings.model_copy(update={"models_loaded": 9})
    assert plan_router(more, ROOMY).loaded_at_once == 3  # never more than there are


def test_a_model_that_cannot_be_found_is_left_out_and_named(gguf: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.gguf"
    plan = plan_router(asked(models={"chat": str(gguf), "gone": str(missing)}), ROOMY)
    assert [name for name, _ in plan.models] == ["chat"]
    assert [name for name, _ in plan.failed] == ["gone"]
    assert "gone left out" in plan.explain() and "nowhere.gguf" in plan.explain()


def test_no_model_that_can_run_is_a_plan_error_naming_each(tmp_path: Path) -> None:
    settings = asked(models={"a": str(tmp_path / "a.gguf"), "b": str(tmp_path / "b.gguf")})
    with pytest.raises(PlanError, match="no model of ENGINE_MODELS") as raised:
        plan_router(settings, ROOMY)
    assert "a.gguf" in str(raised.value) and "b.gguf" in str(raised.value)


def test_the_router_serves_each_model_by_its_name_and_writes_its_presets(
    gguf: Path, tmp_path: Path
) -> None:
    settings = asked(
        models={"chat": str(gguf), "coder": str(gguf)}, log_file=tmp_path / "logs" / "engine.log"
    )
    backend = LlamaCppRouterBackend(plan_router(settings, ROOMY), settings, ["llama-server"])
    assert [m.id for m in backend.served_models()] == ["chat", "coder"]
    launch = backend.launch(8123, "secret-key")
    presets = tmp_path / "logs" / "llamacpp-models.ini"
    assert presets.read_text() == backend.plan.presets()
    assert launch.argv[0] == "llama-server" and str(presets) in launch.argv
    assert launch.env["LLAMA_API_KEY"] == "secret-key" and "secret-key" not in launch.argv


def test_models_with_replicas_are_refused_in_one_line(gguf: Path) -> None:
    models = {"chat": str(gguf), "coder": str(gguf)}
    with pytest.raises(SetupError, match="ENGINE_REPLICAS"):
        build_backends(asked(backend="llamacpp", models=models, replicas=2))
