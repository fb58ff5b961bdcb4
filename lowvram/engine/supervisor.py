"""Run an engine as a child process: start, wait for readiness, verify, restart, stop.

The engine runs in its own process group, bound to 127.0.0.1 on a free port with a random
key, so nothing on the host reaches it but through the gateway. Its output is re-logged
line by line with the backend's name. The lifecycle is one task:

    starting --ready--> ready --exit--> restarting --(backoff)--> starting ...
    starting --known failure--> starting (re-planned one rung down) ... --> failed
    any --stop()--> stopped      (SIGTERM to the group, wait, SIGKILL the group)
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import secrets
import shlex
import signal
import socket
import time
from collections import deque
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import httpx

from lowvram.engine.backend import Backend, Launch
from lowvram.engine.handle import EngineState, ServedModel, StateMixin
from lowvram.engine.probe import auth_headers
from lowvram.engine.settings import EngineSettings
from lowvram.engine.startup import Timeline

logger = logging.getLogger(__name__)
engine_logger = logging.getLogger("lowvram.engine.output")

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Timing:
    """How the supervisor paces itself: the defaults suit real engines; tests shorten them.

    What an operator sets (ready timeout, restarts, re-plans) is in `EngineSettings`.
    """

    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stop_grace: float = 20.0
    """Seconds between SIGTERM and SIGKILL when stopping the engine."""
    healthy_after: float = 60.0
    """A crash this long after becoming ready is not "right after a start"."""
    poll_interval: float = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the gateway dies without stopping us."""
    try:
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: stop() and the atexit hook still cover orderly exits


