"""Client connections are bounded: idle and slow ones are closed, a body must arrive in
time, and a cap keeps the descriptors for clients that send requests. Raw sockets on
loopback play the careless and the hostile client."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

import httpx

from lowvram.gateway.connections import RESERVED_DESCRIPTORS, connection_cap
from tests.conftest import GatewayFactory
from tests.helpers import assert_openai_error, wait_for

CHAT = b'{"messages": [{"role": "user", "content": "hi"}]}'


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    return sock


def closed(sock: socket.socket) -> bool:
    """Whether the server closed it (everything it sent, then EOF, read)."""
    sock.settimeout(0.05)
    try:
        while chunk := sock.recv(65536):
            del chunk
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def request_head(auth: dict[str, str], framing: bytes) -> bytes:
    """A chat request's headers, with how its body is framed (Content-Length, chunked)."""
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: {auth['Authorization']}\r\n".encode()
        + framing
        + b"\r\n\r\n"
    )


def read_response(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    return data


def test_idle_connections_are_closed_after_the_header_deadline(
    make_gateway: GatewayFactory,
) -> None:
    gateway = make_gateway(header_timeout=0.5)
    idle = [connect(gateway) for _ in range(50)]
    slow = connect(gateway)
    slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # ...and no more
    started = time.monotonic()
    wait_for(lambda: all(closed(s) for s in [*idle, slow]), 10, "idle connections closed")
    assert time.monotonic() - started < 5
    for sock in [*idle, slow]:
        sock.close()


def test_a_kept_alive_connection_gets_the_same_deadline_between_requests(
    make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = make_gateway(header_timeout=0.5)
    sock = connect(gateway)
    sock.sendall(request_head(auth, f"Content-Length: {len(CHAT)}".encode()) + CHAT)
    assert read_response(sock).startswith(b"HTTP/1.1 200")
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")  # a second request, trickled
    wait_for(lambda: closed(sock), 10, "the slow second request's connection closed")
    sock.close()


def test_a_body_that_does_not_arrive_in_time_is_a_408_and_the_connection_closes(
    make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = make_gateway(body_timeout=0.5)
    sock = connect(gateway)
    sock.sendall(request_head(auth, b"Content-Length: 100") + CHAT[:10])
    response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 408") and b"connection: close" in response.lower()
    assert b'"request_timeout"' in response or closed(sock)
    wait_for(lambda: closed(sock), 5, "the connection closed")
    sock.close()


def test_a_chunked_body_over_the_limit_is_a_413_and_the_connection_closes_at_once(
    make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = make_gateway(max_body_bytes=2048)
    sock = connect(gateway)
    sock.sendall(
        request_head(auth, b"Transfer-Encoding: chunked") + b"1000\r\n" + b"x" * 4096 + b"\r\n"
    )
    response = read_response(sock)
    assert response.startswith(b"HTTP/1.1 413") and b"connection: close" in response.lower()
    started = time.monotonic()
    wait_for(lambda: closed(sock), 5, "the connection closed")
    assert time.monotonic() - started < 3
    sock.close()


def test_past_the_cap_the_longest_idle_connection_makes_room(
    make_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = make_gateway(max_client_connections=16, header_timeout=60)
    hogs = [connect(gateway) for _ in range(40)]
    wait_for(lambda: sum(closed(s) for s in hogs) >= 40 - 16, 10, "the oldest idle ones closed")
    assert not any(closed(s) for s in hogs[-8:])  # the newest are kept
    # A client that sends a request still gets in and is answered.
    with httpx.Client(base_url=gateway, headers=auth) as client:
        response = client.post("/v1/chat/completions", content=CHAT)
        assert response.status_code == 200, response.text
    for sock in hogs:
        sock.close()


def test_the_cap_leaves_descriptors_for_the_engine_and_the_rest() -> None:
    assert connection_cap(None, 1024, 256) == 1024 - 256 - RESERVED_DESCRIPTORS
    assert connection_cap(100, 65536, 256) == 100
    assert connection_cap(None, 200, 256) == 16  # a tiny limit still lets some in


def test_a_body_read_in_time_is_untouched(gateway: str, auth: dict[str, str]) -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"w" * 100_000 + b'"}]}'
    response = httpx.post(
        gateway + "/v1/chat/completions",
        content=body,
        headers=auth | {"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    assert_openai_error(
        httpx.post(
            gateway + "/v1/chat/completions", content=b"x" * (2 * 1024 * 1024), headers=auth
        ),
        413,
    )
