"""Several models on one GPU, one awake at a time: who waits, and when to swap.

    gate = SwapGate(["chat", "coder"], sleeper, SwapPolicy())
    ticket = await gate.enter("coder")   # returns once coder is awake
    ...                                   # the request runs on coder's engine
    ticket.release()

Each model has its own engine (a vLLM server started with sleep mode); `Sleeper` puts one
to sleep and wakes one (engine/vllm/sleep.py). The gate decides when:

- A request for the awake model goes straight in, unless another model's requests are
  waiting and the awake one has been awake `min_awake` seconds: then it queues behind them
  (no model starves, and no model is swapped out the moment it woke: no thrashing).
- A request for a sleeping model waits. The swap stops new requests to the awake model,
  waits for its running ones to finish (at most `drain_seconds`), puts it to sleep, wakes
  the wanted one, and lets in every request waiting for it, in arrival order.
- A wake that fails fails the requests waiting for that model (`ModelUnavailable`), and
  the next request for any model starts a fresh swap.

The gate only orders; it never sleeps on a timer of its own beyond the two bounds above.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lowvram.engine.errors import EngineError

logger = logging.getLogger(__name__)


class ModelUnavailable(EngineError):
    """A request's model could not be woken (or not in time): a 503 for the client."""


class Sleeper(Protocol):
    async def sleep(self, model: str, *, abort: bool) -> None:
        """Put `model`'s engine to sleep; `abort`: end what it still runs (past the drain)."""
        ...

    async def wake(self, model: str) -> None:
        """Wake `model`'s engine so that it serves again (raises if it cannot)."""
        ...


@dataclass(frozen=True)
class SwapPolicy:
    min_awake: float = 2.0
    """Seconds a woken model keeps taking new requests while others wait."""
    drain_seconds: float = 30.0
    """Seconds a swap waits for the awake model's running requests before it sleeps anyway
    (they are then ended by the engine)."""
    wait_seconds: float = 120.0
    """Seconds a request waits for its model to be woken before a 503."""


SwapListener = Callable[[str | None, str, float], None]
"""Called after each swap: (from, to, seconds it took)."""


class Ticket:
    """A request's hold on its awake model; release it once the request is over."""

    def __init__(self, gate: SwapGate, model: str) -> None:
        self._gate, self.model = gate, model
        self._released = False

    def release(self) -> None:
        """Idempotent."""
        if not self._released:
            self._released = True
            self._gate._left(self.model)


@dataclass
class _Waiter:
    model: str
    granted: asyncio.Future[None]


