"""The vocabulary tensors in host memory: lowvram's vLLM plugin, and the planner pricing it.

vLLM is not installed here: the plugin's hook is tried on stand-in classes, with a TEST
DOUBLE of vLLM's UVA offloader that keeps its budget rule (per parameter, in build order).
The GPU runs are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

import pytest

from lowvram.engine.errors import PlanError
from lowvram.engine.units import GiB
from lowvram.engine.vllm import plugin
from lowvram.engine.vllm.environment import interpreter, missing_plugin
from lowvram.engine.vllm.model import parse_config
from lowvram.engine.vllm.plan import EnginePlan
from lowvram.engine.vllm.planner import plan_vllm
from tests.engine.test_planner import CARD_24, FIXTURES, HOST_64, facts
from tests.helpers import asked

# --- the plugin, on stand-ins ------------------------------------------------------------


class Param:
    def __init__(self, numel: int) -> None:
        self._numel = numel
        self.on_host = False

    def numel(self) -> int:
        return self._numel

    def element_size(self) -> int:
        return 2


class Embedding:
    """Stands in for vLLM's VocabParallelEmbedding: its weight exists once built."""

    def __init__(self, rows: int, width: int) -> None:
        self.weight = Param(rows * width)

    def parameters(self) -> list[Param]:
        return [self.weight]


class LMHead(Embedding):
    """Stands in for ParallelLMHead, a subclass built through the same __init__."""


