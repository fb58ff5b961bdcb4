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
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import httpx

from engine.backends.base import Backend
from engine.handle import EngineState, ServedModel, StateMixin
from engine.probe import auth_headers

logger = logging.getLogger("engine.supervisor")

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SupervisorConfig:
    ready_timeout: float = 900.0
    """Seconds a start may take before it counts as failed (vLLM: 80-120 s, more when cold)."""
    max_restarts: int = 5
    """Crashes in a row (while serving) before giving up."""
    max_replans: int = 3
    """Start-up failures answered by re-planning, before giving up."""
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    stop_grace: float = 20.0
    """Seconds between SIGTERM and SIGKILL when stopping the engine."""
    healthy_after: float = 60.0
    """Serving this long resets the crash count."""
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


class Supervisor(StateMixin):
    """An `EngineHandle` for an engine process we own."""

    def __init__(self, backend: Backend, config: SupervisorConfig | None = None) -> None:
        super().__init__()
        self.backend = backend
        self.config = config or SupervisorConfig()
        self._base_url = ""
        self._api_key = ""
        self._model: ServedModel | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._tail: deque[str] = deque(maxlen=200)
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
        return self._model if self.state is EngineState.READY else None

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
                    self._fail("the plan did not take effect: " + "; ".join(problems))
                    return
                report = self.backend.report()
                logger.info(report)
                self._set_state(EngineState.READY, report)
                code = await self._serve_until_exit()
                if self._stopping.is_set():
                    return
                if not await self._back_off(code):
                    return
                continue
            failure = self.backend.failure(self._tail)
            change = (
                self.backend.step_down(failure)
                if failure and replans < self.config.max_replans
                else None
            )
            if change is None:
                self._fail(f"the engine failed to start ({failure or outcome})")
                return
            replans += 1
            self.attempts.append(f"{failure}: {change}")
            logger.warning("engine start failed (%s); re-planned: %s", failure, change)

    async def _start_once(self) -> str:
        """One start: 'ready', 'exited' or 'timeout'."""
        port, key = free_port(), secrets.token_urlsafe(24)
        launch = self.backend.launch(port, key)
        self._base_url, self._api_key = f"http://127.0.0.1:{port}", key
        self._model = self.backend.served_model()
        self._tail.clear()
        self.attempts.append(f"start on port {port}")
        self._set_state(EngineState.STARTING, f"starting {self.backend.name} on port {port}")
        for line in launch.description.splitlines():
            logger.info("plan: %s", line)
        self._process = await asyncio.create_subprocess_exec(
            *launch.argv,
            env={k: v for k, v in (os.environ | launch.env).items() if v is not None},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # its own process group: we can signal all its children
            preexec_fn=_die_with_parent,
        )
        self._reader = asyncio.create_task(self._relay_output(self._process))
        outcome = await self._wait_ready(self._process)
        if outcome != "ready":
            await self._terminate(self._process)
        return outcome

    async def _wait_ready(self, process: asyncio.subprocess.Process) -> str:
        deadline = time.monotonic() + self.config.ready_timeout
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
                    await asyncio.wait_for(process.wait(), self.config.poll_interval)
                if process.returncode is not None:
                    return "exited"
        return "timeout"

    async def _relay_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        engine_log = logging.getLogger(f"engine.{self.backend.name}")
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self._tail.append(line)
            self.backend.observe(line)
            engine_log.info("%s", line)

    async def _serve_until_exit(self) -> int:
        assert self._process is not None
        ready_at = time.monotonic()
        code = await self._process.wait()
        if time.monotonic() - ready_at > self.config.healthy_after:
            self.restarts = 0
        return code

    async def _back_off(self, code: int) -> bool:
        """After a crash: wait, then try again; False once restarts are used up."""
        self.restarts += 1
        if self.restarts > self.config.max_restarts:
            self._fail(f"the engine crashed {self.restarts} times in a row (last exit code {code})")
            return False
        delay = min(self.config.backoff_max, self.config.backoff_base * 2 ** (self.restarts - 1))
        self._set_state(
            EngineState.RESTARTING,
            f"engine exited with code {code}; restart {self.restarts}/{self.config.max_restarts} "
            f"in {delay:g} s",
        )
        logger.error("engine exited with code %s; restarting in %g s", code, delay)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), delay)
        return not self._stopping.is_set()

    def _fail(self, why: str) -> None:
        tried = "; ".join(self.attempts)
        last = " | ".join(list(self._tail)[-5:])
        message = f"{why}. Tried: {tried}. Last output: {last}"
        logger.error(message)
        self._set_state(EngineState.FAILED, message)

    async def _terminate(self, process: asyncio.subprocess.Process | None) -> None:
        """SIGTERM the whole group, wait `stop_grace`, then SIGKILL the group."""
        if process is None or process.returncode is not None:
            return
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), self.config.stop_grace)
        except TimeoutError:
            logger.warning("engine ignored SIGTERM for %g s; killing it", self.config.stop_grace)
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()
        # Children that outlived their parent are still in the group.
        _signal_group(process.pid, signal.SIGKILL)
        await _group_gone(process.pid, timeout=5.0)
        if self._reader is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._reader, 5.0)

    def _kill_now(self) -> None:
        """At interpreter exit without stop(): leave no engine behind."""
        if self._process is not None and self._process.returncode is None:
            _signal_group(self._process.pid, signal.SIGKILL)


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
