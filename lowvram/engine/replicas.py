"""Several engines serving one model, and the one owner of routing between them.

    pool = Replicas([engine_a, engine_b])            # any EngineHandles: supervised or external
    lease, answer = await pool.send(affinity, attempt)
    ...                                              # attempt(lease) sent it to lease.member
    lease.release(Outcome.OK)                        # once the request has ended, however

The gateway asks the pool for a member and reports back; the pool decides everything else:

- **Which member**: the ready one with the fewest requests under way. A conversation goes
  back to the same member (its prefix cache holds the earlier turns) unless that one has
  `AFFINITY_SLACK` more requests than the least busy one; the key is a hash of its first
  messages.
- **Whether to try another**: only when the attempt raised `Unreached`, meaning the
  request was never sent (the connection was refused). A request that may have reached an
  engine is never sent to a second one: a request that kills its engine must not kill
  the next.
- **Which members to trust**: every request's `Outcome`. `FAILURES_IN_A_ROW` failed
  requests (5xx, garbage, a broken stream, nothing in time) take a member out of the
  rotation for a cool-down that doubles while it keeps failing; after it, one more
  failure takes it out again, one success clears it. A refused connection takes it out
  for `UNREACHED_SECONDS`. The last member that could serve is never taken out: a doubtful
  engine is better than none. This catches what health checks do not: an engine that
  answers `/v1/models` but sends garbage, or takes minutes to start an answer.
- **What waits on a member that is taken out, or stops being ready**: each request still
  waiting for its first byte from it is told (`Lease.on_lost`) and ends with a 503 its
  client may retry, rather than waiting out the read timeout.

The pool is ready while one member is; its model is the members' with the sequences of
the ready ones added up (the gateway's in-flight bound).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
import zlib
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from lowvram.engine.handle import EngineHandle, EngineState, ServedModel, StateMixin

T = TypeVar("T")

AFFINITY_SLACK = 2
"""How many more requests than the least busy member a conversation's own member may have."""
UNREACHED_SECONDS = 2.0
"""How long a member that refused a connection gets no requests (its health check's pace)."""
FAILURES_IN_A_ROW = 3
"""Failed requests in a row that take a member out of the rotation."""
COOLDOWN_SECONDS = (10.0, 120.0)
"""The first cool-down of a member taken out, and the longest (it doubles in between)."""


class Outcome(enum.Enum):
    """What one request says about the member that served it."""

    OK = "ok"
    """An answer, or a refusal of the client's own mistake (a 4xx)."""
    FAILED = "failed"
    """The engine failed: a 5xx, garbage, a connection broken mid-answer."""
    SLOW = "slow"
    """Nothing in time: the engine's read timeout, or a stream's first event far too late."""


class Unreached(Exception):
    """Raised by an attempt whose request was never sent: another member may take it."""

    def __init__(self, cause: Exception | None = None) -> None:
        super().__init__(str(cause) if cause else "no member could take the request")
        self.cause = cause


