"""What the vLLM that will run can do beyond vLLM itself: whether it loads lowvram's plugin.

The planner moves the vocabulary tensors only where vLLM will load lowvram's plugin
(plugin.py), which vLLM finds by its entry point in the environment it runs in. That is
this one by default; with ENGINE_COMMAND it may be another virtualenv, which is asked.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

GROUP = "vllm.general_plugins"
ENTRY = "lowvram.engine.vllm.plugin:register"

_ASK = (
    "import sys; from importlib.metadata import entry_points as e; "
    f"sys.exit(0 if any(p.value == {ENTRY!r} for p in e(group={GROUP!r})) else 3)"
)


def missing_plugin(command: str | None) -> str | None:
    """Why the vLLM of `command` (ENGINE_COMMAND; None: ours) cannot load lowvram's plugin;
    None if it can."""
    if not command:
        if any(point.value == ENTRY for point in entry_points(group=GROUP)):
            return None
        return "lowvram is not installed in this environment (pip install -e .)"
    python = interpreter(shlex.split(command))
    if python is None:
        return f"the Python of ENGINE_COMMAND ({command}) could not be found to ask it"
    try:
        # From /: a source tree in the working directory would answer for an install.
        asked = subprocess.run([python, "-c", _ASK], capture_output=True, timeout=30, cwd="/")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} could not be asked ({exc})"
    if asked.returncode == 0:
        return None
    return (
        f"the vLLM of ENGINE_COMMAND ({python}) lacks lowvram's plugin (pip install lowvram there)"
    )


def interpreter(argv: list[str]) -> str | None:
    """The Python that runs `argv`: itself (`.../python -m vllm...`), or the interpreter on
    the first line of a script (`vllm serve`, `/opt/vllm/bin/vllm`)."""
    if not argv:
        return None
    program = str(Path(shutil.which(argv[0]) or argv[0]).absolute())
    if Path(program).name.startswith("python"):
        return program if Path(program).exists() else None
    try:
        with open(program, "rb") as script:
            first = script.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if words and Path(words[0]).name == "env" and len(words) > 1:
        return shutil.which(words[1])
    return words[0] if words else sys.executable
