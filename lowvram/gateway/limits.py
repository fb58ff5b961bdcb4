"""Per-key limits: requests/min, tokens/min and concurrent requests.

Windows slide over the last 60 s. Tokens are only known once a request ends, so the token
limit admits a request while the key's last minute is under its budget, then charges it.
Over any limit: 429 with a Retry-After that says when the window frees up.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lowvram.gateway.errors import RateLimited
from lowvram.gateway.keystore import KeyRecord

WINDOW = 60.0


@dataclass
class _KeyState:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_sum: int = 0
    active: int = 0

    def expire(self, now: float) -> None:
        while self.requests and self.requests[0] <= now - WINDOW:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW:
            self.token_sum -= self.tokens.popleft()[1]


class Lease:
    """One admitted request's hold on its key; `release` exactly once when it ends."""

    def __init__(self, limiter: KeyLimiter, key: KeyRecord) -> None:
        self._limiter = limiter
        self._key = key
        self._released = False

    def release(self, tokens: int = 0) -> None:
        if not self._released:
            self._released = True
            self._limiter._release(self._key, tokens)


class KeyLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def acquire(self, key: KeyRecord) -> Lease:
        now = self._clock()
        state = self._keys.setdefault(key.name, _KeyState())
        state.expire(now)
        if key.max_concurrency is not None and state.active >= key.max_concurrency:
            raise RateLimited(
                f"Key '{key.name}' already has {state.active} requests in flight"
                f" (limit {key.max_concurrency}).",
                code="concurrency_limit_exceeded",
                retry_after=1,
            )
        if key.rpm is not None and len(state.requests) >= key.rpm:
            # A key stored with rpm 0 (older versions let one be made) never frees up.
            oldest = state.requests[0] if state.requests else now
            raise RateLimited(
                f"Rate limit reached for key '{key.name}': {key.rpm} requests per minute.",
                retry_after=oldest + WINDOW - now,
            )
        if key.tpm is not None and state.token_sum >= key.tpm:
            raise RateLimited(
                f"Rate limit reached for key '{key.name}': {key.tpm} tokens per minute.",
                retry_after=self._token_wait(state, key.tpm, now),
            )
        state.requests.append(now)
        state.active += 1
        return Lease(self, key)

    def _release(self, key: KeyRecord, tokens: int) -> None:
        state = self._keys[key.name]
        state.active -= 1
        if tokens > 0:
            state.tokens.append((self._clock(), tokens))
            state.token_sum += tokens

    @staticmethod
    def _token_wait(state: _KeyState, tpm: int, now: float) -> float:
        """Seconds until enough charged tokens leave the window to fall under `tpm`."""
        remaining = state.token_sum
        for ts, tokens in state.tokens:
            remaining -= tokens
            if remaining < tpm:
                return ts + WINDOW - now
        return WINDOW
