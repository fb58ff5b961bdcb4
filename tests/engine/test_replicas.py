"""The pool of replicas on its own: routing, affinity, state, without any server."""

from __future__ import annotations

from collections import Counter

import pytest

from lowvram.engine.handle import EngineState, ServedModel, StateMixin
from lowvram.engine.replicas import (
    AFFINITY_SLACK,
    FAILURES_IN_A_ROW,
    Lease,
    Outcome,
    Replicas,
    Unreached,
    as_replicas,
)


class Member(StateMixin):
    """A TEST DOUBLE of an engine handle whose state the test sets."""

    def __init__(self, name: str, max_batch: int | None = 4) -> None:
        super().__init__()
        self.name = name
        self._model = ServedModel(id="m", context_length=4096, max_batch=max_batch)

    @property
    def base_url(self) -> str:
        return f"http://{self.name}"

    @property
    def api_key(self) -> str | None:
        return None

    @property
    def model(self) -> ServedModel | None:
        return self._model if self.state is EngineState.READY else None

    @property
    def models(self) -> tuple[ServedModel, ...]:
        return (self._model,) if self.state is EngineState.READY else ()

    def set(self, state: EngineState, reason: str | None = None) -> None:
        self._set_state(state, f"{self.name} {state.value}", reason)

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.set(EngineState.STOPPED)


def pool_of(n: int, ready: bool = True) -> tuple[Replicas, list[Member]]:
    members = [Member(f"r{i}") for i in range(n)]
    pool = Replicas(members)
    for member in members:
        if ready:
            member.set(EngineState.READY)
    return pool, members


def test_requests_go_to_the_least_busy_ready_member() -> None:
    pool, members = pool_of(3)
    held = [pool.pick() for _ in range(6)]
    assert all(h is not None for h in held)
    assert pool.outstanding == [2, 2, 2]  # shared evenly, not all on the first
    first = held[0]
    assert first is not None
    first.release()
    first.release()  # releasing twice counts once
    assert pool.outstanding[members.index(first.member)] == 1  # type: ignore[arg-type]
    nxt = pool.pick()
    assert nxt is not None and nxt.member is first.member  # the one with a free slot


def test_a_member_that_is_not_ready_gets_nothing_and_comes_back() -> None:
    pool, members = pool_of(2)
    members[1].set(EngineState.RESTARTING, "the engine crashed")
    chosen = {id(pool.pick().member) for _ in range(4)}  # type: ignore[union-attr]
    assert chosen == {id(members[0])}
    assert pool.state is EngineState.READY and pool.ready_count == 1
    members[1].set(EngineState.READY)
    picks = Counter(pool.pick().member.name for _ in range(4))  # type: ignore[union-attr, attr-defined]
    assert picks["r1"] >= 2  # the returning member is the least busy: it gets the next ones


def test_no_ready_member_means_no_pick_and_the_pool_says_why() -> None:
    pool, members = pool_of(2)
    members[0].set(EngineState.FAILED, "the engine was killed by SIGILL")
    members[1].set(EngineState.RESTARTING, "the engine exited and restarts in 1 s")
    assert pool.pick() is None
    assert pool.state is EngineState.RESTARTING  # one will be back: clients may retry
    assert "restarts in 1 s" in pool.reason
    members[1].set(EngineState.FAILED, "the engine aborted itself")
    assert pool.state is EngineState.FAILED and "no replica is ready" in pool.reason


def test_a_conversation_stays_on_its_member_unless_that_one_is_overloaded() -> None:
    pool, _ = pool_of(2)
    key = '[{"role": "system", "content": "You are terse."}]'
    picks = [pool.pick(key) for _ in range(AFFINITY_SLACK + 1)]
    own = picks[0].member  # type: ignore[union-attr]
    assert all(p.member is own for p in picks)  # type: ignore[union-attr]
    # Now its member has AFFINITY_SLACK + 1 more requests than the other: the next goes there.
    spill = pool.pick(key)
    assert spill is not None and spill.member is not own
    for p in picks:
        p.release()  # type: ignore[union-attr]
    back = pool.pick(key)
    assert back is not None and back.member is own


def test_different_conversations_spread_over_members() -> None:
    pool, _ = pool_of(2)
    owners = Counter()
    for i in range(40):
        picked = pool.pick(f"conversation {i}")
        assert picked is not None
        owners[picked.name] += 1
        picked.release()
    assert min(owners.values()) >= 10  # both take part (40 keys hashed over 2)


@pytest.mark.anyio
async def test_a_member_that_refused_is_skipped_and_the_request_goes_to_another() -> None:
    pool, members = pool_of(2)
    tried: list[str] = []

    async def attempt(lease: Lease) -> str:
        tried.append(lease.name)
        if lease.member is members[0]:
            raise Unreached(RuntimeError("refused"))
        return "answered"

    for _ in range(3):
        lease, answer = await pool.send(None, attempt)
        assert answer == "answered" and lease.member is members[1]
        lease.release(Outcome.OK)
    assert tried.count("replica-0") == 1  # refused once, then skipped for a while
    assert pool.outstanding == [0, 0]
    excluded = pool.pick(exclude=[members[1]])
    assert excluded is not None and excluded.member is members[0]  # better doubtful than none
    assert pool.pick(exclude=members) is None