class Lease:
    """One request's hold on one member, from the pick to `release`."""

    def __init__(self, pool: Replicas, index: int, first_byte_within: float | None) -> None:
        self._pool = pool
        self._index = index
        self.member: EngineHandle = pool.members[index]
        self.name = pool.names[index]
        self.first_byte_within = first_byte_within
        """Seconds within which a first byte is due (streams); later is a slow member."""
        self._picked = time.monotonic()
        self._received: float | None = None
        self.waiting = True
        """Nothing has arrived from the member yet."""
        self.lost = False
        """The member was taken out (or stopped being ready) while this request waited."""
        self._on_lost: Callable[[], None] | None = None
        self._released = False
        self._after_release: list[Callable[[], None]] = []

    def received(self) -> None:
        """The first byte of the answer arrived: the request no longer waits on the member."""
        if self.waiting:
            self.waiting = False
            self._received = time.monotonic()
        self._on_lost = None

    def on_lost(self, callback: Callable[[], None] | None) -> None:
        """Call `callback` if the member is taken out while the request still waits on it
        (one at a time: the phase waiting now sets its own)."""
        self._on_lost = callback

    def release(self, outcome: Outcome | None = None) -> None:
        """Idempotent; `outcome` (None: says nothing about the member) teaches the pool."""
        if not self._released:
            self._released = True
            self._pool._released(self, self._judged(outcome))
            for callback in self._after_release:
                callback()

    def after_release(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the lease is released (what else the request held)."""
        self._after_release.append(callback)

    def _judged(self, outcome: Outcome | None) -> Outcome | None:
        """A first byte far too late makes a slow member, whether the client waited for it
        (an answer all the same) or gave up first (its timeout: no outcome of its own)."""
        due = self.first_byte_within
        if due is None or not (outcome is Outcome.OK or (outcome is None and self.waiting)):
            return outcome
        waited = (self._received or time.monotonic()) - self._picked
        return Outcome.SLOW if waited >= due else outcome

    def _lose(self) -> None:
        if self.waiting and not self.lost:
            self.lost = True
            if self._on_lost is not None:
                self._on_lost()


@dataclass
class _Health:
    """What the pool knows of one member beyond its own state."""

    outstanding: int = 0
    failures: int = 0
    """Failed requests in a row."""
    out_until: float = 0.0
    """Taken out of the rotation until then (monotonic seconds)."""
    cooldown: float = COOLDOWN_SECONDS[0]
    why: str = ""
    leases: set[Lease] = field(default_factory=set)


def _serves(member: EngineHandle, model: str) -> bool:
    """Whether `member` serves `model`; a member that lists none (not ready) serves none."""
    return any(m.id == model for m in member.models)


class Replicas(StateMixin):
    def __init__(self, members: Sequence[EngineHandle], names: Sequence[str] = ()) -> None:
        super().__init__()
        if not members:
            raise ValueError("a pool needs at least one engine")
        self.members = list(members)
        self.names = list(names) or [f"replica-{i}" for i in range(len(members))]
        self._health = [_Health() for _ in members]
        self._turn = itertools.count()
        for member in self.members:
            member.add_listener(self._on_member_state)
        self._on_member_state(self.members[0].state)  # the members' reasons from the start

    @property
    def outstanding(self) -> list[int]:
        return [health.outstanding for health in self._health]

    @property
    def pooled(self) -> bool:
        """Whether there is a choice to make: more than one member."""
        return len(self.members) > 1

    @property
    def model(self) -> ServedModel | None:
        models = self.models
        return models[0] if models else None

    @property
    def models(self) -> tuple[ServedModel, ...]:
        """The ready members' models, in the members' order, each with its sequences added
        up over the members serving it (the gateway's in-flight bound)."""
        ready = [m.models for m in self.members if m.state is EngineState.READY]
        merged: dict[str, ServedModel] = {}
        for models in ready:
            for model in models:
                if model.id not in merged:
                    batches = [m.max_batch for ms in ready for m in ms if m.id == model.id]
                    total = sum(b for b in batches if b) if all(batches) else None
                    merged[model.id] = replace(model, max_batch=total)
        return tuple(merged.values())

    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def stop(self) -> None:
        await asyncio.gather(*(member.stop() for member in self.members))
        self._set_state(EngineState.STOPPED, "stopped")

    # --- routing ----------------------------------------------------------------------

    async def send(
        self,
        affinity: str | None,
        attempt: Callable[[Lease], Awaitable[T]],
        *,
        first_byte_within: float | None = None,
        model: str | None = None,
    ) -> tuple[Lease, T]:
        """Run `attempt` on a member serving `model` (any, without); on `Unreached`, on the
        next one, until none is left (then `Unreached` with the last cause). Any other error
        is the request's own: the lease stays with the caller, who releases it with the
        request's outcome."""
        tried = [m for m in self.members if model is not None and not _serves(m, model)]
        cause: Exception | None = None
        while (lease := self.pick(affinity, tried, first_byte_within)) is not None:
            try:
                return lease, await attempt(lease)
            except Unreached as exc:
                lease.release()
                self._take_out(lease._index, UNREACHED_SECONDS, "it refused a connection")
                tried.append(lease.member)
                cause = exc.cause or cause
        raise Unreached(cause)

    def pick(
        self,
        affinity: str | None = None,
        exclude: Collection[EngineHandle] = (),
        first_byte_within: float | None = None,
    ) -> Lease | None:
        """A lease on a ready member for one request; None if none is left.

        `exclude`: members this request already failed to reach.
        """
        now = time.monotonic()
        ready = [
            i
            for i, m in enumerate(self.members)
            if m.state is EngineState.READY and m not in exclude
        ]
        trusted = [i for i in ready if self._health[i].out_until <= now]
        ready = trusted or ready  # a member taken out is better than none
        if not ready:
            return None
        outstanding = [self._health[i].outstanding for i in ready]
        least = min(outstanding)
        chosen = None
        if affinity is not None and len(ready) > 1:
            own = ready[zlib.crc32(affinity.encode()) % len(ready)]
            if self._health[own].outstanding <= least + AFFINITY_SLACK:
                chosen = own
        if chosen is None:
            # The least busy; among equals, in turn, so that a quiet pool is shared too.
            idle = [i for i, n in zip(ready, outstanding, strict=True) if n == least]
            chosen = idle[next(self._turn) % len(idle)]
        lease = Lease(self, chosen, first_byte_within)
        health = self._health[chosen]
        health.outstanding += 1
        health.leases.add(lease)
        return lease

    def _released(self, lease: Lease, outcome: Outcome | None) -> None:
        health = self._health[lease._index]
        health.outstanding -= 1
        health.leases.discard(lease)
        if outcome is Outcome.OK:
            health.failures = 0
            health.cooldown = COOLDOWN_SECONDS[0]
        elif outcome is not None and not lease.lost:
            health.failures += 1
            if health.failures >= FAILURES_IN_A_ROW and health.out_until <= time.monotonic():
                why = f"{health.failures} requests in a row failed ({outcome.value})"
                self._take_out(lease._index, health.cooldown, why)
                health.cooldown = min(health.cooldown * 2, COOLDOWN_SECONDS[1])
                health.failures = FAILURES_IN_A_ROW - 1  # back on trial after the cool-down

    def _take_out(self, index: int, seconds: float, why: str) -> None:
        """Out of the rotation for `seconds`, unless no other member could serve."""
        now = time.monotonic()
        others = [
            i
            for i, m in enumerate(self.members)
            if i != index and m.state is EngineState.READY and self._health[i].out_until <= now
        ]
        if not others:
            return
        health = self._health[index]
        health.out_until = now + seconds
        health.why = why
        self._lose_waiting(index)

    def _lose_waiting(self, index: int) -> None:
        for lease in list(self._health[index].leases):
            lease._lose()

    # --- what operators see ---------------------------------------------------------------

    @property
    def ready_count(self) -> int:
        return sum(m.state is EngineState.READY for m in self.members)

    def snapshot(self) -> list[dict[str, object]]:
        """Each member's state, for /ready and /metrics: a ready member the pool took out
        is `out`, with why and for how long."""
        now = time.monotonic()
        states = []
        for name, member, health in zip(self.names, self.members, self._health, strict=True):
            state, reason = member.state.value, member.reason
            if member.state is EngineState.READY and health.out_until > now:
                state = "out"
                reason = f"{health.why}; back in {health.out_until - now:.0f} s"
            states.append(
                {"name": name, "state": state, "reason": reason, "outstanding": health.outstanding}
            )
        return states

    # --- state ------------------------------------------------------------------------

    def _on_member_state(self, _: EngineState) -> None:
        for index, member in enumerate(self.members):
            if member.state is not EngineState.READY:
                self._lose_waiting(index)
        states = [m.state for m in self.members]
        ready = states.count(EngineState.READY)
        if ready:
            detail = f"{ready} of {len(states)} replicas ready"
            if self.state is EngineState.READY:
                self._detail = detail
                self._notify()  # still ready, with more or fewer sequences
            else:
                self._set_state(EngineState.READY, detail)
            return
        for state in (EngineState.RESTARTING, EngineState.STARTING, EngineState.FAILED):
            if state in states:
                first = self.members[states.index(state)]
                reason = (
                    first.reason if len(states) == 1 else f"no replica is ready: {first.reason}"
                )
                self._set_state(state, first.detail, reason)
                return
        self._set_state(EngineState.STOPPED, "stopped")


def as_replicas(engine: EngineHandle | Replicas) -> Replicas:
    """The pool the gateway routes through: the engine itself if it is one."""
    return engine if isinstance(engine, Replicas) else Replicas([engine], ["engine"])
