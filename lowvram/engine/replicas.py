"""Several engines serving one model, as one handle: each request goes to one of them.

    pool = Replicas([engine_a, engine_b])     # any EngineHandles: supervised or external
    member, release = pool.pick(affinity)      # the ready one with the fewest requests...
    ...                                        # ...send the request to member.base_url
    release()                                  # once the request has ended, however

The pool is ready while one member is; its model is the members' with the sequences of the
ready ones added up (the gateway's in-flight bound). A member that fails its health checks
or dies gets no new requests, and is back in the rotation once it is ready again; what it
was streaming ends where the connection broke (the relay sends the error and `[DONE]`).
A member that refuses a connection before its health check notices (an external server
that just died) is `suspect`: skipped for `SUSPECT_SECONDS`, and the gateway sends the
request to another member, which is safe because the engine never received it.

A conversation goes back to the same member where that does not overload it: the engines'
prefix caches then hold its earlier turns. The affinity key is a hash of its first
messages; the member it maps to is used unless it already has `AFFINITY_SLACK` more
requests than the least busy one.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import zlib
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace

from lowvram.engine.handle import EngineHandle, EngineState, ServedModel, StateMixin

AFFINITY_SLACK = 2
"""How many more requests than the least busy member a conversation's own member may have."""
SUSPECT_SECONDS = 2.0
"""How long a member that refused a connection gets no requests (its health check's pace)."""


class Replicas(StateMixin):
    def __init__(self, members: Sequence[EngineHandle], names: Sequence[str] = ()) -> None:
        super().__init__()
        if not members:
            raise ValueError("a pool needs at least one engine")
        self.members = list(members)
        self.names = list(names) or [f"replica-{i}" for i in range(len(members))]
        self.outstanding = [0] * len(members)
        self._suspect_until = [0.0] * len(members)
        self._turn = itertools.count()
        for member in self.members:
            member.add_listener(self._on_member_state)
        self._on_member_state(self.members[0].state)  # the members' reasons from the start

    # --- EngineHandle -----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return self._first_ready().base_url

    @property
    def api_key(self) -> str | None:
        return self._first_ready().api_key

    @property
    def model(self) -> ServedModel | None:
        ready = [m.model for m in self.members if m.state is EngineState.READY and m.model]
        if not ready:
            return None
        batches = [m.max_batch for m in ready]
        total = sum(b for b in batches if b) if all(batches) else None
        return replace(ready[0], max_batch=total)

    async def start(self) -> None:
        for member in self.members:
            await member.start()

    async def stop(self) -> None:
        await asyncio.gather(*(member.stop() for member in self.members))
        self._set_state(EngineState.STOPPED, "stopped")

    # --- routing ----------------------------------------------------------------------

    def pick(
        self, affinity: str | None = None, exclude: Collection[EngineHandle] = ()
    ) -> tuple[EngineHandle, Callable[[], None]] | None:
        """A ready member for one request and the call that releases it; None if none.

        `exclude`: members this request already failed to reach.
        """
        now = time.monotonic()
        ready = [
            i
            for i, m in enumerate(self.members)
            if m.state is EngineState.READY and m not in exclude
        ]
        trusted = [i for i in ready if self._suspect_until[i] <= now]
        ready = trusted or ready  # a suspect member is better than none
        if not ready:
            return None
        least = min(self.outstanding[i] for i in ready)
        chosen = None
        if affinity is not None and len(ready) > 1:
            own = ready[zlib.crc32(affinity.encode()) % len(ready)]
            if self.outstanding[own] <= least + AFFINITY_SLACK:
                chosen = own
        if chosen is None:
            # The least busy; among equals, in turn, so that a quiet pool is shared too.
            idle = [i for i in ready if self.outstanding[i] == least]
            chosen = idle[next(self._turn) % len(idle)]
        self.outstanding[chosen] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.outstanding[chosen] -= 1

        return self.members[chosen], release

    def suspect(self, member: EngineHandle) -> None:
        """`member` refused a connection: give it no requests for a while."""
        self._suspect_until[self.members.index(member)] = time.monotonic() + SUSPECT_SECONDS

    @property
    def ready_count(self) -> int:
        return sum(m.state is EngineState.READY for m in self.members)

    def name_of(self, member: EngineHandle) -> str:
        return self.names[self.members.index(member)]

    def snapshot(self) -> list[dict[str, object]]:
        """Each member's state, for /ready and /metrics."""
        return [
            {
                "name": name,
                "state": member.state.value,
                "reason": member.reason,
                "outstanding": outstanding,
            }
            for name, member, outstanding in zip(
                self.names, self.members, self.outstanding, strict=True
            )
        ]

    # --- state ------------------------------------------------------------------------

    def _first_ready(self) -> EngineHandle:
        return next((m for m in self.members if m.state is EngineState.READY), self.members[0])

    def _on_member_state(self, _: EngineState) -> None:
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


def as_replicas(engine: EngineHandle) -> Replicas:
    """The pool the gateway routes through: the engine itself if it is one."""
    return engine if isinstance(engine, Replicas) else Replicas([engine], ["engine"])