class _Named(logging.LoggerAdapter[logging.Logger]):
    """Adds its fields to every record, beside the call's own `extra` (Python 3.11's
    adapter would replace them)."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        kwargs["extra"] = {**(self.extra or {}), **kwargs.get("extra", {})}
        return msg, kwargs


class Supervisor(StateMixin):
    """An `EngineHandle` for an engine process we own."""

    def __init__(
        self,
        backend: Backend,
        settings: EngineSettings,
        timing: Timing | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        self._log = _Named(logger, {"replica": name} if name else {})
        """Its lines name the replica where it is one of several."""
        self.backend = backend
        self.settings = settings
        self.timing = timing or Timing()
        self._base_url = ""
        self._api_key = ""
        self._models: tuple[ServedModel, ...] = ()
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._tail: deque[str] = deque(maxlen=200)
        self.timeline = Timeline(())
        """The last start's phases, from the engine's own lines (startup.py)."""
        self.attempts: list[str] = []
        """What each start tried, for the final message and for tests."""
        self.restarts = 0

    # --- EngineHandle -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._base_url

    @property
    def api_key(self) -> str | None:
        return self._api_key or None

    @property
    def model(self) -> ServedModel | None:
        return self.models[0] if self.models else None

    @property
    def models(self) -> tuple[ServedModel, ...]:
        return self._models if self.state is EngineState.READY else ()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process and self._process.returncode is None else None

    async def start(self) -> None:
        atexit.register(self._kill_now)
        self._task = asyncio.create_task(self._run(), name=f"supervise-{self.backend.name}")

    async def stop(self) -> None:
        self._stopping.set()
        if self._process is not None:
            await self._terminate(self._process)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        atexit.unregister(self._kill_now)
        self._set_state(EngineState.STOPPED, "stopped")

    async def wait_for(self, *states: EngineState, timeout: float) -> EngineState:
        """Block until the state is one of `states` (for callers that must not poll)."""
        reached = asyncio.Event()

        def check(state: EngineState) -> None:
            if state in states:
                reached.set()

        self.add_listener(check)
        try:
            check(self.state)
            await asyncio.wait_for(reached.wait(), timeout)
        finally:
            self._listeners.remove(check)
        return self.state

    # --- the lifecycle ----------------------------------------------------------------

    async def _run(self) -> None:
        replans = 0
        while not self._stopping.is_set():
            outcome = await self._start_once()
            if self._stopping.is_set():
                return
            if outcome == "ready":
                problems = self.backend.verify()
                if problems:
                    await self._terminate(self._process)
                    self._fail(
                        "the plan did not take effect: " + "; ".join(problems),
                        "the engine did not start as planned",
                    )
                    return
                report = self.backend.report()
                self._log.info(report, extra={"start": str(self.timeline)})
                self._set_state(EngineState.READY, report)
                code, uptime = await self._serve_until_exit()
                if self._stopping.is_set() or not await self._after_crash(code, uptime):
                    return
                continue
            failure = self.backend.failure(self._tail)
            change = (
                self.backend.step_down(failure)
                if failure and replans < self.settings.max_replans
                else None
            )
            if change is None:
                why = failure or self._exit_or(outcome)
                self._fail(
                    f"the engine failed to start ({why})", f"the engine failed to start: {why}"
                )
                return
            replans += 1
            self.attempts.append(f"{failure}: {change}")
            self._log.warning("engine start failed (%s); re-planned: %s", failure, change)

    def _exit_or(self, outcome: str) -> str:
        process = self._process
        if outcome == "exited" and process is not None and process.returncode is not None:
            return f"{describe_exit(process.returncode)}; {self.timeline.stopped_in()}"
        if outcome == "timeout":
            return (
                f"not ready within ENGINE_READY_TIMEOUT={self.settings.ready_timeout:g} s; "
                + self.timeline.stopped_in()
            )
        return outcome

    async def _start_once(self) -> str:
        """One start: 'ready', 'exited' or 'timeout'."""
        port, key = free_port(), secrets.token_urlsafe(24)
        launch = self.backend.launch(port, key)
        self._base_url, self._api_key = f"http://127.0.0.1:{port}", key
        self._models = self.backend.served_models()
        self._tail.clear()
        self.timeline = Timeline(self.backend.phases)
        self.attempts.append(f"start on port {port}")
        self._set_state(EngineState.STARTING, f"starting {self.backend.name} on port {port}")
        if launch.description:
            summary = launch.description.splitlines()[0]
            self._log.info("%s", summary, extra={"explain": launch.description})
        log = self._open_log(launch)
        self._log.info(
            "starting %s; its output goes to %s", self.backend.name, self.settings.log_file
        )
        try:
            self._process = await asyncio.create_subprocess_exec(
                *launch.argv,
                env={k: v for k, v in (os.environ | launch.env).items() if v is not None},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # its own process group: we can signal all its children
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            log.close()
            self._tail.append(f"could not run {launch.argv[0]}: {exc.strerror}")
            return "exited"
        self._reader = asyncio.create_task(self._relay_output(self._process, log))
        outcome = await self._wait_ready(self._process)
        if outcome != "ready":
            await self._terminate(self._process)
        return outcome

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> str:
        deadline = time.monotonic() + self.settings.ready_timeout
        headers = auth_headers(self._api_key)
        async with httpx.AsyncClient(timeout=5.0, trust_env=False) as client:
            while time.monotonic() < deadline:
                if self._stopping.is_set():
                    return "stopped"
                try:
                    response = await client.get(
                        self._base_url + self.backend.health_path, headers=headers
                    )
                    if response.status_code == 200:
                        return "ready"
                except httpx.HTTPError:
                    pass
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(process.wait(), self.timing.poll_interval)
                if process.returncode is not None:
                    return "exited"
        return "timeout"

    def _open_log(self, launch: Launch) -> TextIO:
        """The engine's log file, appended to, headed by what this start runs."""
        path = self.settings.log_file
        path.parent.mkdir(parents=True, exist_ok=True)
        log = path.open("a", encoding="utf-8", errors="replace")
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        log.write(f"--- {started} {self.backend.name}: {shlex.join(launch.argv)}\n")
        log.flush()
        return log

    async def _relay_output(self, process: asyncio.subprocess.Process, log: TextIO) -> None:
        """Every line to the engine's log file; the gateway's own log gets them at debug.

        Engines print hundreds of start-up lines (llama.cpp ~1,800 of metadata): at info
        they would bury the gateway's own lines; the supervisor summarises instead.
        """
        assert process.stdout is not None
        with log:
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                if not line:
                    continue
                log.write(line + "\n")
                log.flush()
                self._tail.append(line)
                self.timeline.see(line)
                self.backend.observe(line)
                engine_logger.debug("%s", line)

    async def _serve_until_exit(self) -> tuple[int, float]:
        """Wait for the engine to exit: its exit code, and how long it served."""
        assert self._process is not None
        ready_at = time.monotonic()
        code = await self._process.wait()
        return code, time.monotonic() - ready_at

    async def _after_crash(self, code: int, uptime: float) -> bool:
        """Restart after a crash, with backoff; False where restarting cannot help.

        A crash that repeats itself right after each start (within `healthy_after` of
        becoming ready: a model that always fails on its first request) is restarted
        `max_restarts` times, then the engine fails with its cause; one after serving a
        while is always restarted. An illegal instruction fails at once: it will recur.
        """
        how = describe_exit(code)
        self.restarts = self.restarts + 1 if uptime < self.timing.healthy_after else 1
        if code < 0 and -code in DETERMINISTIC_SIGNALS:
            return self._fail(f"the engine {how}; restarting cannot help", f"the engine {how}")
        if self.restarts > self.settings.max_restarts:
            return self._fail(
                f"the engine crashed {self.restarts} times in a row, each within "
                f"{self.timing.healthy_after:g} s of becoming ready (last: {how})",
                f"the engine {how} right after every start",
            )
        delay = min(self.timing.backoff_max, self.timing.backoff_base * 2 ** (self.restarts - 1))
        self._set_state(
            EngineState.RESTARTING,
            f"engine {how}; restart {self.restarts}/{self.settings.max_restarts} in {delay:g} s. "
            f"Last output: {' | '.join(list(self._tail)[-5:])}",
            f"the engine {how} and restarts in {delay:g} s",
        )
        self._log.error("engine %s; restarting in %g s", how, delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        return not self._stopping.is_set()

    def _fail(self, why: str, reason: str) -> bool:
        """Give up: `why` (with what was tried and said) to the log, `reason` to clients."""
        tried = "; ".join(self.attempts)
        last = " | ".join(list(self._tail)[-5:])
        message = f"{why}. Tried: {tried}. Last output: {last}"
        self._log.error(message)
        self._set_state(EngineState.FAILED, message, reason)
        return False

    async def _terminate(self, process: asyncio.subprocess.Process | None) -> None:
        """SIGTERM the whole group, wait `stop_grace`, then SIGKILL the group."""
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.timing.stop_grace)
        except TimeoutError:
            self._log.warning("engine ignored SIGTERM for %g s; killing it", self.timing.stop_grace)
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        # Children that outlived their parent are still in the group.
        _signal_group(process.pid, signal.SIGKILL)
        await _group_gone(process.pid, timeout=5.0)
        if self._reader is not None:
            # asyncio.wait: the reader may have been cancelled already (the loop closing).
            await asyncio.wait({self._reader}, timeout=5.0)

    def _kill_now(self) -> None:
        """At interpreter exit without stop(): leave no engine behind."""
        if self._process is not None and self._process.returncode is None:
            _signal_group(self._process.pid, signal.SIGKILL)


