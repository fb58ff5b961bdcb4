"""Shared fixtures: the fake upstream (a test double) and gateways in front of it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from lowvram.engine.external import ExternalEngine
from lowvram.gateway.app import create_app
from lowvram.gateway.connections import protocol_for
from lowvram.gateway.settings import GatewaySettings
from tests.doubles.fake_upstream import FakeUpstream
from tests.helpers import serve, wait_ready

# hypothesis is imported here, at start-up, rather than first by its plugin's end-of-session
# summary: there, CPython 3.11.7's parser failed on it with "AST constructor recursion depth
# mismatch" after the e2e tests had run. (The GPU machine has no hypothesis: fine.)
with contextlib.suppress(ImportError):
    import hypothesis  # noqa: F401

CLIENT_KEY = "test-client-key-0001"
ADMIN_KEY = "test-admin-key-0001"
UPSTREAM_KEY = "internal-upstream-key"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fake() -> Iterator[tuple[FakeUpstream, str]]:
    double = FakeUpstream(api_key=UPSTREAM_KEY)
    with serve(double.app()) as url:
        yield double, url


def gateway_settings(db_path: Path, **overrides: Any) -> GatewaySettings:
    """Settings for a test gateway: nothing read from the environment or `.env`."""
    values: dict[str, Any] = {
        "api_keys": [CLIENT_KEY],
        "admin_api_keys": [ADMIN_KEY],
        "db_path": db_path,
        "keepalive_seconds": 0,
    }
    return GatewaySettings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


def external(url: str, settings: GatewaySettings) -> ExternalEngine:
    return ExternalEngine(url, UPSTREAM_KEY, context_length=settings.context_length)


GatewayFactory = Callable[..., str]


@pytest.fixture
def make_gateway(fake: tuple[FakeUpstream, str], tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start a gateway in front of the fake upstream; returns its base URL."""
    _, upstream_url = fake
    with ExitStack() as stack:

        def start(**overrides: Any) -> str:
            settings = gateway_settings(tmp_path / "gateway.sqlite3", **overrides)
            app = create_app(settings, external(upstream_url, settings))
            url = stack.enter_context(serve(app, http=protocol_for(settings)))
            wait_ready(url)
            return url

        yield start


@pytest.fixture
def gateway(make_gateway: GatewayFactory) -> str:
    return make_gateway()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEY}"}