@pytest.mark.anyio
async def test_only_a_request_never_sent_goes_to_another_member() -> None:
    pool, _ = pool_of(2)
    tried: list[str] = []

    async def attempt(lease: Lease) -> str:
        tried.append(lease.name)
        raise ConnectionResetError("the engine closed the connection")  # it had the request

    with pytest.raises(ConnectionResetError):
        await pool.send(None, attempt)
    assert len(tried) == 1  # never resent: a request that kills an engine kills one

    async def refused(lease: Lease) -> str:
        raise Unreached(RuntimeError(f"{lease.name} refused"))

    with pytest.raises(Unreached) as raised:
        await pool.send(None, refused)
    assert "refused" in str(raised.value.cause)


def test_failures_in_a_row_take_a_member_out_for_a_while_but_never_the_last() -> None:
    pool, members = pool_of(2)
    for _ in range(FAILURES_IN_A_ROW):
        lease = pool.pick(exclude=[members[1]])
        assert lease is not None
        lease.release(Outcome.FAILED)
    assert {pool.pick().name for _ in range(4)} == {"replica-1"}  # type: ignore[union-attr]
    states = {r["name"]: (r["state"], r["reason"]) for r in pool.snapshot()}
    assert (
        states["replica-0"][0] == "out" and "3 requests in a row failed" in states["replica-0"][1]
    )
    assert pool.state is EngineState.READY
    for _ in range(FAILURES_IN_A_ROW):  # the other one fails too: it stays, being the last
        lease = pool.pick()
        assert lease is not None and lease.member is members[1]
        lease.release(Outcome.FAILED)
    assert {r["state"] for r in pool.snapshot()} == {"out", "ready"}


def test_successes_in_between_keep_a_member_in() -> None:
    pool, members = pool_of(2)
    for outcome in [Outcome.FAILED, Outcome.FAILED, Outcome.OK] * 3:
        lease = pool.pick(exclude=[members[1]])
        assert lease is not None
        lease.release(outcome)
    assert [r["state"] for r in pool.snapshot()] == ["ready", "ready"]


def test_requests_waiting_on_a_member_taken_out_are_told_at_once() -> None:
    pool, members = pool_of(2)
    waiting = pool.pick(exclude=[members[1]])
    answering = pool.pick(exclude=[members[1]])
    assert waiting is not None and answering is not None
    told: list[str] = []
    waiting.on_lost(lambda: told.append("waiting"))
    answering.on_lost(lambda: told.append("answering"))
    answering.received()  # its first byte is in: it streams on
    for _ in range(FAILURES_IN_A_ROW):
        lease = pool.pick(exclude=[members[1]])
        assert lease is not None
        lease.release(Outcome.FAILED)
    assert told == ["waiting"] and waiting.lost and not answering.lost
    waiting.release(None)  # what it was told says nothing more about the member


def test_requests_waiting_on_a_member_that_stops_being_ready_are_told() -> None:
    pool, members = pool_of(2)
    waiting = pool.pick(exclude=[members[1]])
    assert waiting is not None
    told: list[bool] = []
    waiting.on_lost(lambda: told.append(True))
    members[0].set(EngineState.FAILED, "health check failed")
    assert told == [True]


def test_a_first_byte_far_too_late_counts_against_the_member() -> None:
    pool, members = pool_of(2)
    for _ in range(FAILURES_IN_A_ROW):
        lease = pool.pick(exclude=[members[1]], first_byte_within=0.0)
        assert lease is not None
        lease.received()
        lease.release(Outcome.OK)  # answered, but too late
    assert [r["state"] for r in pool.snapshot()] == ["out", "ready"]
    quick = pool.pick(first_byte_within=60.0)
    assert quick is not None and quick.member is members[1]
    quick.release(None)  # a client that leaves early says nothing
    assert pool.snapshot()[1]["state"] == "ready"


def test_the_pool_model_adds_up_the_ready_members_sequences() -> None:
    pool, members = pool_of(3)
    assert pool.model is not None and pool.model.max_batch == 12
    seen: list[EngineState] = []
    pool.add_listener(seen.append)
    members[2].set(EngineState.RESTARTING)
    assert pool.model.max_batch == 8
    assert seen == [EngineState.READY]  # still ready: listeners re-read the sequences
    snapshot = {r["name"]: r["state"] for r in pool.snapshot()}
    assert snapshot == {"replica-0": "ready", "replica-1": "ready", "replica-2": "restarting"}


def test_one_unknown_batch_makes_the_pools_unknown() -> None:
    members = [Member("a"), Member("b", max_batch=None)]
    pool = Replicas(members)
    for member in members:
        member.set(EngineState.READY)
    assert pool.model is not None and pool.model.max_batch is None


def test_a_single_engine_is_a_pool_of_one_and_a_pool_stays_itself() -> None:
    member = Member("solo")
    pool = as_replicas(member)
    assert pool.members == [member] and as_replicas(pool) is pool
    with pytest.raises(ValueError):
        Replicas([])


@pytest.mark.anyio
async def test_stopping_the_pool_stops_every_member() -> None:
    pool, members = pool_of(2)
    await pool.stop()
    assert all(m.state is EngineState.STOPPED for m in members)
    assert pool.state is EngineState.STOPPED