SIGNAL_CAUSES = {
    signal.SIGILL: "illegal instruction: built for a CPU feature this machine does not allow",
    signal.SIGSEGV: "segmentation fault: a bug in the engine, or a corrupt model file",
    signal.SIGBUS: "bus error: the model file changed or could not be read while mapped",
    signal.SIGFPE: "arithmetic exception in the engine",
    signal.SIGABRT: "the engine aborted itself",
    signal.SIGKILL: "killed: by the kernel's out-of-memory killer, or by someone",
}
DETERMINISTIC_SIGNALS = {signal.SIGILL}
"""Crashes that will happen again on the next start, whatever we do."""


def describe_exit(code: int) -> str:
    """`exited with code 1`, or `was killed by SIGILL (illegal instruction: ...)`."""
    number = -code if code < 0 else code - 128 if 128 < code < 160 else None
    try:
        sig = signal.Signals(number) if number else None
    except ValueError:
        sig = None
    if sig is None:
        return f"exited with code {code}"
    cause = SIGNAL_CAUSES.get(sig)
    via = "" if code < 0 else f"exited with code {code}: "
    return f"{via}was killed by {sig.name}" + (f" ({cause})" if cause else "")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _group_gone(pgid: int, timeout: float) -> None:
    """Wait (bounded) until no live process is left in the group; zombies do not count."""
    deadline = time.monotonic() + timeout
    # /proc offers nothing to wait on: poll it, boundedly.
    while time.monotonic() < deadline and _live_members(pgid):  # noqa: ASYNC110
        await asyncio.sleep(0.05)


def _live_members(pgid: int) -> bool:
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False
