"""The swap gate (engine/swap.py): who waits, when an engine sleeps and wakes.

The sleeper is a TEST DOUBLE recording the calls, failing on cue; the clock is a counter
the test moves, so no test depends on how fast this machine is.
"""

from __future__ import annotations

import asyncio

import pytest

from lowvram.engine.swap import ModelUnavailable, SwapGate, SwapPolicy, Ticket

pytestmark = pytest.mark.anyio


class RecordingSleeper:
    """A TEST DOUBLE of vLLM's sleep endpoints: records calls; fails the models in `broken`."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.broken: set[str] = set()
        self.hold: asyncio.Event | None = None
        """Set: a wake waits for it (a slow wake)."""

    async def sleep(self, model: str, *, abort: bool) -> None:
        self.calls.append(f"sleep {model}" + (" abort" if abort else ""))
        if model in self.broken:
            raise RuntimeError("sleep failed")

    async def wake(self, model: str) -> None:
        self.calls.append(f"wake {model}")
        if self.hold is not None:
            await self.hold.wait()
        if model in self.broken:
            raise RuntimeError("wake failed")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate(sleeper: RecordingSleeper, clock: Clock | None = None, **policy: float) -> SwapGate:
    return SwapGate(
        ["a", "b", "c"],
        sleeper,
        SwapPolicy(**({"min_awake": 0.0} | policy)),
        awake="a",
        clock=clock or Clock(),
    )


async def settle() -> None:
    """Let the gate's task run until it waits on something (bounded)."""
    for _ in range(50):
        await asyncio.sleep(0)


async def test_the_awake_model_goes_straight_in_without_a_swap() -> None:
    sleeper = RecordingSleeper()
    g = gate(sleeper)
    tickets = [await g.enter("a") for _ in range(3)]
    assert sleeper.calls == [] and g.running == {"a": 3}
    for t in tickets:
        t.release()
        t.release()  # idempotent
    assert g.running == {}


async def test_a_sleeping_model_waits_for_the_running_requests_then_one_swap() -> None:
    sleeper = RecordingSleeper()
    g = gate(sleeper)
    running = await g.enter("a")
    waiting = [asyncio.ensure_future(g.enter("b")) for _ in range(3)]
    await settle()
    assert sleeper.calls == [] and not any(w.done() for w in waiting)  # a still runs
    running.release()
    tickets = await asyncio.gather(*waiting)
    assert sleeper.calls == ["sleep a", "wake b"]
    assert g.awake == "b" and g.swaps == 1 and g.running == {"b": 3}
    assert all(isinstance(t, Ticket) and t.model == "b" for t in tickets)


async def test_while_a_swap_is_due_the_awake_model_takes_no_new_requests() -> None:
    sleeper = RecordingSleeper()
    g = gate(sleeper)
    running = await g.enter("a")
    for_b = asyncio.ensure_future(g.enter("b"))
    await settle()
    late_a = asyncio.ensure_future(g.enter("a"))  # behind b: it would starve b otherwise
    await settle()
    assert not late_a.done()
    running.release()
    (await for_b).release()
    ticket = await late_a
    assert sleeper.calls == ["sleep a", "wake b", "sleep b", "wake a"]
    assert ticket.model == "a" and g.awake == "a"


async def test_a_model_keeps_new_work_for_its_minimum_time_then_yields() -> None:
    clock = Clock()
    sleeper = RecordingSleeper()
    g = gate(sleeper, clock, min_awake=5.0)
    first = await g.enter("a")
    for_b = asyncio.ensure_future(g.enter("b"))
    await settle()
    clock.now += 1.0  # within a's minimum: more work for a goes in at once
    second = await asyncio.wait_for(g.enter("a"), 1)
    assert g.running == {"a": 2} and sleeper.calls == []
    clock.now += 5.0  # past it: a's next request waits behind b
    late_a = asyncio.ensure_future(g.enter("a"))
    await settle()
    assert not late_a.done()
    first.release()
    second.release()
    (await asyncio.wait_for(for_b, 5)).release()
    (await asyncio.wait_for(late_a, 5)).release()
    assert sleeper.calls == ["sleep a", "wake b", "sleep b", "wake a"]


async def test_models_are_woken_in_the_order_they_were_asked_for() -> None:
    sleeper = RecordingSleeper()
    g = gate(sleeper)
    running = await g.enter("a")
    for_c = asyncio.ensure_future(g.enter("c"))
    await settle()
    for_b = asyncio.ensure_future(g.enter("b"))
    await settle()
    running.release()
    (await for_c).release()
    (await for_b).release()
    assert sleeper.calls == ["sleep a", "wake c", "sleep c", "wake b"]


async def test_a_wake_that_fails_fails_its_waiters_and_the_next_request_swaps_again() -> None:
    sleeper = RecordingSleeper()
    sleeper.broken.add("b")
    g = gate(sleeper)
    with pytest.raises(ModelUnavailable, match="'b' could not be woken"):
        await g.enter("b")
    assert g.awake is None and g.running == {}
    ticket = await g.enter("a")  # a slept; it is woken again
    assert sleeper.calls == ["sleep a", "wake b", "wake a"] and ticket.model == "a"


async def test_a_sleep_that_fails_keeps_the_awake_model_serving() -> None:
    sleeper = RecordingSleeper()
    sleeper.broken.add("a")
    g = gate(sleeper)
    with pytest.raises(ModelUnavailable, match="'a' could not be put to sleep"):
        await g.enter("b")
    assert g.awake == "a"
    (await g.enter("a")).release()
    assert sleeper.calls == ["sleep a"]  # nothing woken beside a model still in memory


async def test_requests_outlasting_the_drain_are_ended_by_the_sleep() -> None:
    sleeper = RecordingSleeper()
    g = gate(sleeper, drain_seconds=0.01)
    await g.enter("a")  # never released: a stuck stream
    ticket = await asyncio.wait_for(g.enter("b"), 5)
    assert sleeper.calls == ["sleep a abort", "wake b"] and ticket.model == "b"


async def test_a_request_that_waits_too_long_is_told_so_and_leaves_the_queue() -> None:
    sleeper = RecordingSleeper()
    sleeper.hold = asyncio.Event()  # b's wake never finishes
    g = gate(sleeper, wait_seconds=0.01)
    with pytest.raises(ModelUnavailable, match="not woken within"):
        await g.enter("b")
    assert g.waiting == []
    sleeper.hold.set()
    await settle()
    assert g.awake == "b" and g.running == {}  # woken, nobody counted for the one gone


async def test_a_client_that_leaves_while_waiting_is_not_counted() -> None:
    sleeper = RecordingSleeper()
    g = gate(sleeper)
    running = await g.enter("a")
    leaving = asyncio.ensure_future(g.enter("b"))
    await settle()
    leaving.cancel()
    await settle()
    assert g.waiting == []
    running.release()
    await settle()
    assert sleeper.calls == [] and g.awake == "a"  # nobody left to swap for


async def test_an_unknown_model_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        await gate(RecordingSleeper()).enter("z")
