"""Several models on one GPU with vLLM: an engine per model, one awake at a time.

    ENGINE_MODELS=chat=Qwen/Qwen3-8B,coder=Qwen/Qwen2.5-Coder-7B-Instruct lowvram serve

Every engine runs with vLLM's sleep mode. Each is planned for the whole budget less what
the others keep on the GPU while asleep (`SLEEPING_RESIDUAL` each), so that the awake one
has what it would have alone. Start-up brings them up one after another, each put to
sleep once ready (the next one needs the memory), then wakes the default: the first swap
is then already a wake, not a load. Which is awake, and when to swap, is the gate's
(engine/swap.py); how to sleep and wake is vllm/sleep.py.

Sleep level 1 (weights copied to pinned host memory: a wake in ~0.4 s for 15 GiB) where
the host holds every sleeping model's weights; level 2 (weights dropped, read again from
the page cache on wake: ~2.7 s) where it does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

import httpx

from lowvram.engine.errors import PlanError
from lowvram.engine.handle import EngineState
from lowvram.engine.hardware import Hardware
from lowvram.engine.replicas import Lease, Replicas, T
from lowvram.engine.settings import EngineSettings
from lowvram.engine.supervisor import Supervisor
from lowvram.engine.swap import ModelUnavailable, SwapGate, SwapPolicy
from lowvram.engine.units import MiB, gib
from lowvram.engine.vllm.memory import HOST_RESERVE
from lowvram.engine.vllm.plan import EnginePlan
from lowvram.engine.vllm.planner import budget_for
from lowvram.engine.vllm.sleep import SleepError, SleepLevel, VllmSleeper

logger = logging.getLogger(__name__)

SLEEPING_RESIDUAL = 1011 * MiB
"""GPU memory a vLLM engine keeps while asleep (its CUDA context, buffers): 1,011 MiB by
nvidia-smi for a Qwen3-8B shape at level 1 (H200, vLLM 0.26, issue 17's measurement)."""


def budget_each(settings: EngineSettings, hardware: Hardware, models: int) -> int:
    """The budget each engine is planned for: the whole, less the sleeping others."""
    assert hardware.gpu is not None
    whole = budget_for(settings, hardware.gpu)
    each = whole - (models - 1) * SLEEPING_RESIDUAL
    if each <= SLEEPING_RESIDUAL:
        raise PlanError(
            f"{models} models leave no room: {models - 1} asleep keep "
            f"{gib((models - 1) * SLEEPING_RESIDUAL)} of {gib(whole)}"
        )
    return each


def host_room(plans: Sequence[EnginePlan], hardware: Hardware) -> int:
    """Host memory left beside every engine's offloaded weights (they stay there, asleep or
    not) and the reserve; negative where they do not fit together."""
    offloaded = sum(p.host_offload_bytes for p in plans)
    return hardware.host.available_bytes - HOST_RESERVE - offloaded


def sleep_level(plans: Sequence[EnginePlan], hardware: Hardware) -> SleepLevel:
    """1 where host memory holds the GPU weights of every model but the awake one (the
    largest awake, to be safe) beside what the plans already offload; 2 otherwise."""
    weights = sorted((p.estimate.weights for p in plans), reverse=True)
    return 1 if sum(weights[1:]) <= host_room(plans, hardware) else 2


def explain_sleep(level: SleepLevel, models: int) -> str:
    cost = (
        "weights copied to host memory; a wake ~0.4 s for 15 GiB (H200)"
        if level == 1
        else "weights dropped, read again on wake; ~2.7 s for 15 GiB from the page cache"
    )
    return (
        f"{models} models, one awake: sleep level {level} ({cost}); each asleep keeps "
        f"{gib(SLEEPING_RESIDUAL)} on the GPU"
    )


class SwapPool(Replicas):
    """An engine per model (`names` are the models), one awake; requests wait for theirs."""

    def __init__(
        self,
        members: Sequence[Supervisor],
        names: Sequence[str],
        level: SleepLevel,
        policy: SwapPolicy,
        ready_timeout: float,
    ) -> None:
        self._up = False
        """Whether start-up has brought every engine up (until then: starting)."""
        self._bring_up: asyncio.Task[None] | None = None
        self._chores: set[asyncio.Future[None]] = set()
        super().__init__(members, names)
        self.supervisors = list(members)
        self.client = httpx.AsyncClient()
        self.sleeper = VllmSleeper(self.client, dict(zip(names, members, strict=True)), level)
        self.gate = SwapGate(list(names), self.sleeper, policy)
        self._ready_timeout = ready_timeout
        logger.info("%s", explain_sleep(level, len(names)))
        for member in self.supervisors:
            member.add_listener(self._restarted)

    async def start(self) -> None:
        """Start bringing the engines up, in the background (the gateway listens meanwhile
        and says they are starting)."""
        self._bring_up = asyncio.create_task(self._start_each(), name="swap-pool-start")

    async def _start_each(self) -> None:
        """One engine after another, each asleep once ready; then the default woken."""
        for name, member in zip(self.names, self.supervisors, strict=True):
            await member.start()
            try:
                # Its supervisor gives up on its own (restarts, re-plans: each start bounded);
                # this bound is only a backstop.
                await member.wait_for(
                    EngineState.READY, EngineState.FAILED, timeout=4 * self._ready_timeout
                )
            except TimeoutError:
                pass
            if member.state is not EngineState.READY:  # reported on its own; others serve
                logger.warning("%s did not start: %s", name, member.detail or member.reason)
                continue
            try:
                await self.sleeper.sleep(name, abort=False)
            except SleepError as exc:  # awake, it holds the memory the next one needs
                logger.warning("%s could not be put to sleep: %s", name, exc)
        first = next((n for n, m in zip(self.names, self.members, strict=True) if m.models), None)
        if first is not None:
            try:
                (await self.gate.enter(first)).release()
            except ModelUnavailable as exc:
                logger.warning("%s", exc)
        self._up = True
        self._on_member_state(self.state)

    def _on_member_state(self, state: EngineState) -> None:
        if self._up:
            super()._on_member_state(state)
        else:
            self._set_state(EngineState.STARTING, "starting the models one after another")

    def _restarted(self, state: EngineState) -> None:
        """An engine restarted after a crash comes back awake: put it back to sleep unless
        it is the awake one."""
        if state is not EngineState.READY or not self._up:
            return
        for name, member in zip(self.names, self.supervisors, strict=True):
            if member.state is EngineState.READY and name != self.gate.awake:
                task = asyncio.ensure_future(self._sleep_quietly(name))
                self._chores.add(task)
                task.add_done_callback(self._chores.discard)

    async def _sleep_quietly(self, name: str) -> None:
        try:
            if not await self.sleeper.is_sleeping(name):
                await self.sleeper.sleep(name, abort=False)
        except Exception as exc:
            logger.warning("could not put %s back to sleep: %s", name, exc)

    def states(self) -> dict[str, str]:
        """Each model's state: awake, asleep, or its engine's own (starting, failed, ...)."""
        states = {}
        for name, member in zip(self.names, self.supervisors, strict=True):
            if member.state is not EngineState.READY:
                states[name] = member.state.value
            else:
                states[name] = "awake" if name == self.gate.awake else "asleep"
        return states

    async def stop(self) -> None:
        if self._bring_up is not None:
            self._bring_up.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._bring_up
        await self.gate.close()
        await super().stop()
        await self.client.aclose()

    async def send(
        self,
        affinity: str | None,
        attempt: Callable[[Lease], Awaitable[T]],
        *,
        first_byte_within: float | None = None,
        model: str | None = None,
    ) -> tuple[Lease, T]:
        name = model or self.names[0]
        if name not in self.names:
            raise ModelUnavailable(f"no engine serves '{name}'")
        ticket = await self.gate.enter(name)

        async def holding(lease: Lease) -> T:
            lease.after_release(ticket.release)
            return await attempt(lease)

        try:
            return await super().send(
                affinity, holding, first_byte_within=first_byte_within, model=name
            )
        except BaseException:
            ticket.release()
            raise
