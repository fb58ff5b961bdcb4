"""Admission control: in-flight bound, bounded queue with timeout, and engine-down answers."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from lowvram.gateway.admission import Admission
from lowvram.gateway.errors import EngineUnavailable, RateLimited
from tests.conftest import GatewayFactory
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import assert_openai_error, wait_for

pytestmark = pytest.mark.anyio
Fake = tuple[FakeUpstream, str]
SLOW = {"messages": [{"role": "user", "content": "hi"}], "fake": {"tokens": 1, "ttft": 1.5}}


async def test_requests_over_the_limit_wait_then_run_in_order() -> None:
    admission = Admission(limit=1, queue_size=2, queue_timeout=5)
    await admission.acquire()
    second = asyncio.ensure_future(admission.acquire())
    third = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    assert (admission.inflight, admission.queued) == (1, 2)
    assert not second.done()
    admission.release()
    await second
    assert not third.done() and admission.inflight == 1
    admission.release()
    await third
    admission.release()
    assert (admission.inflight, admission.queued) == (0, 0)


async def test_a_full_queue_answers_429_at_once() -> None:
    admission = Admission(limit=1, queue_size=1, queue_timeout=5)
    await admission.acquire()
    waiting = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    with pytest.raises(RateLimited) as refused:
        await admission.acquire()
    assert refused.value.code == "queue_full" and refused.value.headers()["Retry-After"]
    waiting.cancel()


async def test_waiting_too_long_answers_429() -> None:
    admission = Admission(limit=1, queue_size=1, queue_timeout=0.05)
    await admission.acquire()
    with pytest.raises(RateLimited) as refused:
        await admission.acquire()
    assert refused.value.code == "queue_timeout"
    assert admission.queued == 0


async def test_engine_down_answers_every_queued_request_503() -> None:
    admission = Admission(limit=1, queue_size=5, queue_timeout=5)
    await admission.acquire()
    queued = [asyncio.ensure_future(admission.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    admission.fail_waiters(EngineUnavailable("down", retry_after=3))
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, EngineUnavailable) for r in results)
    assert admission.queued == 0 and admission.inflight == 1


async def test_a_waiter_that_gives_up_frees_its_place() -> None:
    admission = Admission(limit=1, queue_size=5, queue_timeout=5)
    await admission.acquire()
    leaving = asyncio.ensure_future(admission.acquire())
    staying = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    admission.release()
    await staying
    assert admission.inflight == 1 and admission.queued == 0


async def test_raising_the_limit_admits_waiters() -> None:
    admission = Admission(limit=1, queue_size=5, queue_timeout=5)
    await admission.acquire()
    waiting = asyncio.ensure_future(admission.acquire())
    await asyncio.sleep(0)
    admission.limit = 2
    await waiting
    assert admission.inflight == 2


def _in_background(fn: Any) -> list[Any]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    thread.start()
    return result


def test_gateway_answers_429_with_retry_after_when_the_queue_is_full(
    make_gateway: GatewayFactory, auth: dict[str, str], fake: Fake
) -> None:
    gateway = make_gateway(max_inflight=1, queue_size=0)
    url = gateway + "/v1/chat/completions"
    first = _in_background(lambda: httpx.post(url, json=SLOW, headers=auth, timeout=10))
    wait_for(lambda: any(r.path == "/v1/chat/completions" for r in fake[0].records), 5, "first")
    refused = httpx.post(url, json=SLOW, headers=auth)
    assert_openai_error(refused, 429, "queue_full")
    assert int(refused.headers["Retry-After"]) >= 1
    wait_for(lambda: bool(first), 10, "the first request to finish")
    assert first[0].status_code == 200


def test_gateway_answers_503_with_retry_after_when_the_engine_is_not_ready(
    make_gateway: GatewayFactory, auth: dict[str, str], tmp_path: Any
) -> None:
    from lowvram.gateway.app import create_app
    from tests.conftest import external, gateway_settings
    from tests.helpers import serve

    settings = gateway_settings(tmp_path / "g.sqlite3")
    nothing_listens = external("http://127.0.0.1:9", settings)
    with serve(create_app(settings, nothing_listens)) as gateway:
        ready = httpx.get(gateway + "/ready")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
        assert ready.json() == {
            "status": "starting",
            "reason": "the upstream server is not answering yet",
        }
        response = httpx.post(gateway + "/v1/chat/completions", json=SLOW, headers=auth)
        assert_openai_error(response, 503, "engine_unavailable")
        assert int(response.headers["Retry-After"]) >= 1
