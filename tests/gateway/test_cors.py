"""Browser front ends: CORS for the origins the operator allows, the key still required."""

from __future__ import annotations

import httpx

from tests.conftest import CLIENT_KEY, GatewayFactory
from tests.helpers import assert_openai_error

ORIGIN = "http://localhost:3000"
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type",
}


def test_an_allowed_origin_passes_the_preflight_and_still_needs_a_key(
    make_gateway: GatewayFactory,
) -> None:
    gateway = make_gateway(cors_origins=[ORIGIN])
    preflight = httpx.options(gateway + "/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in preflight.headers  # keys, not cookies
    keyless = httpx.post(gateway + "/v1/chat/completions", json=CHAT, headers={"Origin": ORIGIN})
    assert_openai_error(keyless, 401)
    assert keyless.headers["access-control-allow-origin"] == ORIGIN  # the page can read why
    keyed = httpx.post(
        gateway + "/v1/chat/completions",
        json=CHAT,
        headers={"Origin": ORIGIN, "Authorization": f"Bearer {CLIENT_KEY}"},
    )
    assert (
        keyed.status_code == 200
        and "x-request-id" in keyed.headers["access-control-expose-headers"]
    )


def test_other_origins_and_the_default_get_no_cors(
    make_gateway: GatewayFactory, gateway: str
) -> None:
    allowed = make_gateway(cors_origins=[ORIGIN])
    other = httpx.options(
        allowed + "/v1/chat/completions", headers=PREFLIGHT | {"Origin": "http://evil.test"}
    )
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    default = httpx.options(gateway + "/v1/chat/completions", headers=PREFLIGHT)
    assert default.status_code == 405 and "access-control-allow-origin" not in default.headers
