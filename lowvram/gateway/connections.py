"""Client connections, bounded: how long a request may take to arrive, how many may be open.

uvicorn closes a kept-alive connection some seconds after its last response, but never one
that has not sent a whole request: a connection that sends nothing, or its headers a byte
at a time, is held for ever, and each holds a file descriptor (1,010 idle connections
locked every client out of a gateway with a 1,024-descriptor limit). So:

    header deadline   a connection that has not sent a request's headers within
                      `header_seconds` of opening (or of its previous response) is closed
    connection cap    past `max_open` connections, the one idle the longest (waiting for
                      headers) is closed to make room; if none is idle, the new one is
    body deadline     a request body not in within `body_seconds` is a 408; that and the
                      413 of a body over the limit close the connection (the rest of the
                      body is never read), see middleware.py

    uvicorn.Config(app, http=protocol_for(settings))     # what `lowvram serve` runs

The first two live in uvicorn's HTTP protocol (the app never sees a request whose headers
did not arrive): a subclass of its httptools protocol, the one uvicorn uses here.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lowvram.gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

RESERVED_DESCRIPTORS = 128
"""Descriptors kept for everything but client connections: the database, logs, the
engine's process and pipes, health checks."""


@dataclass(frozen=True)
class ConnectionLimits:
    header_seconds: float = 10.0
    """From a connection's start, or its previous response, to its request's last header."""
    max_open: int = 4096
    """Client connections open at once."""


def raise_descriptor_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (as vLLM does):
    every stream is a client connection and an engine connection. Return the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int | None, descriptors: int, engine_connections: int) -> int:
    """The most client connections this process can hold with descriptors to spare for its
    engine connections and the rest; `wanted` (a setting) if that is lower."""
    fits = max(16, descriptors - engine_connections - RESERVED_DESCRIPTORS)
    return min(wanted, fits) if wanted else fits


class _GuardedProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()

    _deadline: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None
    """When it began waiting for a request's headers; None while a request is under way."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._wait_for_headers()
        if len(self.connections) > self.limits.max_open:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        self._waiting_since = None
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._cancel_deadline()
        self._waiting_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # Not while a pipelined request (its headers are in) is under way.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._wait_for_headers()

    def _wait_for_headers(self) -> None:
        self._cancel_deadline()
        self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.limits.header_seconds, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self._waiting_since is not None and not self.transport.is_closing():
            self.transport.close()

    def _make_room(self) -> None:
        idle = [
            c
            for c in self.connections
            if isinstance(c, _GuardedProtocol) and c is not self and c._waiting_since is not None
        ]
        oldest = min(idle, key=lambda c: c._waiting_since or 0.0, default=None)
        victim = oldest or self
        logger.warning(
            "%d client connections open (GATEWAY_MAX_CLIENT_CONNECTIONS): closing %s",
            len(self.connections),
            "the one idle the longest" if oldest else "the new one (none is idle)",
        )
        victim.transport.close()


def guarded_protocol(limits: ConnectionLimits) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with these limits (its `http=` option takes the class)."""
    return type("GuardedHttpToolsProtocol", (_GuardedProtocol,), {"limits": limits})


def protocol_for(settings: GatewaySettings) -> type[HttpToolsProtocol]:
    """The protocol for these settings, the descriptor limit raised to fit it."""
    cap = connection_cap(
        settings.max_client_connections, raise_descriptor_limit(), settings.max_connections
    )
    return guarded_protocol(ConnectionLimits(settings.header_timeout, cap))