class SwapGate:
    def __init__(
        self,
        models: Sequence[str],
        sleeper: Sleeper,
        policy: SwapPolicy | None = None,
        *,
        awake: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.models = list(models)
        self.sleeper = sleeper
        self.policy = policy or SwapPolicy()
        self.awake = awake
        """The model whose engine is awake now; None before the first wake or after a
        failed one."""
        self.swaps = 0
        self._clock = clock
        self._awake_since = clock()
        self._running: Counter[str] = Counter()
        self._drained = asyncio.Event()
        self._changed = asyncio.Event()
        """Set when a request arrives or ends: the queue's task looks again."""
        self._waiting: list[_Waiter] = []
        self._task: asyncio.Task[None] | None = None
        self._swapping = False
        self._listeners: list[SwapListener] = []

    def add_listener(self, listener: SwapListener) -> None:
        self._listeners.append(listener)

    @property
    def running(self) -> dict[str, int]:
        return dict(self._running)

    @property
    def waiting(self) -> list[str]:
        return [w.model for w in self._waiting]

    async def enter(self, model: str) -> Ticket:
        """Return once `model` is awake and this request may run on it."""
        if model not in self.models:
            raise ValueError(f"no engine for model {model!r}")
        if model == self.awake and not self._swap_due():
            self._admit(model)
            return Ticket(self, model)
        waiter = _Waiter(model, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._changed.set()
        self._kick()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), self.policy.wait_seconds)
        except BaseException as exc:  # timed out, failed, or the client left
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif _granted(waiter.granted):  # let in just as it gave up
                self._left(model)
            if isinstance(exc, TimeoutError):
                raise ModelUnavailable(
                    f"the model '{model}' was not woken within {self.policy.wait_seconds:.0f} s"
                ) from None
            raise
        return Ticket(self, model)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for waiter in self._waiting:
            if not waiter.granted.done():
                waiter.granted.set_exception(ModelUnavailable("the gateway is shutting down"))

    # --- inside ------------------------------------------------------------------------

    def _swap_due(self) -> bool:
        """Whether a request for the awake model must queue: a swap is under way, or others
        wait and it has been awake long enough."""
        if self._swapping:
            return True
        others = any(w.model != self.awake for w in self._waiting)
        return others and self._min_awake_passed()

    def _min_awake_passed(self) -> bool:
        return self._clock() - self._awake_since >= self.policy.min_awake

    def _admit(self, model: str) -> None:
        self._running[model] += 1
        self._drained.clear()

    def _left(self, model: str) -> None:
        self._changed.set()
        self._running[model] -= 1
        if self._running[model] <= 0:
            del self._running[model]
            if model == self.awake:
                self._drained.set()

    def _kick(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._serve_waiting(), name="swap-gate")

    async def _serve_waiting(self) -> None:
        """Serve the queue from its head until nobody waits: let in the awake model's
        requests, or swap to the head's model once the awake one has had its minimum time."""
        while self._waiting:
            wanted = self._waiting[0].model
            if wanted == self.awake:
                self._grant(wanted)
            elif (
                self.awake is not None
                and self._running[self.awake]
                and not (self._min_awake_passed())
            ):
                # Meanwhile new requests for the awake model still go straight in; look
                # again when it runs out, or sooner when a request ends or arrives.
                left = self.policy.min_awake - (self._clock() - self._awake_since)
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)
            else:
                await self._swap_to(wanted)

    def _grant(self, model: str) -> None:
        """Let in every waiting request for `model` (awake), in arrival order."""
        for waiter in [w for w in self._waiting if w.model == model]:
            self._waiting.remove(waiter)
            if not waiter.granted.done():
                self._admit(model)
                waiter.granted.set_result(None)

    async def _swap_to(self, wanted: str) -> None:
        self._swapping = True
        try:
            await self._sleep_then_wake(wanted)
        finally:
            self._swapping = False

    async def _sleep_then_wake(self, wanted: str) -> None:
        started, was = self._clock(), self.awake
        if was is not None:
            drained = await self._drain(was)
            if not any(w.model == wanted for w in self._waiting):
                return  # its requests gave up meanwhile: keep the awake one
            try:
                await self.sleeper.sleep(was, abort=not drained)
            except Exception as exc:  # its memory is still held: waking another would OOM
                logger.warning("could not put %s to sleep: %s", was, exc)
                self._fail(wanted, f"the model '{was}' could not be put to sleep")
                return
            self.awake = None
        try:
            await self.sleeper.wake(wanted)
        except Exception as exc:
            logger.warning("could not wake %s: %s", wanted, exc)
            self._fail(wanted, f"the model '{wanted}' could not be woken")
            return
        self.awake, self._awake_since = wanted, self._clock()
        self.swaps += 1
        took = self._clock() - started
        logger.info("swapped %s -> %s in %.2f s", was or "none", wanted, took)
        for listener in self._listeners:
            listener(was, wanted, took)

    async def _drain(self, model: str) -> bool:
        """Wait for `model`'s running requests to end; False if they outlast the bound."""
        if not self._running[model]:
            return True
        try:
            await asyncio.wait_for(self._drained.wait(), self.policy.drain_seconds)
        except TimeoutError:
            logger.warning(
                "%d requests on %s still running after %.0f s: ending them to swap",
                self._running[model],
                model,
                self.policy.drain_seconds,
            )
            return False
        return True

    def _fail(self, model: str, why: str) -> None:
        for waiter in [w for w in self._waiting if w.model == model]:
            self._waiting.remove(waiter)
            if not waiter.granted.done():
                waiter.granted.set_exception(ModelUnavailable(why))


def _granted(future: asyncio.Future[None]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
