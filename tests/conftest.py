"""Shared fixtures: the fake upstream (a test double) and gateways in front of it."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from app.main import create_app
from app.settings import Settings
from tests.doubles.fake_upstream import FakeUpstream
from tests.servers import serve, wait_ready

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


def gateway_settings(upstream_url: str, db_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "gateway_upstream_url": upstream_url,
        "gateway_upstream_api_key": UPSTREAM_KEY,
        "gateway_api_keys": [CLIENT_KEY],
        "gateway_admin_api_keys": [ADMIN_KEY],
        "gateway_db_path": db_path,
        "gateway_keepalive_seconds": 0,
    }
    return Settings(_env_file=None, **(values | overrides))  # type: ignore[call-arg]


GatewayFactory = Callable[..., str]


@pytest.fixture
def make_gateway(fake: tuple[FakeUpstream, str], tmp_path: Path) -> Iterator[GatewayFactory]:
    """Start a gateway in front of the fake upstream; returns its base URL."""
    _, upstream_url = fake
    with ExitStack() as stack:

        def start(**overrides: Any) -> str:
            settings = gateway_settings(upstream_url, tmp_path / "gateway.sqlite3", **overrides)
            url = stack.enter_context(serve(create_app(settings)))
            wait_ready(url)
            return url

        yield start


@pytest.fixture
def gateway(make_gateway: GatewayFactory) -> str:
    return make_gateway()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEY}"}
