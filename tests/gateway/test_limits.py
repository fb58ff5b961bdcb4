"""Per-key limits (requests/min, tokens/min, concurrency) and the usage log."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from lowvram.gateway.errors import RateLimited
from lowvram.gateway.keystore import KeyRecord, KeyStore, UsageLog, UsageRecord
from lowvram.gateway.limits import KeyLimiter
from tests.conftest import GatewayFactory
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import assert_openai_error, wait_for

Fake = tuple[FakeUpstream, str]
CHAT = {"messages": [{"role": "user", "content": "hello there"}]}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_minute_slide_with_time() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock)
    key = KeyRecord("k", rpm=2)
    limiter.acquire(key).release()
    clock.now += 20
    limiter.acquire(key).release()
    with pytest.raises(RateLimited) as refused:
        limiter.acquire(key)
    assert refused.value.retry_after == pytest.approx(40)  # the first request leaves at +60 s
    clock.now += 40.5
    limiter.acquire(key).release()


def test_tokens_per_minute_are_charged_when_requests_end() -> None:
    clock = Clock()
    limiter = KeyLimiter(clock)
    key = KeyRecord("k", tpm=100)
    limiter.acquire(key).release(tokens=60)
    clock.now += 10
    limiter.acquire(key).release(tokens=50)
    with pytest.raises(RateLimited) as refused:
        limiter.acquire(key)
    assert refused.value.retry_after == pytest.approx(50)  # 60 tokens leave at +60 s
    clock.now += 50.5
    limiter.acquire(key).release()


def test_concurrency_counts_requests_in_flight() -> None:
    limiter = KeyLimiter(Clock())
    key = KeyRecord("k", max_concurrency=1)
    lease = limiter.acquire(key)
    with pytest.raises(RateLimited) as refused:
        limiter.acquire(key)
    assert refused.value.code == "concurrency_limit_exceeded"
    lease.release()
    lease.release()  # idempotent: a double release must not free a second slot
    limiter.acquire(key)
    with pytest.raises(RateLimited):
        limiter.acquire(key)


def test_keys_do_not_share_limits() -> None:
    limiter = KeyLimiter(Clock())
    limiter.acquire(KeyRecord("a", rpm=1))
    limiter.acquire(KeyRecord("b", rpm=1))


def test_gateway_enforces_rpm_with_retry_after(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    gateway = make_gateway()
    store = KeyStore(tmp_path / "gateway.sqlite3")
    headers = {"api-key": store.create("limited", rpm=2)}
    url = gateway + "/v1/chat/completions"
    assert [httpx.post(url, json=CHAT, headers=headers).status_code for _ in range(2)] == [200, 200]
    refused = httpx.post(url, json=CHAT, headers=headers)
    assert_openai_error(refused, 429, "rate_limit_exceeded")
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    store.close()


def test_gateway_enforces_tokens_per_minute(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gateway = make_gateway()
    store = KeyStore(tmp_path / "gateway.sqlite3")
    headers = {"api-key": store.create("thrifty", tpm=20)}
    url = gateway + "/v1/chat/completions"
    body = CHAT | {"fake": {"tokens": 16}}  # 5 prompt + 16 completion tokens
    assert httpx.post(url, json=body, headers=headers).status_code == 200
    assert_openai_error(httpx.post(url, json=body, headers=headers), 429)
    store.close()


def test_gateway_enforces_concurrency_per_key(
    make_gateway: GatewayFactory, tmp_path: Path, fake: Fake
) -> None:
    gateway = make_gateway()
    store = KeyStore(tmp_path / "gateway.sqlite3")
    headers = {"api-key": store.create("single", max_concurrency=1)}
    url = gateway + "/v1/chat/completions"
    slow = CHAT | {"stream": True, "fake": {"tokens": 3, "delay": 0.5}}
    results: list[Any] = []
    worker = threading.Thread(
        target=lambda: results.append(httpx.post(url, json=slow, headers=headers, timeout=10))
    )
    worker.start()
    wait_for(lambda: any(r.chunks_sent for r in fake[0].records), 5, "the first stream")
    refused = httpx.post(url, json=CHAT, headers=headers)
    assert_openai_error(refused, 429, "concurrency_limit_exceeded")
    worker.join(10)
    assert results[0].status_code == 200
    assert httpx.post(url, json=CHAT, headers=headers).status_code == 200
    store.close()


def test_every_request_is_appended_to_the_usage_log(
    make_gateway: GatewayFactory, auth: dict[str, str], tmp_path: Path
) -> None:
    gateway = make_gateway()
    url = gateway + "/v1/chat/completions"
    httpx.post(url, json=CHAT | {"fake": {"tokens": 4}}, headers=auth)
    httpx.post(url, json=CHAT | {"stream": True, "fake": {"tokens": 3}}, headers=auth)
    httpx.post(url, json=CHAT | {"model": "nope"}, headers=auth)
    db = tmp_path / "gateway.sqlite3"

    def rows() -> list[tuple[Any, ...]]:
        return (
            sqlite3.connect(db)
            .execute(
                "SELECT key_name, model, endpoint, prompt_tokens, completion_tokens, status,"
                " latency_ms > 0 FROM usage ORDER BY id"
            )
            .fetchall()
        )

    wait_for(lambda: len(rows()) == 3, 5, "three usage rows")
    assert rows() == [
        ("env-0", "fake-model", "chat", 5, 4, 200, 1),
        ("env-0", "fake-model", "chat", 5, 3, 200, 1),
        ("env-0", None, "chat", None, None, 404, 1),
    ]


def test_usage_log_loses_nothing_on_close(tmp_path: Path) -> None:
    log = UsageLog(tmp_path / "u.sqlite3")
    for i in range(2000):
        log.record(UsageRecord(f"r{i}", "k", "m", "chat", 1, 2, 200, 1.0))
    log.close()
    count = sqlite3.connect(tmp_path / "u.sqlite3").execute("SELECT COUNT(*) FROM usage")
    assert count.fetchone()[0] == 2000
