"""Admission control: a bounded number of requests in flight to the engine, a bounded queue.

A low-VRAM engine runs a handful of sequences at once; sending it more only moves the queue
into the engine, where a client that gave up still costs prefill. Here a full queue answers
429 at once, a request that waited too long gets 429, and when the engine goes down every
queued request gets 503 instead of waiting for a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from lowvram.gateway.errors import APIError, RateLimited

RETRY_AFTER_BUSY = 5.0


class Admission:
    def __init__(self, limit: int, queue_size: int, queue_timeout: float) -> None:
        self._limit = limit
        self._queue_size = queue_size
        self._queue_timeout = queue_timeout
        self._inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = max(1, value)
        self._grant()

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be; pair with `release()`."""
        if self._inflight < self._limit and not self._waiters:
            self._inflight += 1
            return
        if len(self._waiters) >= self._queue_size:
            raise RateLimited(
                f"The engine is busy: {self._inflight} requests running and"
                f" {len(self._waiters)} queued. Retry shortly.",
                code="queue_full",
                retry_after=RETRY_AFTER_BUSY,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait({waiter}, timeout=self._queue_timeout)
        except asyncio.CancelledError:
            self._leave(waiter)
            raise
        if not waiter.done():
            self._leave(waiter)
            raise RateLimited(
                f"The request waited {self._queue_timeout:g} s in the queue without a free"
                " slot on the engine. Retry shortly.",
                code="queue_timeout",
                retry_after=RETRY_AFTER_BUSY,
            )
        waiter.result()  # raises what fail_waiters set

    def release(self) -> None:
        self._inflight -= 1
        self._grant()

    def fail_waiters(self, error: APIError) -> None:
        """Answer every queued request with `error` (the engine went away)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)

    def _grant(self) -> None:
        while self._waiters and self._inflight < self._limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._inflight += 1
                waiter.set_result(None)

    def _leave(self, waiter: asyncio.Future[None]) -> None:
        """A waiter gives up: hand back a slot it was granted meanwhile, else leave the line."""
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.release()
            return
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if not waiter.done():
            waiter.cancel()