class Layer:
    def __init__(self, size: int) -> None:
        self.params = [Param(size // 2), Param(size // 2)]

    def parameters(self) -> list[Param]:
        return self.params


class UvaOffloader:
    """A TEST DOUBLE of vLLM 0.26's UVAOffloader: parameter by parameter, while the bytes
    moved are below the budget (its rule); nothing else of it."""

    uva_offloading = True

    def __init__(self, budget: int) -> None:
        self.cpu_offload_max_bytes = budget
        self.cpu_offload_bytes = 0

    def _maybe_offload_to_cpu(self, module: Any) -> Any:
        for param in module.parameters():
            if self.cpu_offload_bytes >= self.cpu_offload_max_bytes:
                break
            param.on_host = True
            self.cpu_offload_bytes += param.numel() * param.element_size()
        return module


@pytest.fixture
def hooked() -> Any:
    """Fresh stand-in classes for each test (the hook patches the class)."""

    class E(Embedding):
        pass

    class H(E, LMHead):
        pass

    return E, H


def build_model(
    classes: Any, offloader: UvaOffloader, kinds: set[str], layers: int = 4
) -> tuple[Any, list[Layer], Any]:
    embedding_cls, head_cls = classes
    plugin.install(embedding_cls, head_cls, lambda: offloader, frozenset(kinds))
    embedding = embedding_cls(1000, 64)  # built first, as in every vLLM model
    stack = [offloader._maybe_offload_to_cpu(Layer(10_000)) for _ in range(layers)]
    head = head_cls(1000, 64)  # built last
    return embedding, stack, head


def test_the_embedding_goes_within_the_budget_and_the_lm_head_on_top(
    hooked: Any, caplog: pytest.LogCaptureFixture
) -> None:
    vocab = 1000 * 64 * 2
    offloader = UvaOffloader(budget=vocab + 2 * 10_000 * 2)  # the embedding and two layers
    with caplog.at_level(logging.INFO, logger="vllm.lowvram_plugin"):
        embedding, stack, head = build_model(hooked, offloader, {"embed", "lm_head"})
    assert embedding.weight.on_host and head.weight.on_host
    assert [all(p.on_host for p in layer.params) for layer in stack] == [True, True, False, False]
    assert offloader.cpu_offload_bytes == 2 * vocab + 2 * 10_000 * 2
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"{plugin.MARK} embed: 0.000 GiB to host memory",
        f"{plugin.MARK} lm_head: 0.000 GiB to host memory",
    ]


def test_only_what_is_asked_moves_and_installing_twice_hooks_once(hooked: Any) -> None:
    offloader = UvaOffloader(budget=1000 * 64 * 2)
    embedding_cls, head_cls = hooked
    plugin.install(embedding_cls, head_cls, lambda: offloader, frozenset({"embed"}))
    embedding, _, head = build_model(hooked, offloader, {"embed"}, layers=1)
    assert embedding.weight.on_host and not head.weight.on_host
    assert offloader.cpu_offload_bytes == 1000 * 64 * 2  # once, not twice


def test_an_offloader_that_cannot_is_left_alone_with_one_warning(
    hooked: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class NoopOffloader:  # what vLLM uses without --cpu-offload-gb
        pass

    class NoUva(UvaOffloader):
        uva_offloading = False

    for offloader, said in ((NoopOffloader(), "NoopOffloader"), (NoUva(10**9), "UVA is off")):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="vllm.lowvram_plugin"):
            moved = plugin.offload(Embedding(10, 10), "embed", offloader)
        assert moved == 0
        assert [r.getMessage().startswith(plugin.UNCHANGED) for r in caplog.records] == [True]
        assert said in caplog.records[0].getMessage()


def test_registering_without_vllm_or_without_a_plan_is_harmless(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(plugin.ENV, raising=False)
    plugin.register()  # no plan asked: does nothing, imports nothing
    assert "vllm" not in sys.modules
    monkeypatch.setenv(plugin.ENV, "embed,lm_head")
    with caplog.at_level(logging.WARNING, logger="vllm.lowvram_plugin"):
        plugin.register()
    assert plugin.UNCHANGED in caplog.text and "vllm" not in sys.modules
    assert plugin.wanted("embed, lm_head,bogus") == {"embed", "lm_head"}


# --- which vLLM has the plugin -----------------------------------------------------------


def test_our_environment_has_the_plugin_and_a_bare_one_does_not(tmp_path: Path) -> None:
    assert missing_plugin(None) is None
    assert missing_plugin(f"{sys.executable} -m vllm.entrypoints.openai.api_server") is None
    venv.create(tmp_path / "bare", with_pip=False)
    bare = tmp_path / "bare" / "bin" / "python"
    assert "lacks lowvram's plugin" in str(missing_plugin(f"{bare} -m vllm"))
    script = tmp_path / "vllm"  # how `vllm serve` runs: a script naming its Python
    script.write_text(f"#!{bare}\nimport sys\n")
    assert interpreter([str(script), "serve"]) == str(bare)
    assert "lacks" in str(missing_plugin(f"{script} serve"))
    assert "could not be found" in str(missing_plugin("no-such-vllm serve"))


def test_an_installed_wheel_registers_the_plugin(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("lowvram-*.whl")
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        text = archive.read(name).decode()
    section = text.split("[vllm.general_plugins]")[1].split("[")[0]
    assert "lowvram = lowvram.engine.vllm.plugin:register" in section


# --- the planner prices it ---------------------------------------------------------------


def plan(name: str, vram_gib: float, **kw: Any) -> EnginePlan:
    missing = kw.pop("plugin_missing", None)
    return plan_vllm(
        facts(name), CARD_24, HOST_64, asked(vram=int(vram_gib * GiB), **kw), plugin_missing=missing
    )


@pytest.mark.parametrize(
    ("name", "vram"),
    [
        ("deepseek-r1-distill-llama-70b", 7),
        ("deepseek-r1-distill-llama-70b", 5),
        ("llama-3.3-70b-instruct-awq", 2),
        ("qwen3-8b", 4),
    ],
)
def test_budgets_below_the_old_floor_plan_with_the_vocabulary_offloaded(
    name: str, vram: float
) -> None:
    p = plan(name, vram)
    assert p.estimate.total <= vram * GiB
    assert p.vocab_offload == "all" and p.lm_head_offload_bytes > 0
    assert p.to_env()["LOWVRAM_OFFLOAD_VOCAB"] == "embed,lm_head"
    assert any("input embedding" in r for r in p.reasons)
    if name.startswith("deepseek"):  # bf16 checkpoint: 4-bit as vLLM loads it, not bf16
        assert p.quantization == "bitsandbytes"


def test_the_floor_named_is_where_plans_start() -> None:
    for name in ("deepseek-r1-distill-llama-70b", "llama-3.3-70b-instruct-awq", "qwen3-8b"):
        with pytest.raises(PlanError) as refused:
            plan(name, 1.0)
        match = re.search(r"the floor is (\d+\.\d\d) GiB", str(refused.value))
        assert match is not None, refused.value
        floor = float(match.group(1))
        assert plan(name, floor + 0.1).estimate.total <= (floor + 0.1) * GiB
        with pytest.raises(PlanError):
            plan(name, floor - 0.1)


def test_the_lm_head_stays_where_reading_it_costs_more_than_it_buys() -> None:
    p = plan("qwen3-8b", 5)  # a few layers offloaded: the lm_head would double the reads
    assert p.vocab_offload == "embed"
    assert any("lm_head" in r and "stays on the GPU" in r for r in p.reasons)


def test_without_the_plugin_the_vocabulary_stays_and_the_plan_says_why() -> None:
    p = plan("qwen3-8b", 6, plugin_missing="the vLLM of ENGINE_COMMAND lacks lowvram's plugin")
    assert p.vocab_offload == "none" and "LOWVRAM_OFFLOAD_VOCAB" not in p.to_env()
    assert any("stay on the GPU: the vLLM of ENGINE_COMMAND" in r for r in p.reasons)
    with pytest.raises(PlanError, match="ENGINE_OFFLOAD_VOCAB=all cannot be done"):
        plan("qwen3-8b", 6, offload_vocab="all", plugin_missing="no plugin")


def test_engine_offload_vocab_overrides() -> None:
    assert plan("qwen3-8b", 6, offload_vocab="none").vocab_offload == "none"
    assert plan("qwen3-8b", 6, offload_vocab="embed").vocab_offload == "embed"
    assert plan("qwen3-8b", 6, offload_vocab="all").vocab_offload == "all"
    # The budget vLLM gets is layers and embedding; the lm_head goes on top of it.
    p = plan("qwen3-8b", 6, offload_vocab="all")
    argv = p.to_argv()
    budget = float(argv[argv.index("--cpu-offload-gb") + 1]) * GiB
    assert budget == pytest.approx(p.cpu_offload_bytes + p.embedding_offload_bytes, abs=2048)


def test_pipeline_parallel_keeps_the_vocabulary_on_the_gpu() -> None:
    p = plan_vllm(
        facts("qwen2.5-7b-instruct"), CARD_24, HOST_64, asked(vram=5 * GiB), pipeline_parallel=2
    )
    assert p.vocab_offload == "none"
    assert any("pipeline parallel" in r and "first stage" in r for r in p.reasons)


def test_a_tied_embedding_is_the_lm_head_and_priced_as_one() -> None:
    config = json.loads((FIXTURES / "qwen2.5-7b-instruct" / "config.json").read_text())
    tied = parse_config(config | {"tie_word_embeddings": True}, "tied-7b")
    p = plan_vllm(tied, CARD_24, HOST_64, asked(vram=int(3.5 * GiB)))
    assert p.tied_embeddings and p.lm_head_offload_bytes == 0
    if p.vocab_offload != "none":
        assert p.vocab_modules == ("embed",)  # one tensor: the plugin moves it once
        assert any("tied embedding and lm_head" in r for r in p.reasons)


def test_the_explanation_and_json_show_both_tensors(tmp_path: Path) -> None:
    model = str(FIXTURES / "llama-3.3-70b-instruct-awq")
    what_if = ["--vram", "2GiB", "--gpu-memory", "24GiB", "--host-memory", "64GiB"]
    run = [sys.executable, "-m", "lowvram", "plan", model, *what_if]
    text = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    assert "embedding 1.96 GiB; lm_head 1.96 GiB" in text
    data = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True).stdout)
    assert data["vocab_offload"] == "all" and data["lm_head_offload_bytes"] > 0
    assert data["env"]["LOWVRAM_OFFLOAD_VOCAB"] == "embed,lm_head"


def test_fp8_quantized_at_load_is_never_offloaded() -> None:
    """vLLM 0.26 failed such a plan on the H200: "Cannot copy out of meta tensor"."""
    for name in ("qwen3-8b", "qwen2.5-14b-instruct", "deepseek-r1-distill-llama-70b"):
        for vram in (4, 6, 8, 12, 16, 22):
            try:
                p = plan(name, vram)
            except PlanError:
                continue
            if p.quantization == "fp8":
                assert p.offloaded_layers == 0 and p.vocab_offload == "none", (name, vram)
    with pytest.raises(PlanError, match="nothing offloaded: vLLM cannot offload it"):
        plan("qwen3-8b", 6, quantization="fp8")
